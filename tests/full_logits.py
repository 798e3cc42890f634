"""The full-logits losses: the oracle the trainer's target-position losses are tested against (no command uses them).

The trainer never builds [batch, length, vocabulary] logits (src/training/lm_loss.py); these functions do, in the
plainest form: shifted cross-entropy over every position (label-smoothed on request), masked where the label is
-100, and R-Drop written over two passes' full logits with autograd.

    from full_logits import full_logits_token_losses, full_logits_rdrop
    tok, mask = full_logits_token_losses(model(input_ids=ids).logits, labels, smoothing=0.1)   # (B, T-1) each
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def full_logits_token_losses(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0):
    """Per-token (smoothed) next-token cross-entropy (B, T-1) and the target mask: position t predicts t + 1."""
    z = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    loss = F.cross_entropy(z.reshape(-1, z.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="none", label_smoothing=smoothing).view_as(targets)
    return loss, mask


def full_logits_rdrop(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                      alpha: float, smoothing: float = 0.0, doubled: bool = True) -> dict:
    """R-Drop over full logits: two dropout passes (one forward over the doubled batch, or two forwards), per
    target token ``(ce1 + ce2) / 2 + alpha * (KL(p1 || p2) + KL(p2 || p1)) / 2``, 0 on prompt and padding.

    Returns ``token_loss``, ``token_kl`` and ``mask`` (B, T-1), and the means over the targets ``total``, ``ce``,
    ``kl``.
    """
    B = input_ids.shape[0]
    if doubled:
        logits = model(input_ids=torch.cat([input_ids, input_ids]),
                       attention_mask=torch.cat([attention_mask, attention_mask])).logits
        logits1, logits2 = logits[:B], logits[B:]
    else:
        logits1 = model(input_ids=input_ids, attention_mask=attention_mask).logits
        logits2 = model(input_ids=input_ids, attention_mask=attention_mask).logits
    ce1, mask = full_logits_token_losses(logits1, labels, smoothing)
    ce2, _ = full_logits_token_losses(logits2, labels, smoothing)
    lp1 = torch.log_softmax(logits1[:, :-1].float(), dim=-1)  # (B, T-1, V)
    lp2 = torch.log_softmax(logits2[:, :-1].float(), dim=-1)
    kl = 0.5 * ((lp1.exp() * (lp1 - lp2)).sum(-1) + (lp2.exp() * (lp2 - lp1)).sum(-1)) * mask  # (B, T-1)
    ce = 0.5 * (ce1 + ce2) * mask
    token_loss = ce + alpha * kl
    n = mask.sum().clamp(min=1)
    return {"token_loss": token_loss, "token_kl": kl, "mask": mask, "total": token_loss.sum() / n,
            "ce": ce.sum() / n, "kl": kl.sum() / n}
