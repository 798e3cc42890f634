"""ThetaModel: the one small wrapper around a Hugging Face causal LM that every part of Theta uses.

It loads a model from any source Theta accepts (``theta-tiny``, a hub name from the hub or its cache, a local
folder) of the supported families (gpt2, llama, qwen2, qwen3, mistral, phi3: src/model/families.py) through the
Auto classes, keeping the architecture the folder says; prompts it in its format (``prompt_format``: Q&A or the chat
template, src/model/prompt_format.py), generates answers and saves
Hugging Face folders that plain ``transformers`` loads too (documentation/ARCHITECTURE.md, documentation/MODELS.md).

    python -m src.model.theta_model generate --model_path models/<run>/theta_final --prompt "What is a firewall?"
    python -m src.model.theta_model chat --model_path models/<run>/theta_final
    python src/model/theta_model.py build-tiny            # (re)build the offline theta-tiny base model

Model sources (``model_name``):
- ``theta-tiny``: GPT-2 architecture at a small size, seeded random init, with a byte-level BPE tokenizer
  trained on the data a run reads from ``Datasets/``; built once, cached under ``models/base/theta-tiny/`` and
  rebuilt when that data changes. Needs no download.
- a local folder holding a ``save_pretrained`` model and tokenizer (``theta_final/``, ``theta_best/``, a SmolLM2 or
  Qwen2.5 download...).
- a hub name (``gpt2``, ``HuggingFaceTB/SmolLM2-135M``, ``Qwen/Qwen2.5-0.5B``): the local Hugging Face cache, or a
  download when online.
Any other model type, remote code, or a feature a step cannot handle is refused before the weights load
(``families.check_support``); nothing is ever loaded as another class.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

if __package__ in (None, ""):  # run as a file: make `src` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GPT2Config, GPT2LMHeadModel,
                          GPT2TokenizerFast, PretrainedConfig, PreTrainedModel)

from src.model.families import ModelFamily, UnsupportedModel, check_support, dropout_overrides, family_of
from src.model.prompt_format import (FORMAT_NAMES, PromptFormat, PromptFormatError, qa_split, resolve_format,
                                     write_prompt_format)
from src.model.quantization import (QUANTIZED_MARKER, QUANTIZED_WEIGHTS, fit_dtype_to_device, load_quantized_model,
                                    placement)
from src.utils.common import FlagParser, PROJECT_ROOT, UserError, atomic_dir

logger = logging.getLogger(__name__)

DEFAULT_DATASETS_DIR = PROJECT_ROOT / "Datasets"
BASE_MODELS_DIR = PROJECT_ROOT / "models" / "base"
TINY_NAME = "theta-tiny"

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

# theta-tiny: small enough for a whole pipeline in minutes on 2 CPU cores, big enough to learn something.
TINY_CONFIG = dict(n_layer=4, n_embd=256, n_head=4, n_positions=512, vocab_size=1024)
TINY_SEED = 1234



@contextmanager
def no_hf_progress_bars():
    """Hugging Face's progress bars off for the block (loading and saving a model print one each)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


class ThetaModelError(UserError):
    """A model could not be had or used; the message says what to do. Entry points print it, no traceback."""


# ---------------------------------------------------------------------------------------------------------------
# Prompt format: src/model/prompt_format.py (Q&A and chat templates); these two name its Q&A text
# ---------------------------------------------------------------------------------------------------------------

def split_prompt(question: str, answer: str | None = None, context: str | None = None) -> tuple[str, str]:
    """``(prompt, completion)`` text of Theta's Q&A format with GPT-2's ``<|endoftext|>`` (prompt_format.qa_split).

    ``prompt + completion`` is the training text. The completion starts with the space after ``Answer:`` so a
    byte-level BPE tokenizer joins it to the first answer word exactly as it will during generation, and it
    ends with the end-of-text token. Without an answer the completion is empty. Token ids come from a model's
    ``prompt_format`` (QAFormat or ChatFormat), which every step uses.
    """
    return qa_split(question, answer, context, eos_text=EOS_TOKEN)


