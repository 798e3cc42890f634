"""The causal-LM families Theta fine-tunes, what each step and technique does on each, and the start-up refusals.

Every model is loaded through ``AutoModelForCausalLM`` / ``AutoTokenizer`` and keeps the architecture its folder
says (``src/model/theta_model.py``). Before any weights load, :func:`check_support` reads the folder's config and
refuses, naming the ``model_type`` and the reason, a model a step of Theta cannot handle correctly: a type outside
``FAMILIES``, remote code, a biased LM head, logit soft-capping or scaling, and sliding-window attention with
``--packing`` when the window is shorter than ``--max_length``. documentation/MODELS.md has the table in prose.

    from src.model.families import FAMILIES, check_support, family_of
    check_support(json.load(open("models/base/my-llama/config.json")), packing=True, max_length=512)
    family_of(model.config).dropout_fields          # ('attention_dropout',)
    python -m src.model.families                    # print the table of supported families
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from src.utils.common import UserError


class UnsupportedModel(UserError):
    """A model Theta refuses at start-up; the message names its model_type, the reason and what to do."""


@dataclass(frozen=True)
class ModelFamily:
    """One supported ``model_type`` and what differs on it, step by step.

    ``dropout_fields`` are the config fields ``--dropout P`` sets (and that R-Drop needs above 0); ``positions`` is
    how the family encodes positions (packing restarts ``position_ids`` for both kinds); ``default_dropout`` is
    what the family's published checkpoints ship with; ``head`` says whether its checkpoints tie the LM head to
    the token embedding; ``pad`` where its pad token comes from (``ThetaModel._ensure_special_tokens``).
    """
    model_type: str
    examples: str
    positions: str
    dropout_fields: tuple[str, ...]
    default_dropout: str
    head: str
    pad: str


FAMILIES: dict[str, ModelFamily] = {f.model_type: f for f in (
    ModelFamily("gpt2", "gpt2, gpt2-medium, theta-tiny", "learned (wpe)", ("resid_pdrop", "embd_pdrop", "attn_pdrop"),
                "0.1", "tied", "added <|pad|> (GPT-2 has no spare token)"),
    ModelFamily("llama", "SmolLM2, Llama-3.2-1B/3B", "RoPE", ("attention_dropout",), "0.0",
                "tied (small) or untied", "a spare <|reserved_special_token_N|>, else added"),
    ModelFamily("qwen2", "Qwen2.5-0.5B/1.5B", "RoPE", ("attention_dropout",), "0.0", "tied (small) or untied",
                "its own <|endoftext|>"),
    ModelFamily("qwen3", "Qwen3-0.6B/1.7B", "RoPE", ("attention_dropout",), "0.0", "tied (small) or untied",
                "its own <|endoftext|>"),
    ModelFamily("mistral", "Mistral-7B class, Ministral", "RoPE (sliding window)", ("attention_dropout",), "0.0",
                "untied", "added <|pad|> unless the tokenizer has a spare special token"),
    ModelFamily("phi3", "Phi-3-mini, Phi-3.5-mini, Phi-4-mini", "RoPE (partial on Phi-4-mini)",
                ("attention_dropout", "resid_pdrop", "embd_pdrop"), "0.0", "untied (tied on Phi-4-mini)",
                "a spare <|placeholderN|> (its pad is its EOS)"),
)}

SUPPORTED_HINT = ("Theta fine-tunes these model types: " + ", ".join(FAMILIES) + " (documentation/MODELS.md); pick "
                  "a model of one of them, or --model_name theta-tiny")


def _get(config: Any, key: str, default=None):
    """A field of a config object or of a config.json dict."""
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def model_type_of(config: Any) -> str:
    return str(_get(config, "model_type", "") or "")


def family_of(config: Any) -> ModelFamily:
    """The family of a config (object or dict); UnsupportedModel when it is none of ``FAMILIES``."""
    model_type = model_type_of(config)
    if model_type not in FAMILIES:
        raise UnsupportedModel(f"model_type '{model_type or '(none)'}' is not supported. {SUPPORTED_HINT}.")
    return FAMILIES[model_type]


def sliding_window(config: Any) -> int | None:
    """The attention window in tokens when the model uses one (Mistral, Phi-3; Qwen2/3 only with
    ``use_sliding_window``), else None."""
    window = _get(config, "sliding_window")
    if not window or _get(config, "use_sliding_window") is False:
        return None
    return int(window)


def has_dropout(config: Any) -> bool:
    """Whether any of the family's dropout fields is above 0 (R-Drop's KL term is exactly 0 otherwise)."""
    return any(float(_get(config, f, 0.0) or 0.0) > 0 for f in family_of(config).dropout_fields)


def dropout_overrides(config: Any, p: float) -> dict[str, float]:
    """``{field: p}`` for every dropout field of the config's family (what ``--dropout P`` sets)."""
    return {f: float(p) for f in family_of(config).dropout_fields}


def check_support(config: Any, *, name: str = "", packing: bool = False, max_length: int | None = None,
                  lm_head_bias: bool | None = None) -> ModelFamily:
    """The model's family, or UnsupportedModel naming ``model_type`` and the reason (``name``: the model's source,
    for the message). ``config`` is a config object or config.json's dict: everything here is read before any
    weights load, except ``lm_head_bias`` (the loaded head's), which a caller checks once it has the model."""
    model_type = model_type_of(config)
    where = f"{name}: " if name else ""
    if _get(config, "auto_map"):
        raise UnsupportedModel(f"{where}model_type '{model_type}' comes with its own code (auto_map in config.json): "
                               "Theta runs no remote code, and every step it takes is tested only on the "
                               f"transformers classes. {SUPPORTED_HINT}.")
    for key, what in (("final_logit_softcapping", "logit soft-capping"),
                      ("attn_logit_softcapping", "attention logit soft-capping"),
                      ("logit_scale", "logit scaling")):  # named before the type: the reason a family is out
        if _get(config, key):
            raise UnsupportedModel(f"{where}model_type '{model_type}' sets {key} = {_get(config, key)} ({what}): "
                                   "Theta's target-position loss computes logits as hidden x head weight and "
                                   f"would train another function than the model's. {SUPPORTED_HINT}.")
    if model_type not in FAMILIES:
        raise UnsupportedModel(f"{where}model_type '{model_type or '(none)'}' is not supported. {SUPPORTED_HINT}.")
    family = FAMILIES[model_type]
    if lm_head_bias:
        raise UnsupportedModel(f"{where}model_type '{model_type}' has a bias on its LM head: Theta's target-position "
                               "loss and its head checks take a bias-free head. Use a model without one.")
    window = sliding_window(config)
    if packing and window is not None and max_length is not None and window < max_length:
        raise UnsupportedModel(f"{where}model_type '{model_type}' uses sliding-window attention of {window} tokens, "
                               f"shorter than --max_length {max_length}: a packed row's block mask would let tokens "
                               f"see past the window. Drop --packing, or use --max_length {window} or less.")
    return family


def families_table() -> str:
    """The supported families as a Markdown table (documentation/MODELS.md shows it)."""
    rows = ["| model_type | examples | positions | dropout fields (shipped) | head | pad |",
            "|---|---|---|---|---|---|"]
    for f in FAMILIES.values():
        rows.append(f"| `{f.model_type}` | {f.examples} | {f.positions} | {', '.join(f.dropout_fields)} "
                    f"({f.default_dropout}) | {f.head} | {f.pad} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(families_table())
    sys.exit(0)
