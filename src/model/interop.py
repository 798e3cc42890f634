"""What other tools need from a saved model folder: the config fields they read and the tokenizer files they open.

``ThetaModel.save`` runs :func:`finish_saved_folder` on every folder it writes (``theta_best/``, ``theta_final/``,
the fp16/bf16 inference copies), so that the folder opens, unchanged, in:

- llama.cpp's ``convert_hf_to_gguf.py`` (GGUF for llama.cpp, Ollama, LM Studio). For GPT-2 it indexes
  ``hparams["n_ctx"]``, which transformers 5 no longer writes (``KeyError: 'n_ctx'``); for a sentencepiece model
  such as Phi-3-mini it opens ``tokenizer.model``, which a transformers-5 tokenizer save does not write.
- tools on transformers 4 (lm-evaluation-harness or vLLM installed against it; the converter's own pinned
  environment, transformers 4.57). transformers 5 writes the RoPE settings as ``rope_parameters`` only, a key
  transformers 4 does not read: it then builds the model with its default ``rope_theta`` of 10000 and no scaling,
  which for Llama-3 (500000, "llama3" scaling) or Qwen2.5 (1000000) is silently another model. The legacy
  ``rope_theta``, ``rope_scaling`` and ``partial_rotary_factor`` are written beside ``rope_parameters``. In
  tokenizer_config.json, transformers 5's ``TokenizersBackend`` class and its list-valued ``extra_special_tokens``
  stop transformers 4's AutoTokenizer; they are written as ``PreTrainedTokenizerFast`` and
  ``additional_special_tokens``. transformers 5 reads every such folder exactly as without these fields (tested:
  same config, token ids, chat template, logits); transformers 4.57.6 then reads the same token ids, template
  and logits (checked by hand, documentation/INTEROP.md).
- llama.cpp's converter for ``phi3`` takes the vocabulary from ``tokenizer.model`` unless tokenizer_config.json
  names ``GPT2Tokenizer`` (as Phi-4-mini does): a byte-level BPE tokenizer without ``tokenizer.model`` is named
  so.

:func:`keep_source_tokenizer` gives an inference copy the tokenizer files (and chat template) of the folder it was
made from. documentation/INTEROP.md has the commands.

    from src.model.interop import export_compat_fields, finish_saved_folder
    config = export_compat_fields(json.loads(Path("config.json").read_text()), "gpt2")      # + n_ctx
    finish_saved_folder(Path("models/<run>/theta_final"), source="HuggingFaceTB/SmolLM2-360M-Instruct")
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

# The tokenizer files a Hugging Face folder may hold (transformers 4 and 5, fast and sentencepiece tokenizers).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt")
# Files a transformers-5 tokenizer save may leave out that other tools open: llama.cpp reads a sentencepiece
# model's vocabulary and scores from tokenizer.model (Phi-3-mini, Llama-2, Mistral-7B-v0.1 style tokenizers).
SOURCE_ONLY_FILES = ("tokenizer.model",)
# The RoPE families Theta supports; GPT-2 has learned positions instead.
ROPE_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "phi3")


def export_compat_fields(config: dict, model_type: str) -> dict:
    """``config`` (a config.json's dict) plus the fields other tools read that transformers 5 leaves out.

    - ``gpt2``: ``n_ctx``, the context length under its old name (= ``n_positions``), which llama.cpp's converter
      indexes directly.
    - RoPE families: ``rope_theta`` from ``rope_parameters``; ``rope_scaling`` (the parameters without the base)
      when the RoPE type is not the default, removed when it is; ``partial_rotary_factor`` when below 1.
      Per-layer-type RoPE parameters (nested dicts, not in the supported families) are left alone.
    Other model types come back unchanged. Returns a new dict; running it again changes nothing.
    """
    out = dict(config)
    if model_type == "gpt2":
        if "n_positions" in out:
            out["n_ctx"] = out["n_positions"]
        return out
    rope = out.get("rope_parameters")
    if model_type not in ROPE_FAMILIES or not isinstance(rope, dict) or "rope_theta" not in rope:
        return out
    out["rope_theta"] = rope["rope_theta"]
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        out.pop("rope_scaling", None)
    else:
        out["rope_scaling"] = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    factor = rope.get("partial_rotary_factor")
    if factor is not None and factor < 1.0:
        out["partial_rotary_factor"] = factor
    return out


def _source_file(source: Path | str | None, name: str, cache_dir: Path | None = None) -> Path | None:
    """``name`` in the model ``source`` (a folder, or a hub id's local cache, ``cache_dir`` or the default one;
    never a download), or None."""
    if source is None:
        return None
    folder = Path(source)
    if folder.is_dir():
        return folder / name if (folder / name).is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(str(source), name, cache_dir=cache_dir)
    except Exception:  # not a valid hub id (a path that does not exist): nothing to copy
        return None
    return Path(found) if isinstance(found, str) else None


def export_tokenizer_fields(tokenizer_config: dict, model_type: str, byte_level_bpe: bool = False,
                            sentencepiece: bool = False) -> dict:
    """``tokenizer_config`` (a tokenizer_config.json's dict) with the fields transformers 4 and llama.cpp's
    converter read: ``TokenizersBackend`` (transformers 5's generic fast tokenizer, unknown to 4) becomes
    ``PreTrainedTokenizerFast``; a list of ``extra_special_tokens`` (5's name) becomes
    ``additional_special_tokens`` (4 reads ``extra_special_tokens`` as a dict and fails on a list); a ``phi3``
    folder whose tokenizer is a byte-level BPE (``byte_level_bpe``) without a ``tokenizer.model``
    (``sentencepiece``) names ``GPT2Tokenizer``. Returns a new dict; running it again changes nothing."""
    out = dict(tokenizer_config)
    if out.get("tokenizer_class") == "TokenizersBackend":
        out["tokenizer_class"] = "PreTrainedTokenizerFast"
    if isinstance(out.get("extra_special_tokens"), list):
        extra = out.pop("extra_special_tokens")
        out["additional_special_tokens"] = list(dict.fromkeys(out.get("additional_special_tokens", []) + extra))
    if model_type == "phi3" and byte_level_bpe and not sentencepiece:
        out["tokenizer_class"] = "GPT2Tokenizer"
    return out


def is_byte_level_bpe(tokenizer_json: dict) -> bool:
    """Whether a tokenizer.json describes a GPT-2-style tokenizer: a BPE model behind a ByteLevel pre-tokenizer."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return (tokenizer_json.get("model") or {}).get("type") == "BPE" and \
        any((step or {}).get("type") == "ByteLevel" for step in steps)


def _rewrite_json(path: Path, update) -> None:
    """``path``'s JSON through ``update`` (dict -> dict), written back only when it changed, in transformers' own
    layout (indent 2, sorted keys)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    new = update(data)
    if new != data:
        path.write_text(json.dumps(new, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def export_tokenizer_config(folder: Path, model_type: str) -> None:
    """:func:`export_tokenizer_fields` applied to ``folder``'s tokenizer_config.json (when there is one)."""
    path = Path(folder) / "tokenizer_config.json"
    if not path.is_file():
        return
    tok_json = Path(folder) / "tokenizer.json"
    bpe = tok_json.is_file() and is_byte_level_bpe(json.loads(tok_json.read_text(encoding="utf-8")))
    sentencepiece = (Path(folder) / "tokenizer.model").is_file()
    _rewrite_json(path, lambda c: export_tokenizer_fields(c, model_type, bpe, sentencepiece))


def finish_saved_folder(folder: Path, source: Path | str | None = None) -> None:
    """Make a just-written model ``folder`` open in other tools: the compat fields in its config.json
    (:func:`export_compat_fields`), the tokenizer files of ``source`` (the folder or hub id the model was loaded
    from) that the tokenizer save did not write (``tokenizer.model``), and the tokenizer_config.json fields
    (:func:`export_tokenizer_fields`).

    Called inside ``ThetaModel.save``'s temporary folder (atomic as a whole), so the files are written in place.
    """
    folder = Path(folder)
    model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type", "")
    _rewrite_json(folder / "config.json", lambda c: export_compat_fields(c, model_type))
    _copy_source_only_files(source, folder)
    export_tokenizer_config(folder, model_type)


def _copy_source_only_files(source: Path | str | None, folder: Path) -> None:
    for name in SOURCE_ONLY_FILES:
        found = _source_file(source, name)
        if found is not None and not (folder / name).exists():
            shutil.copyfile(found, folder / name)


def _same_tokenizer(tokenizer, other) -> bool:
    return (tokenizer.get_vocab() == other.get_vocab() and tokenizer.chat_template == other.chat_template
            and tokenizer.all_special_tokens == other.all_special_tokens)


def keep_source_tokenizer(source: Path, folder: Path, tokenizer) -> bool:
    """Give ``folder`` the tokenizer files of the model folder ``source`` it was made from (chat template
    included; files ``source`` lacks removed; byte for byte when ``source`` was written by Theta, else with the
    fields of :func:`export_tokenizer_fields`), when ``tokenizer`` (the one in memory, already saved into
    ``folder``) is the same tokenizer as ``source``'s; returns whether it did.

    When the loader changed the tokenizer (a pad token added to a folder that had none), the files just saved
    describe the model's vocabulary and stay; only the files the save does not write (``tokenizer.model``) are
    copied.
    """
    from transformers import AutoTokenizer

    source, folder = Path(source), Path(folder)
    try:
        same = _same_tokenizer(tokenizer, AutoTokenizer.from_pretrained(source))
    except (OSError, ValueError) as err:
        logger.warning("could not read the tokenizer of %s (%s): %s keeps the tokenizer as saved", source, err,
                       folder)
        same = False
    if same:
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, folder / name)
            elif (folder / name).exists():
                (folder / name).unlink()
    else:
        _copy_source_only_files(source, folder)
    config = folder / "config.json"
    model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type", "") if config.is_file() else ""
    export_tokenizer_config(folder, model_type)
    return same