def format_prompt(question: str, answer: str | None = None, context: str | None = None) -> str:
    """``Question: {question}\\nAnswer: {answer}<eos>`` (``Context: ...`` first when given; no answer: the prompt)."""
    prompt, completion = split_prompt(question, answer, context)
    return prompt + completion


# ---------------------------------------------------------------------------------------------------------------
# theta-tiny: the offline base model
# ---------------------------------------------------------------------------------------------------------------

def iter_corpus_texts(datasets_dir: Path) -> Iterator[str]:
    """Training text of the data files a run reads, in a fixed order (sorted paths): each record's question,
    answer and context, through data preparation's readers, so every format it reads counts (CSV and chats
    included) and the same files do: the user's, or the shipped sample when ``datasets_dir`` holds none of the
    user's (src/utils/data_layout.py). Held-out sets and Theta's own outputs are never read.

    Unreadable files and records are skipped here: data preparation and the pre-flight report them.
    """
    from src.data_processing.loading import DropLog, iter_all_datasets  # the readers; nothing heavy at import

    for rec in iter_all_datasets(Path(datasets_dir), drops=DropLog()):
        for key in ("question", "answer", "context"):
            value = rec.get(key)
            if isinstance(value, str) and value.strip():
                yield value


def train_tiny_tokenizer(texts: list[str], vocab_size: int) -> GPT2TokenizerFast:
    """Byte-level BPE (GPT-2's scheme) trained on ``texts``; deterministic for the same texts and size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)
    return GPT2TokenizerFast(tokenizer_object=bpe, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
                             unk_token=EOS_TOKEN, pad_token=PAD_TOKEN)


def build_tiny_model(output_dir: Path, datasets_dir: Path = DEFAULT_DATASETS_DIR, **config_overrides) -> Path:
    """Build ``theta-tiny`` into ``output_dir`` (atomically) and return it.

    Same data, same config: byte-identical files. ``config_overrides`` (e.g. ``n_layer=2, vocab_size=384``)
    make the even smaller models the tests use. The global random generator is left as it was (the weights come
    from a generator of their own), so building it inside a seeded run changes nothing that run draws.
    """
    texts = list(iter_corpus_texts(datasets_dir))
    model, tokenizer = _build_tiny(output_dir, datasets_dir, texts, {**TINY_CONFIG, **config_overrides})
    logger.info("built %s (%.2fM parameters, vocabulary %d) from %d texts in %s into %s", TINY_NAME,
                model.num_parameters() / 1e6, len(tokenizer), len(texts), datasets_dir, output_dir)
    return Path(output_dir)


def _build_tiny(output_dir: Path, datasets_dir: Path, texts: list[str], cfg: dict):
    if not texts:
        raise ThetaModelError(f"cannot build {TINY_NAME}: no training text found under {datasets_dir}. "
                              "Put question-answer files (*.json, *.jsonl, *.csv...) there; see Datasets/README.md.")
    tokenizer = train_tiny_tokenizer(texts, cfg["vocab_size"])
    config = GPT2Config(**{**cfg, "vocab_size": len(tokenizer)}, activation_function="gelu_pytorch_tanh",
                        bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    # The weights' init draws from the global generator: fork it, so a run that seeded before loading theta-tiny
    # draws the same numbers afterwards whether this build happened (a fresh clone) or not (issue 21.7).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = GPT2LMHeadModel(config)
    meta = {"name": TINY_NAME, "config": cfg, "seed": TINY_SEED, "datasets_dir": str(datasets_dir),
            "corpus_texts": len(texts), "corpus_sha256": corpus_digest(texts)}
    ThetaModel.from_parts(model, tokenizer).save(output_dir, extra_files={"theta_tiny.json": meta})
    return model, tokenizer


def corpus_digest(texts: list[str]) -> str:
    return hashlib.sha256("\0".join(texts).encode("utf-8", "surrogatepass")).hexdigest()


def tiny_model_dir(datasets_dir: Path = DEFAULT_DATASETS_DIR, base_dir: Path = BASE_MODELS_DIR) -> Path:
    """The cached ``theta-tiny`` folder, built on first use and rebuilt, once, when the data it was built from
    changed (its tokenizer is trained on that data), with one line saying so.

    A run resumed by the overnight script started from the same data (its fingerprint), so it finds the same
    tokenizer here.
    """
    path = Path(base_dir) / TINY_NAME
    texts = list(iter_corpus_texts(datasets_dir))
    digest = corpus_digest(texts)
    meta = {}
    if (path / "config.json").exists():
        try:
            meta = json.loads((path / "theta_tiny.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            meta = {}
        if meta.get("corpus_sha256") == digest:
            return path
    _build_tiny(path, datasets_dir, texts, dict(TINY_CONFIG))
    if meta:
        logger.info("%s: the data in %s changed since it was built (%s texts then, %d now): rebuilt its tokenizer "
                    "and weights in %s", TINY_NAME, datasets_dir, meta.get("corpus_texts", "?"), len(texts), path)
    else:
        logger.info("%s: built from the %d texts in %s into %s (a tokenizer of its own, seeded weights)", TINY_NAME,
                    len(texts), datasets_dir, path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# ThetaModel
# ---------------------------------------------------------------------------------------------------------------

def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_model_folder(path: Path) -> None:
    """Raise a ThetaModelError naming what a model folder lacks (an UnsupportedModel for a model Theta refuses)."""
    if not path.is_dir():
        raise ThetaModelError(f"model folder not found: {path}")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    else:  # an unsupported model is refused for what it is, before what it lacks (config alone suffices)
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = None  # unreadable: the loader says so
        if isinstance(config, dict) and config.get("model_type"):
            check_support(config, name=str(path))
    if (path / QUANTIZED_MARKER).is_file():
        if not (path / QUANTIZED_WEIGHTS).is_file():
            missing.append(QUANTIZED_WEIGHTS)
    elif not any((path / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json",
                                                  "pytorch_model.bin")):
        missing.append("model.safetensors")
    if not any((path / n).is_file() for n in ("tokenizer.json", "vocab.json", "tokenizer.model")):
        missing.append("tokenizer.json")
    if missing:
        raise ThetaModelError(f"{path} is not a model folder: missing {', '.join(missing)}. Point --model_path at a "
                              "folder written by save_pretrained (e.g. models/<run>/theta_final).")


SPARE_MARKERS = ("reserved", "placeholder", "<pad>", "[pad]", "<|pad|>", "_pad|>", "<|finetune_right_pad_id|>")
# ("_pad|>": Qwen2.5's <|fim_pad|> and <|vision_pad|>, unused by text Q&A)


def spare_special_token(tokenizer, stop_ids: set[int]) -> str | None:
    """A special token of the tokenizer that nothing uses, to serve as pad: a reserved or placeholder token (Llama-3's
    ``<|reserved_special_token_0|>``, Phi-3's ``<|placeholder1|>``) or a pad token the tokenizer lists but does not
    name as pad. Never an EOS id, BOS, UNK or a token the chat template writes. The lowest id wins; None if none."""
    template = str(getattr(tokenizer, "chat_template", None) or "")
    taken = set(stop_ids) | {tokenizer.bos_token_id, tokenizer.unk_token_id}
    found = []
    for tid, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        text = str(added)
        if getattr(added, "special", False) and tid not in taken and text not in template \
                and any(m in text.lower() for m in SPARE_MARKERS):
            found.append((tid, text))
    return min(found)[1] if found else None


class ThetaModel:
    """A causal LM of a supported family (``AutoModelForCausalLM``) and its tokenizer (``AutoTokenizer``), with
    Theta's special tokens and prompt format.

    ``dropout`` (``--dropout P``) sets every dropout field of the family (families.ModelFamily.dropout_fields) as
    the model is built: Llama, Qwen, Mistral and Phi-3 ship with none, which R-Drop needs.

    >>> tm = ThetaModel("theta-tiny")
    >>> tm.generate("What is a firewall?", max_length=32, seed=0)
    """

    def __init__(self, model_name: str = "gpt2", device: str | torch.device | None = None,
                 datasets_dir: Path | str = DEFAULT_DATASETS_DIR, base_dir: Path | str = BASE_MODELS_DIR,
                 dropout: float | None = None):
        self.model_name = str(model_name)
        self.device = resolve_device(device)
        path = self._resolve_source(self.model_name, Path(datasets_dir), Path(base_dir))
        self.model, self.tokenizer = self._load(path, dropout)
        self.source_path = path
        self._ensure_special_tokens()
        self.prompt_format = resolve_format("auto", self.tokenizer, path if isinstance(path, Path) else None,
                                            self.model_name)  # the folder's recorded format, else the template's
        self._use_fused_gelu()
        self.model.to(self.device)

    @classmethod
    def from_parts(cls, model: PreTrainedModel, tokenizer, device: str | torch.device | None = None,
                   prompt_format: str | PromptFormat | None = None) -> "ThetaModel":
        """Wrap an existing model and tokenizer (no loading); ``prompt_format`` (``auto``, ``qa``, ``chat`` or a
        format object) defaults to auto."""
        self = cls.__new__(cls)
        self.model_name, self.source_path = getattr(model.config, "name_or_path", ""), None
        self.model, self.tokenizer = model, tokenizer
        self.device = resolve_device(device) if device is not None else next(model.parameters()).device
        self._ensure_special_tokens()
        self.prompt_format = resolve_format(prompt_format, tokenizer, model_name=self.model_name)
        self._use_fused_gelu()
        self.model.to(self.device)
        return self

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> "ThetaModel":
        """Load a folder written by :meth:`save` (or any ``save_pretrained`` folder of a supported family)."""
        path = Path(path)
        check_model_folder(path)
        tm = cls(str(path), device=placement(path, resolve_device(device)))
        fit_dtype_to_device(tm.model, tm.device)
        return tm

    # --- what the model is ---------------------------------------------------------------------------------
    @property
    def family(self) -> ModelFamily:
        """The model's family (families.FAMILIES): what each step and technique does on it."""
        return family_of(self.model.config)

    @property
    def context_length(self) -> int:
        """The most tokens the model reads: ``max_position_embeddings`` (GPT2Config maps it to ``n_positions``)."""
        return int(self.model.config.max_position_embeddings)

    @property
    def stop_ids(self) -> list[int]:
        """The ids that end an answer: the prompt format's trained end (the chat template's end of turn, or the EOS),
        the tokenizer's EOS, then every EOS id of the generation config (Llama-3 and Phi-3 list two: end of text and
        end of turn), then the config's; each once, in that order."""
        fmt = getattr(self, "prompt_format", None)  # not yet set while the special tokens are sorted out
        ids = fmt.stop_ids(self.model.generation_config) if fmt is not None else [self.tokenizer.eos_token_id]
        for source in (getattr(self.model, "generation_config", None), self.model.config):
            eos = getattr(source, "eos_token_id", None)
            ids += eos if isinstance(eos, (list, tuple)) else [eos]
        return [int(i) for i in dict.fromkeys(ids) if i is not None]

    # --- loading -------------------------------------------------------------------------------------------
    @staticmethod
    def _resolve_source(name: str, datasets_dir: Path, base_dir: Path) -> Path | str:
        if name == TINY_NAME:
            return tiny_model_dir(datasets_dir, base_dir)
        path = Path(name).expanduser()
        if path.exists() or name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or "\\" in name:
            check_model_folder(path)  # a local folder: it must be complete
            return path
        return name  # a hub id

    @staticmethod
    def _load(source: Path | str, dropout: float | None = None):
        """(model, tokenizer) through the Auto classes, after the config passed ``check_support``.

        The config is read as a plain dict first (``get_config_dict``: no class is built, no code runs), so an
        unsupported type or remote code is refused before anything loads; the loaded model's ``model_type`` is
        then checked against the folder's (never another class)."""
        if isinstance(source, Path) and (source / QUANTIZED_MARKER).is_file():  # an int8 inference folder
            check_support(PretrainedConfig.get_config_dict(str(source))[0], name=str(source))
            return load_quantized_model(source), AutoTokenizer.from_pretrained(source)
        if isinstance(source, Path):
            return ThetaModel._load_checked(source, dropout)
        try:  # the local cache first: no network when the weights are already here
            return ThetaModel._load_checked(source, dropout, local_files_only=True)
        except OSError:
            pass
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            raise ThetaModelError(_offline_message(source, "HF_HUB_OFFLINE is set"))
        try:
            return ThetaModel._load_checked(source, dropout)
        except UnsupportedModel:
            raise
        except Exception as err:  # network, DNS, 404: all mean "cannot be had from here"
            raise ThetaModelError(_offline_message(source, f"{type(err).__name__}: {str(err).splitlines()[0]}")) \
                from err

    @staticmethod
    def _load_checked(source: Path | str, dropout: float | None, **hub):
        config = PretrainedConfig.get_config_dict(str(source), **hub)[0]
        family = check_support(config, name=str(source))
        overrides = dropout_overrides(config, dropout) if dropout is not None else {}
        with no_hf_progress_bars():  # no "Loading weights" bar on the console or in the logs
            model = AutoModelForCausalLM.from_pretrained(source, **hub, **overrides)
        if model.config.model_type != family.model_type:
            raise UnsupportedModel(f"{source}: config.json says model_type '{family.model_type}' but the Auto "
                                   f"classes built a {type(model).__name__} ('{model.config.model_type}'); "
                                   "Theta never trains a model as another class.")
        head = model.get_output_embeddings()
        check_support(model.config, name=str(source), lm_head_bias=getattr(head, "bias", None) is not None)
        return model, AutoTokenizer.from_pretrained(source, **hub)

    def _use_fused_gelu(self) -> None:
        """Swap GPT-2's ``gelu_new`` (about eight small elementwise kernels) for ``gelu_pytorch_tanh``.

        Both compute the same tanh approximation of GELU (they differ by ~2e-7); the fused one is one kernel, which
        measured 1.2-1.7x per training step on theta-tiny. The config records it, so saved models keep it.
        """
        from transformers.activations import ACT2FN

        cfg = self.model.config
        if cfg.model_type != "gpt2" or getattr(cfg, "activation_function", None) != "gelu_new" \
                or not hasattr(self.model, "transformer"):
            return
        cfg.activation_function = "gelu_pytorch_tanh"
        for block in self.model.transformer.h:
            if hasattr(block.mlp, "act"):
                block.mlp.act = ACT2FN["gelu_pytorch_tanh"]

    def _ensure_special_tokens(self) -> None:
        """An EOS; a pad token distinct from every EOS id (a spare special token of the tokenizer where it has one,
        else an added ``<|pad|>``); new embedding rows, input and output, start at the mean of the existing ones."""
        tok = self.tokenizer
        # add_special_tokens puts a missing token into the vocabulary; assigning tok.pad_token alone would not
        # (its id would silently resolve to an existing token).
        if tok.eos_token is None or tok.convert_tokens_to_ids(tok.eos_token) is None:
            tok.add_special_tokens({"eos_token": EOS_TOKEN})
        stops = set(self.stop_ids)
        pad_id = tok.pad_token_id if tok.pad_token is not None else None
        if pad_id is None or pad_id in stops or (tok.unk_token_id is not None and pad_id == tok.unk_token_id
                                                 and tok.pad_token != tok.unk_token):
            spare = spare_special_token(tok, stops)
            if spare is not None:  # Llama-3's reserved tokens, Phi-3's placeholders: no new row at all
                tok.pad_token = spare
            else:
                tok.add_special_tokens({"pad_token": PAD_TOKEN})
        old_rows = self.model.get_input_embeddings().weight.shape[0]
        if len(tok) > old_rows:
            self._init_new_rows(old_rows)
        cfg = self.model.config
        bos = tok.bos_token_id if tok.bos_token_id is not None else cfg.bos_token_id
        cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id = tok.pad_token_id, tok.eos_token_id, bos
        gen = self.model.generation_config
        stop_ids = self.stop_ids  # the tokenizer's EOS first, then the generation config's own (kept)
        gen.pad_token_id, gen.bos_token_id = tok.pad_token_id, bos
        gen.eos_token_id = stop_ids[0] if len(stop_ids) == 1 else stop_ids

    def _init_new_rows(self, old_rows: int) -> None:
        """Grow the embedding (and an untied LM head) to the tokenizer; the new rows start at the mean of the
        ``old_rows`` existing ones: the new token then neither dominates the softmax nor starts in an odd corner of
        the embedding space. (A tokenizer smaller than the matrix, as Qwen's padded vocabulary, needs no new row.)"""
        self.model.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        with torch.no_grad():
            inp, out = self.model.get_input_embeddings(), self.model.get_output_embeddings()
            for weight in {id(w): w for w in (inp.weight, out.weight if out is not None else None)
                           if w is not None}.values():  # a tied head is the same tensor: once
                weight[old_rows:] = weight[:old_rows].mean(dim=0, keepdim=True)  # (V, C)

    # --- saving --------------------------------------------------------------------------------------------
    def save(self, path: str | Path, extra_files: dict[str, dict] | None = None) -> Path:
        """Write a Hugging Face folder (safetensors, tokenizer, generation config) atomically.

        Through ``atomic_dir``: written next to its destination under a temporary name, fsynced, then swapped into
        place, so a crash leaves the previous version intact and the folder is never absent.
        """
        from src.model.adapters import unwrap
        from src.model.interop import finish_saved_folder

        path, model = Path(path), unwrap(self.model)  # DDP, torch.compile
        with atomic_dir(path) as tmp:
            with no_hf_progress_bars():  # no "Writing model shards" bar in every epoch's log
                model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            finish_saved_folder(tmp, self.source_path)  # the fields and files other tools read (interop.py)
            write_prompt_format(tmp, getattr(self, "prompt_format", None))  # format, chat template, stop ids
            for name, content in (extra_files or {}).items():
                (tmp / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return path

    # --- generation ----------------------------------------------------------------------------------------
    def generate_with_stats(self, prompt: str, max_length: int = 256, temperature: float = 0.8, top_p: float = 0.9,
                            top_k: int = 50, repetition_penalty: float = 1.2, seed: int | None = None,
                            context: str | None = None, history: list[tuple[str, str]] | None = None,
                            system: str | None = None) -> dict:
        """Answer ``prompt`` (the user's question); returns ``{"text", "new_tokens", "seconds", "tokens_per_sec"}``.

        ``max_length`` is the most new tokens to produce (capped by the model's context size). Generation stops
        at the prompt format's stop ids (its trained end, the EOS ids). ``temperature == 0`` is greedy decoding.
        ``history`` (earlier ``(question, answer)`` turns) and ``system`` go to the prompt format.
        """
        return self.generate_batch([prompt], max_length, temperature, top_p, top_k, repetition_penalty, seed,
                                   [context], [history or []], system)[0]

    @torch.no_grad()
    def generate_batch(self, prompts: list[str], max_length: int = 256, temperature: float = 0.8, top_p: float = 0.9,
                       top_k: int = 50, repetition_penalty: float = 1.2, seed: int | None = None,
                       contexts: list[str | None] | None = None,
                       histories: list[list[tuple[str, str]]] | None = None,
                       system: str | None = None) -> list[dict]:
        """Answer several questions in one ``generate`` call: one decoding step per new token for all of them.

        The prompts come from ``self.prompt_format`` (Q&A or the chat template; ``contexts``, ``histories`` and
        ``system`` go into it) and are padded on the left (with the attention mask, so each row's positions and
        attention are its own); greedy answers equal :meth:`generate_with_stats`'s one by one (tested). Returns
        one dict per prompt, in order, as :meth:`generate_with_stats` does (``seconds`` is the whole batch's time).
        """
        if temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not prompts:
            return []
        n = len(prompts)
        records = [{"question": p, "context": c, "history": h, "system": system}
                   for p, c, h in zip(prompts, contexts or [None] * n, histories or [None] * n)]
        fmt = self.prompt_format
        tok = self.tokenizer
        side, tok.padding_side = tok.padding_side, "left"
        try:
            enc = tok.pad({"input_ids": fmt.encode_prompts(records)}, padding=True,
                          return_tensors="pt").to(self.device)  # (N, P)
        finally:
            tok.padding_side = side
        n_prompt = enc["input_ids"].shape[1]  # the longest prompt (the others are padded to it)
        room = self.context_length - n_prompt
        if room <= 0:
            raise ThetaModelError(f"the question is {n_prompt} tokens long; this model reads at most "
                                  f"{self.context_length}. Shorten it.")
        sampling = temperature > 0
        stops = self.stop_ids  # the format's trained end, then the model's EOS ids (Llama-3, Phi-3 list two)
        gen = GenerationConfig(
            max_new_tokens=min(max_length, room), do_sample=sampling,
            temperature=temperature if sampling else None, top_p=top_p if sampling else None,
            top_k=top_k if sampling else None, repetition_penalty=repetition_penalty,
            eos_token_id=stops[0] if len(stops) == 1 else stops, pad_token_id=tok.pad_token_id)
        was_training = self.model.training
        self.model.eval()
        rng = torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []) \
            if seed is not None else nullcontext()
        start = time.perf_counter()
        with rng:
            if seed is not None:
                torch.manual_seed(seed)
            out = self.model.generate(**enc, generation_config=gen)  # (N, P + new)
        seconds = time.perf_counter() - start
        self.model.train(was_training)
        results = []
        stop_ids = torch.tensor(stops, device=out.device)
        for row in out[:, n_prompt:]:
            ends = torch.isin(row, stop_ids).nonzero()
            new = row[:int(ends[0]) + 1] if len(ends) else row  # up to and including the first stop token
            n_new = int(new.numel())
            results.append({"text": tok.decode(new, skip_special_tokens=True).strip(), "new_tokens": n_new,
                            "seconds": seconds, "tokens_per_sec": n_new / seconds if seconds > 0 else 0.0})
        return results

    def generate(self, prompt: str, max_length: int = 256, temperature: float = 0.8, top_p: float = 0.9,
                 top_k: int = 50, repetition_penalty: float = 1.2, seed: int | None = None,
                 context: str | None = None, history: list[tuple[str, str]] | None = None,
                 system: str | None = None) -> str:
        """Answer text only, for ``prompt`` (the user's question); see :meth:`generate_with_stats`."""
        return self.generate_with_stats(prompt, max_length, temperature, top_p, top_k, repetition_penalty,
                                        seed, context, history, system)["text"]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def _offline_message(name: str, why: str) -> str:
    return (f"cannot load the hub model '{name}': it is not in the local Hugging Face cache and could not be "
            f"downloaded ({why}). Either download it once while online (python -c \"from transformers import "
            f"AutoModelForCausalLM, AutoTokenizer; AutoModelForCausalLM.from_pretrained('{name}'); "
            f"AutoTokenizer.from_pretrained('{name}')\"), point --model_name at a local model folder, or use "
            f"--model_name {TINY_NAME}, which needs no download.")


# ---------------------------------------------------------------------------------------------------------------
# Command line: generate, chat, build-tiny
# ---------------------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = FlagParser(prog="python -m src.model.theta_model",
                        description="Try a Theta model: one answer, or an interactive chat.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("generate", "answer one question"), ("chat", "interactive questions and answers")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--model_path", type=str, required=True,
                       help="model folder (e.g. models/<run>/theta_final), a hub name, or theta-tiny")
        if name == "generate":
            p.add_argument("--prompt", type=str, required=True, help="the question to answer")
        p.add_argument("--max_length", type=int, default=256, help="most new tokens per answer (default 256)")
        p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (default 0.8)")
        p.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling mass (default 0.9)")
        p.add_argument("--top_k", type=int, default=50, help="top-k sampling (default 50)")
        p.add_argument("--repetition_penalty", type=float, default=1.2, help="repetition penalty (default 1.2)")
        p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
        p.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
        p.add_argument("--prompt_format", choices=FORMAT_NAMES, default="auto",
                       help="auto (default: the format the folder was trained in, else the chat template when "
                            "the tokenizer has one, else Q&A), qa or chat (documentation/PROMPT_FORMATS.md)")
    b = sub.add_parser("build-tiny", help=f"(re)build the offline {TINY_NAME} base model from Datasets/")
    b.add_argument("--datasets_dir", type=Path, default=DEFAULT_DATASETS_DIR, help="training data folder")
    b.add_argument("--output_dir", type=Path, default=BASE_MODELS_DIR / TINY_NAME, help="where to write it")
    args = parser.parse_args(argv)
    if args.command != "build-tiny":
        checks = [(args.max_length < 1, "--max_length must be at least 1"),
                  (args.temperature < 0, "--temperature must be >= 0"),
                  (not 0 < args.top_p <= 1, "--top_p must be in (0, 1]"),
                  (args.top_k < 0, "--top_k must be >= 0"),
                  (args.repetition_penalty <= 0, "--repetition_penalty must be > 0")]
        for bad, message in checks:
            if bad:
                parser.error(message)
    return args


