"""The target-position LM head and losses (src/training/lm_loss.py) against independent oracles: torch's
cross-entropy over full logits (plain, label-smoothed, weighted, per record), autograd through an R-Drop written
over full logits, and Hugging Face GPT2LMHeadModel's own ``loss`` with -100 labels; values and gradients with
respect to the hidden states and the head weight, fp32, chunks smaller than the batch.

    .venv/bin/python -m pytest tests/test_lm_loss.py -q
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from full_logits import full_logits_rdrop, full_logits_token_losses
from src.training.lm_loss import IGNORE_INDEX, TargetIndex, final_hidden, head_loss, output_weight, rdrop_head_loss

TOL = dict(rtol=1e-5, atol=1e-5)


def _case(seed=0, B=3, T=9, C=16, V=40):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, C, generator=g, dtype=torch.float64).float().requires_grad_()
    weight = (0.5 * torch.randn(V, C, generator=g)).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[1, 6:] = IGNORE_INDEX  # padding
    labels[2, 2] = IGNORE_INDEX
    return hidden, weight, labels


def _grads(loss, *xs):
    return torch.autograd.grad(loss, xs)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_head_loss_matches_cross_entropy_over_full_logits(smoothing):
    hidden, weight, labels = _case()
    logits = hidden @ weight.T  # (B, T, V): the oracle materialises what head_loss never does
    z, y = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    ref = F.cross_entropy(z, y, ignore_index=IGNORE_INDEX, reduction="sum", label_smoothing=smoothing)
    ref_gh, ref_gw = _grads(ref, hidden, weight)

    tgt = TargetIndex.from_labels(labels)
    out = head_loss(hidden, weight, tgt, smoothing=smoothing, chunk_rows=5)  # 20 targets in 4 chunks
    gh, gw = _grads(out.loss, hidden, weight)
    torch.testing.assert_close(out.loss, ref, **TOL)
    torch.testing.assert_close(gh, ref_gh, **TOL)
    torch.testing.assert_close(gw, ref_gw, **TOL)
    assert len(tgt) == int((labels[:, 1:] != IGNORE_INDEX).sum())
    ref_tok, mask = full_logits_token_losses(logits, labels, smoothing)
    torch.testing.assert_close(out.token_loss, ref_tok[mask], **TOL)
    torch.testing.assert_close(tgt.per_record(out.token_loss), (ref_tok * mask).sum(1), **TOL)
    assert torch.equal(out.correct, (logits[:, :-1].argmax(-1) == labels[:, 1:])[mask])


def test_weighted_per_record_loss_and_its_gradients():
    hidden, weight, labels = _case(seed=1)
    w_rec = torch.tensor([0.5, 1.0, 0.25])
    logits = hidden @ weight.T
    tok, mask = full_logits_token_losses(logits, labels)
    ref = (tok * mask * w_rec[:, None]).sum() / 7.0
    ref_gh, ref_gw = _grads(ref, hidden, weight)
    tgt = TargetIndex.from_labels(labels)
    out = head_loss(hidden, weight, tgt, coef=w_rec[tgt.record] / 7.0, chunk_rows=3)
    torch.testing.assert_close(out.loss, ref, **TOL)
    for a, b in zip(_grads(out.loss * 3.0, hidden, weight), (3 * ref_gh, 3 * ref_gw)):  # a function of the scalar
        torch.testing.assert_close(a, b, **TOL)
    assert torch.equal(tgt.counts(), mask.sum(1))


def _rdrop_full(l1, l2, labels, alpha, smoothing):
    """R-Drop over full logits, written out with autograd (the formula of tests/full_logits.py)."""
    ce1, mask = full_logits_token_losses(l1, labels, smoothing)
    ce2, _ = full_logits_token_losses(l2, labels, smoothing)
    lp1, lp2 = torch.log_softmax(l1[:, :-1], -1), torch.log_softmax(l2[:, :-1], -1)
    kl = 0.5 * ((lp1.exp() * (lp1 - lp2)).sum(-1) + (lp2.exp() * (lp2 - lp1)).sum(-1))
    return ((0.5 * (ce1 + ce2) + alpha * kl) * mask).sum(), (kl * mask).sum(), (0.5 * (ce1 + ce2) * mask).sum()


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_rdrop_pair_matches_autograd_over_full_logits(smoothing):
    h1, weight, labels = _case(seed=2)
    h2 = (h1.detach() + 0.3 * torch.randn_like(h1)).requires_grad_()  # a second "dropout" pass
    ref, ref_kl, ref_ce = _rdrop_full(h1 @ weight.T, h2 @ weight.T, labels, alpha=0.7, smoothing=smoothing)
    ref_g = _grads(ref, h1, h2, weight)
    tgt = TargetIndex.from_labels(labels)
    out = rdrop_head_loss(h1, h2, weight, tgt, alpha=0.7, smoothing=smoothing, chunk_rows=8)
    torch.testing.assert_close(out.loss, ref, **TOL)
    torch.testing.assert_close(out.kl.sum(), ref_kl, **TOL)
    torch.testing.assert_close(out.ce.sum(), ref_ce, **TOL)
    assert float(out.kl.sum()) > 1e-3  # the passes differ, so the KL term is really exercised
    for a, b in zip(_grads(out.loss, h1, h2, weight), ref_g):
        torch.testing.assert_close(a, b, **TOL)


def test_matches_hugging_face_gpt2_loss_and_gradients():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 64, (3, 12))
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX  # prompt
    labels[mask == 0] = IGNORE_INDEX
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss  # HF: mean over targets
    params = [p for p in model.parameters()]
    ref_g = torch.autograd.grad(ref, params)

    tgt = TargetIndex.from_labels(labels)
    out = head_loss(final_hidden(model, input_ids=ids, attention_mask=mask), output_weight(model), tgt,
                    coef=torch.full((len(tgt),), 1.0 / len(tgt)), chunk_rows=7)
    torch.testing.assert_close(out.loss, ref, **TOL)
    for a, b in zip(torch.autograd.grad(out.loss, params), ref_g):  # every weight, the tied embedding included
        torch.testing.assert_close(a, b, **TOL)


def test_backward_keeps_no_vocabulary_wide_tensor_per_target():
    """The autograd graph holds the hidden-state and head gradients, never [N, V] logits of any chunk."""
    hidden, weight, labels = _case(B=4, T=40, C=8, V=64)
    tgt = TargetIndex.from_labels(labels)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out = head_loss(hidden, weight, tgt, chunk_rows=16)
    N, V, C = len(tgt), weight.shape[0], weight.shape[1]
    assert N > 16 and all(V not in s or s == (V, C) for s in saved), saved  # (N, C), (V, C): no (n, V)
    assert max(torch.Size(s).numel() for s in saved) < N * V
    out.loss.backward()
    assert hidden.grad is not None and weight.grad is not None


def test_no_grad_evaluation_gives_the_same_losses():
    hidden, weight, labels = _case(seed=3)
    tgt = TargetIndex.from_labels(labels)
    with torch.no_grad():
        out = head_loss(hidden, weight, tgt, chunk_rows=4)
    ref, mask = full_logits_token_losses(hidden @ weight.T, labels)
    torch.testing.assert_close(out.token_loss, ref[mask].detach(), **TOL)
    assert not out.loss.requires_grad


def test_packed_record_ids_route_per_record_sums():
    labels = torch.tensor([[5, 6, 7, 8, 9, 3]])
    labels[0, 3] = IGNORE_INDEX  # record 1 starts at position 3: its first token is never predicted
    record_ids = torch.tensor([[0, 0, 0, 1, 1, 1]])
    tgt = TargetIndex.from_labels(labels, record_ids)
    assert tgt.record.tolist() == [0, 0, 1, 1] and tgt.n_records == 2
    assert tgt.per_record(torch.tensor([1.0, 2.0, 3.0, 4.0])).tolist() == [3.0, 7.0]


def test_autocast_bf16_on_cpu_stays_close_to_fp32():
    hidden, weight, labels = _case(seed=4)
    tgt = TargetIndex.from_labels(labels)
    ref = head_loss(hidden, weight, tgt).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head_loss(hidden, weight, tgt)
    gh, gw = _grads(out.loss, hidden, weight)
    assert out.loss.dtype == torch.float32 and gw.dtype == torch.float32 and gh.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref, rtol=2e-2, atol=0.5)


def _tiny_lm(dropout=0.0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=dropout,
                     embd_pdrop=dropout, attn_pdrop=dropout)
    return GPT2LMHeadModel(cfg)


def _batch():
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX
    labels[mask == 0] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("rdrop", [None, "doubled", "two_pass"])
def test_step_losses_match_the_full_logits_step_loss(rdrop):
    """The trainer's step loss (lm_loss.step_losses, or R-Drop's train_enhanced.rdrop_step_losses) against the
    full-logits oracle (tests/full_logits.py): the weighted sums, the KL, per-record means and every gradient;
    dropout on, the same seed before each so both draw the same masks."""
    from src.training import train_enhanced as te
    from src.training.lm_loss import step_losses

    lm = _tiny_lm(dropout=0.1).train()
    batch, w = _batch(), torch.tensor([1.0, 0.5, 0.75])
    eps, alpha = 0.05, 0.3
    params = list(lm.parameters())
    torch.manual_seed(11)
    if rdrop is None:
        logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        tok, mask = full_logits_token_losses(logits, batch["labels"], eps)
        ref_kl = None
    else:
        out = full_logits_rdrop(lm, batch["input_ids"], batch["attention_mask"], batch["labels"], alpha, eps,
                                rdrop == "doubled")
        tok, mask, ref_kl = out["token_loss"], out["mask"], (out["token_kl"] * w[:, None]).sum()
    ref = (tok * w[:, None]).sum()
    ref_g = torch.autograd.grad(ref, params)
    ref_rec = (tok.detach().sum(1) / mask.sum(1)).detach()

    torch.manual_seed(11)
    if rdrop is None:
        got = step_losses(lm, batch, w, smoothing=eps)
    else:
        got = te.rdrop_step_losses(lm, batch, w, smoothing=eps, alpha=alpha, doubled=rdrop == "doubled")
    torch.testing.assert_close(got["loss_sum"], ref, **TOL)
    if ref_kl is not None:
        torch.testing.assert_close(got["sums"]["kl"], ref_kl.detach(), **TOL)
    per_record = got["targets"].per_record(got["token_loss"]) / got["targets"].counts()
    torch.testing.assert_close(per_record, ref_rec, **TOL)
    for a, b in zip(torch.autograd.grad(got["loss_sum"], params), ref_g):
        torch.testing.assert_close(a, b, **TOL)


def test_eval_losses_match_full_logits():
    from src.training.lm_loss import eval_losses

    lm = _tiny_lm().eval()
    batch = _batch()
    with torch.no_grad():
        logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref, mask = full_logits_token_losses(logits, batch["labels"])
    loss, correct, tgt = eval_losses(lm, batch)
    torch.testing.assert_close(loss, ref[mask], **TOL)
    assert torch.equal(correct, (logits[:, :-1].argmax(-1) == batch["labels"][:, 1:])[mask])
    assert torch.equal(tgt.record, mask.nonzero(as_tuple=True)[0])
