"""LoRA and QLoRA adapters for any supported family: the peft configuration from the trainer's flags, the wrap,
the 4-bit NF4 base, the adapter folder and the merge that every later step reads.

    from src.model.adapters import adapter_config, wrap_with_adapters, save_adapter, merge_adapter
    peft_model = wrap_with_adapters(model, adapter_config(model, r=16, alpha=32, dropout=0.05))
    save_adapter(peft_model, tokenizer, Path("models/<run>/adapter"), base_source="models/base/theta-tiny")
    merged = merge_adapter(base_model_on_cpu, peft_model)      # a plain causal LM with the adapters folded in

    python -m src.training.train_enhanced --profile quick --peft lora          # (documentation/ADAPTERS.md)

What the adapters are: every linear layer of the decoder layers (found by the family's own block class,
``quantization.decoder_layers``; GPT-2's ``Conv1D`` and ``nn.Linear`` alike, never the LM head) gets a LoRA pair
``W + (alpha / r) * B @ A`` (Hu et al. 2021); with ``qlora`` the frozen base is loaded in 4-bit NF4 with double
quantisation (Dettmers et al. 2023) through ``bitsandbytes``, an optional dependency imported only then.

A token added to the vocabulary (Theta adds a pad token, and an EOS where the tokenizer has none) that is a
training target gets a trained row: peft's ``trainable_token_indices``, which trains those rows of the token
embedding only (a delta of ``rows x hidden`` values, saved in the adapter), chosen over ``modules_to_save`` on
the embedding, which would copy and train the whole ``vocabulary x hidden`` matrix (230M values for a 150k
vocabulary at 1536 wide: the base's size, not an adapter's). With a tied head (GPT-2, Qwen2) the same delta is
the head's row; an untied head gets its own rows trained too.

Sharp edges: the merged folder is merged on the CPU from the unquantised base (a QLoRA run trained against the
4-bit base, so the merged model differs from the trained one by the quantisation error of the base, not of the
adapters); ``PeftModel.from_pretrained`` needs a base with the same vocabulary size, so a base that Theta grew
by a pad row must be resized the same way first (the adapter folder holds the tokenizer for that).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from src.model.quantization import decoder_layers
from src.utils.common import UserError, atomic_dir

logger = logging.getLogger(__name__)

PEFT_MODES = ("none", "lora", "qlora")
ADAPTER_DIR = "adapter"  # models/<run>/adapter/: the best epoch's adapter in peft's format
QLORA_INSTALL = "pip install -r requirements-qlora.txt"


class AdapterError(UserError):
    """An adapter could not be set up as asked; the message names the flag and the fix."""


# ---------------------------------------------------------------------------------------------------------------
# Which layers: every linear layer of the decoder blocks
# ---------------------------------------------------------------------------------------------------------------

def is_linear(module: nn.Module) -> bool:
    """nn.Linear (and its subclasses, bitsandbytes' Linear4bit included) or GPT-2's Conv1D."""
    return isinstance(module, (nn.Linear, Conv1D))


def decoder_linear_names(model: nn.Module) -> list[str]:
    """The leaf names of every linear layer inside the decoder layers, sorted (``c_attn``, ``c_fc``, ``c_proj``
    for GPT-2; ``q_proj`` ... ``down_proj`` for Llama-like families)."""
    _, layers = decoder_layers(model)
    return sorted({name.rsplit(".", 1)[-1] for layer in layers for name, m in layer.named_modules()
                   if name and is_linear(m)})


def resolve_targets(model: nn.Module, requested: str | None) -> list[str]:
    """``--lora_target``: ``all`` (or empty) for every decoder-layer linear, else a comma list of leaf names that
    must each name one of them (an unknown name is a user error listing the choices)."""
    available = decoder_linear_names(model)
    if not requested or requested == "all":
        return available
    wanted = [w.strip() for w in requested.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in available]
    if unknown:
        raise AdapterError(f"--lora_target {requested}: {', '.join(unknown)} is not a linear layer of this model's "
                           f"decoder layers; choose from {', '.join(available)} (or all)")
    return wanted


def uses_conv1d(model: nn.Module) -> bool:
    """GPT-2 keeps its block weights as (in, out): peft must be told (``fan_in_fan_out``)."""
    _, layers = decoder_layers(model)
    return any(isinstance(m, Conv1D) for m in layers.modules())


# ---------------------------------------------------------------------------------------------------------------
# The configuration and the wrap
# ---------------------------------------------------------------------------------------------------------------

def embedding_names(model: nn.Module) -> tuple[str, str | None]:
    """Leaf names of the token embedding and, when it is not tied to it, the LM head."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(m): n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n}
    tied = head is not None and head.weight is emb.weight
    return names[id(emb)], (None if tied or head is None else names[id(head)])


def adapter_config(model: nn.Module, r: int = 16, alpha: float = 32.0, dropout: float = 0.05,
                   target: str | None = None, trainable_tokens: list[int] | tuple = ()):
    """peft's LoraConfig for ``model``: the decoder-layer linears (``target``), Conv1D's layout, and the rows of
    ``trainable_tokens`` (added tokens that are training targets) in the embedding and an untied head."""
    from peft import LoraConfig

    tokens = None
    if trainable_tokens:
        emb, head = embedding_names(model)
        tokens = {emb: sorted(trainable_tokens)}
        if head is not None:
            tokens[head] = sorted(trainable_tokens)
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=resolve_targets(model, target),
                      fan_in_fan_out=uses_conv1d(model), bias="none", task_type="CAUSAL_LM",
                      trainable_token_indices=tokens)