def _answer(tm: ThetaModel, question: str, args: argparse.Namespace,
            history: list[tuple[str, str]] | None = None) -> dict:
    return tm.generate_with_stats(question, args.max_length, args.temperature, args.top_p, args.top_k,
                                  args.repetition_penalty, args.seed, history=history)


def _shown(out: dict) -> str:
    return f"{out['text']}\n[{out['new_tokens']} tokens, {out['tokens_per_sec']:.1f} tokens/s]"


class Conversation:
    """The chat's memory: earlier ``(question, answer)`` turns, which the model's prompt format renders.

    In the Q&A format they become the prompt's ``Context:`` lines (``Question: q\nAnswer: a`` each, without the
    end-of-text token, which would tell the model the text ends there); in the chat format they are user and
    assistant messages of the chat template. The prompt must leave ``reserve`` tokens of the model's context length
    for the next answer, so the oldest turns are dropped first until it fits; a question too long even alone is
    the generator's error, as without memory. Cost: one prompt encoding per kept turn and question.
    """

    def __init__(self, tm: ThetaModel, reserve: int):
        self.prompt_format = tm.prompt_format
        self.limit = tm.context_length - reserve
        self.turns: list[tuple[str, str]] = []

    def add(self, question: str, answer: str) -> None:
        self.turns.append((question.strip(), answer.strip()))

    def reset(self) -> None:
        self.turns = []

    def prompt_tokens(self, question: str, history: list[tuple[str, str]]) -> int:
        return len(self.prompt_format.encode_prompts([{"question": question, "history": history}])[0])

    def history_for(self, question: str) -> list[tuple[str, str]] | None:
        """The most recent turns that fit with ``question`` (None when there are none); drops the rest for good."""
        while self.turns:
            if self.prompt_tokens(question, self.turns) <= self.limit:
                return list(self.turns)
            self.turns.pop(0)
        return None


def chat(tm: ThetaModel, args: argparse.Namespace, read=input) -> int:
    """The interactive loop: each answer sees the conversation so far (bounded, oldest first out); ``/reset``
    forgets it."""
    memory = Conversation(tm, reserve=min(args.max_length, tm.context_length // 2))
    print("Theta chat: type a question; /reset forgets the conversation; 'exit', Ctrl-D or Ctrl-C to leave.")
    while True:
        try:
            question = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if question.lower() in ("exit", "quit", "/exit", "/quit"):
            return 0
        if question.lower() == "/reset":
            memory.reset()
            print("(conversation cleared)")
            continue
        if not question:
            continue
        try:
            out = _answer(tm, question, args, history=memory.history_for(question))
        except KeyboardInterrupt:
            print("\n(interrupted)")
            continue
        except ThetaModelError as err:  # e.g. a question longer than the model reads: say so, keep chatting
            print(f"error: {err}", file=sys.stderr)
            continue
        memory.add(question, out["text"])
        print("theta> " + _shown(out))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        if args.command == "build-tiny":
            shutil.rmtree(args.output_dir, ignore_errors=True)
            build_tiny_model(args.output_dir, args.datasets_dir)
            return 0
        tm = ThetaModel.load(args.model_path, args.device) if Path(args.model_path).exists() \
            else ThetaModel(args.model_path, args.device)
        if args.prompt_format != "auto":
            tm.prompt_format = resolve_format(args.prompt_format, tm.tokenizer, model_name=args.model_path)
        if args.command == "generate":
            print(_shown(_answer(tm, args.prompt, args)))
            return 0
        return chat(tm, args)
    except UserError as err:  # ThetaModelError, UnsupportedModel: the message, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