def wrap_with_adapters(model: nn.Module, config, gradient_checkpointing: bool = False, quantized: bool = False):
    """Freeze the base and add the adapters (returns the PeftModel; ``model`` is wrapped in place).

    Gradient checkpointing with a frozen base: the embedding output does not require grad, so a checkpointed
    block would get no gradient through it; ``enable_input_require_grads`` makes it. A 4-bit base first goes
    through peft's ``prepare_model_for_kbit_training`` (norms and other small layers in fp32)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    peft_model = get_peft_model(model, config)
    if gradient_checkpointing:
        peft_model.enable_input_require_grads()
    return peft_model


def trainable_count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (a 4-bit weight counts its unpacked elements)."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 if p.dtype == torch.uint8 else 1)  # Params4bit packs two 4-bit values per byte
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def added_target_tokens(base_vocab: int, vocab: int, target_ids) -> list[int]:
    """The token ids added past the base's ``base_vocab`` rows (ids ``base_vocab .. vocab-1``) that occur among
    ``target_ids`` (the training labels): the rows an adapter run must train."""
    added = set(range(base_vocab, vocab))
    return sorted(added & {int(t) for t in target_ids})


# ---------------------------------------------------------------------------------------------------------------
# QLoRA: the 4-bit NF4 base
# ---------------------------------------------------------------------------------------------------------------

def require_bitsandbytes():
    """Import bitsandbytes (only a QLoRA run needs it); a clear error with the install command when missing."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise AdapterError(f"--peft qlora needs the optional bitsandbytes package, which is not installed "
                           f"({err}). Install it with: {QLORA_INSTALL}  (or use --peft lora)") from None
    return bitsandbytes


def qlora_compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the GPU supports it, fp16 on older GPUs, fp32 on a CPU (whose half-precision paths are slow)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_4bit(source: str | Path, device: torch.device, **kwargs):
    """The base model ``source`` with every linear layer but the head in 4-bit NF4 with double quantisation."""
    require_bitsandbytes()
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=qlora_compute_dtype(device))
    device_map = {"": device.index if device.type == "cuda" and device.index is not None else str(device)}
    return AutoModelForCausalLM.from_pretrained(source, quantization_config=quant, device_map=device_map,
                                                dtype=torch.float32 if device.type == "cpu" else None, **kwargs)


def copy_resized_embeddings(model: nn.Module, reference: nn.Module) -> None:
    """Grow ``model``'s vocabulary to ``reference``'s and copy the added rows (input embedding and an untied head)
    from it, so a base loaded again (4-bit) has exactly the rows ThetaModel gave the full-precision one."""
    rows = reference.get_input_embeddings().weight.shape[0]
    old = model.get_input_embeddings().weight.shape[0]
    if rows == old:
        return
    model.resize_token_embeddings(rows, mean_resizing=False)
    with torch.no_grad():
        pairs = [(model.get_input_embeddings(), reference.get_input_embeddings())]
        head, ref_head = model.get_output_embeddings(), reference.get_output_embeddings()
        if head is not None and head.weight is not pairs[0][0].weight:
            pairs.append((head, ref_head))
        for mine, theirs in pairs:
            mine.weight[old:] = theirs.weight[old:].to(mine.weight.device, mine.weight.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Saving and merging
# ---------------------------------------------------------------------------------------------------------------

def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def save_adapter(peft_model, tokenizer, path: Path, base_source: str | Path | None = None) -> Path:
    """``path`` in peft's format (``adapter_config.json`` + ``adapter_model.safetensors``) plus the tokenizer,
    atomically; ``base_model_name_or_path`` names the base it loads on."""
    peft_model = unwrap(peft_model)
    config = peft_model.peft_config["default"]
    if base_source is not None:
        config.base_model_name_or_path = str(base_source)
    with atomic_dir(Path(path)) as tmp:
        peft_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(path)


def adapter_state(peft_model) -> dict[str, torch.Tensor]:
    """The adapter's tensors in peft's saved naming (what ``set_peft_model_state_dict`` reads)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(unwrap(peft_model)).items()}


def merge_adapter(base: nn.Module, peft_model) -> nn.Module:
    """A plain model: ``base`` (unquantised, on the CPU, same vocabulary) with ``peft_model``'s adapters folded
    into its weights (``W + (alpha / r) B A``; the trained token rows copied in). ``base`` is consumed."""
    from peft import get_peft_model, set_peft_model_state_dict

    source = unwrap(peft_model)
    config = source.peft_config["default"]
    with torch.random.fork_rng(devices=[]):  # the throwaway adapters' init must not move the run's generator
        target = get_peft_model(base, config)
    result = set_peft_model_state_dict(target, adapter_state(source))
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"merge: adapter tensors the base does not have: {result.unexpected_keys[:3]}")
    return target.merge_and_unload()
