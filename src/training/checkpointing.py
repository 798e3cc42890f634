"""Checkpoint files: save, list, find the one to resume, load it safely, and check it before it is used.

A checkpoint is ``checkpoints/step_<N>/`` with ``state.pt`` (the whole resumable state), ``checkpoint.json`` (its
version and step, readable without opening ``state.pt``) and the ``COMPLETE`` marker, written through
``atomic_dir``. The state holds tensors and plain Python values only (dict, list, tuple, str, int, float, bool,
None, torch dtypes): ``save_checkpoint`` refuses anything else, and ``state.pt`` is read with
``torch.load(weights_only=True)``, whose unpickler builds only those types and refuses every other global. A
planted ``state.pt`` whose pickle would import and call something (``os.system``, ``exec``) is refused unread:
nothing in it runs. Why not safetensors + JSON: the state keeps integer keys (optimizer state) and tuples (betas,
Python's RNG state) that JSON would turn into strings and lists, and ``torch.save`` streams tensors to disk while
safetensors first builds the whole file in memory (gigabytes at gpt2-medium size).

A loaded state is checked before anything uses it (``validate_state``): version, every key resume reads and its
type, and the model's tensor names and shapes against the model (the trainable tensors alone for an adapter
run, whose checkpoints hold only those: ``model_tensors``). A checkpoint that fails any check is skipped
like a torn one (``--resume auto`` falls back to an older one, with a warning); ``--resume DIR`` refuses it,
naming what is wrong.

    from src.training.checkpointing import save_checkpoint, find_resume_checkpoint, load_checkpoint_file
    python -c "from src.training.checkpointing import load_checkpoint_file; print(load_checkpoint_file(
        __import__('pathlib').Path('models/<run>/checkpoints/step_40'))['global_step'])"
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from src.utils.common import atomic_dir, read_json, UserError

logger = logging.getLogger(__name__)

# 3: tensors and plain values only, loaded with weights_only=True; numpy's RNG state as a plain tuple;
#    checkpoint.json beside state.pt. 2: technique states in one "techniques" entry, the batch plan in run_state.
CHECKPOINT_VERSION = 3
COMPLETE_MARKER = "COMPLETE"
STATE_FILE = "state.pt"
META_FILE = "checkpoint.json"

# What resume reads, and the type each must have (validate_state). RunState's own fields are checked by building
# it; these are the ones read before that, or whose wrong type would surface only deep inside a step.
REQUIRED = {"version": int, "global_step": int, "model": dict, "optimizer": dict, "scheduler": dict,
            "scaler": (dict, type(None)), "techniques": dict, "run_state": dict, "rng": dict, "args": dict}
REQUIRED_RUN_STATE = {"global_step": int, "epoch": int, "batch_in_epoch": int, "best_val_loss": (int, float),
                      "best_epoch": int, "bad_epochs": int, "history": list, "epoch_sums": dict}
REQUIRED_RNG = {"python": tuple, "numpy": tuple, "torch": torch.Tensor}
_PLAIN = (str, int, float, bool, type(None), bytes, torch.dtype, torch.device, torch.Size)


class UnusableCheckpoint(Exception):
    """A checkpoint that cannot be resumed from; the message says why (and is shown as it is)."""


# --- RNG state -------------------------------------------------------------------------------------------------

def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) generator states, in plain types: numpy's key array as a list of ints."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, keys.tolist(), int(pos), int(has_gauss), float(cached)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- saving ----------------------------------------------------------------------------------------------------

def check_plain(value: Any, where: str = "state") -> None:
    """Raise TypeError naming the first value that the safe loader would refuse (a programming error: a new
    technique put a numpy array or an object into its state). Cheap: a walk over a few thousand entries."""
    if isinstance(value, torch.Tensor) or isinstance(value, _PLAIN):
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint {where}: key {k!r} is a {type(k).__name__}; use str or int keys")
            check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"checkpoint {where} is a {type(value).__module__}.{type(value).__name__}: only tensors and "
                    "plain values load safely; convert it (numpy arrays: .tolist() or torch.from_numpy)")


def save_checkpoint(ckpt_dir: Path, state: dict, keep_last: int) -> Path:
    """``checkpoints/step_<N>/`` through ``atomic_dir``: temp folder, fsync, rename, then the marker.

    A folder without the marker is an interrupted save: resume skips it. The newest ``keep_last`` are kept.
    """
    check_plain(state)
    final = ckpt_dir / f"step_{state['global_step']}"
    with atomic_dir(final, marker=COMPLETE_MARKER) as tmp:
        torch.save(state, tmp / STATE_FILE)
        (tmp / META_FILE).write_text(json.dumps({"version": state["version"], "global_step": state["global_step"],
                                                 "loader": "torch.load(weights_only=True)"}) + "\n",
                                     encoding="utf-8")
    complete = sorted(list_checkpoints(ckpt_dir), key=lambda p: int(p.name.split("_")[1]))
    for old in complete[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    return [p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step_")
            and p.name.split("_")[1].isdigit()]


# --- loading ---------------------------------------------------------------------------------------------------

def load_checkpoint_file(path: Path, model: torch.nn.Module | None = None) -> dict:
    """The state of checkpoint folder ``path``, loaded safely and validated (against ``model`` when given);
    raises UnusableCheckpoint saying why not."""
    path = Path(path)
    if not (path / META_FILE).is_file():
        if (path / STATE_FILE).is_file():
            raise UnusableCheckpoint(f"no {META_FILE}: written by an older Theta (checkpoint version 2 or older, "
                                     "loaded in a way that could run code); this version loads only version "
                                     f"{CHECKPOINT_VERSION}")
        raise UnusableCheckpoint(f"no {STATE_FILE} in it")
    try:
        meta = read_json(path / META_FILE, "checkpoint description")
    except UserError as err:
        raise UnusableCheckpoint(str(err)) from None
    version = meta.get("version") if isinstance(meta, dict) else None
    if version != CHECKPOINT_VERSION:
        raise UnusableCheckpoint(f"checkpoint version {version!r} (this version of Theta reads {CHECKPOINT_VERSION})")
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as err:
        text = str(err)
        if "Weights only load failed" in text:  # the safe unpickler met a global it does not build
            # its message is mostly advice on loading the file anyway; keep only what it would have called
            found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
            raise UnusableCheckpoint(f"{STATE_FILE} holds more than tensors and plain values"
                                     f"{' (it would call ' + found[1] + ')' if found else ''}: refused unread, "
                                     "nothing in it ran. "
                                     "Theta never writes such a file: it was planted or altered; delete it") \
                from None
        first = text.splitlines()[0] if text else ""
        raise UnusableCheckpoint(f"{STATE_FILE} is unreadable ({type(err).__name__}: {first})") from None
    validate_state(state, model)
    return state


def _type_problem(value: Any, expected, name: str) -> str | None:
    if isinstance(value, bool) and bool not in (expected if isinstance(expected, tuple) else (expected,)):
        return f"'{name}' is a bool"  # bool is an int subclass: True is no step number
    if not isinstance(value, expected):
        want = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
        return f"'{name}' is a {type(value).__name__}, not {want}"
    return None


def validate_state(state: Any, model: torch.nn.Module | None = None) -> None:
    """Everything resume reads is there and of its type, and the model's tensors fit ``model``; else
    UnusableCheckpoint naming the first problems (missing keys, wrong types, tensor names or shapes)."""
    if not isinstance(state, dict):
        raise UnusableCheckpoint(f"{STATE_FILE} holds a {type(state).__name__}, not a checkpoint's dict")
    problems = []
    if state.get("version") != CHECKPOINT_VERSION:
        problems.append(f"its version is {state.get('version')!r}, not {CHECKPOINT_VERSION}")
    for table, where, prefix in ((REQUIRED, state, ""), (REQUIRED_RUN_STATE, state.get("run_state"), "run_state."),
                                 (REQUIRED_RNG, state.get("rng"), "rng.")):
        if not isinstance(where, dict):
            continue  # reported by the level above
        missing = [prefix + k for k in table if k not in where]
        if missing:
            problems.append(f"missing {', '.join(repr(m) for m in missing)}")
        problems += [p for k, t in table.items() if k in where and (p := _type_problem(where[k], t, prefix + k))]
    if isinstance(state.get("run_state"), dict) and isinstance(state.get("global_step"), int) \
            and state["run_state"].get("global_step") != state["global_step"]:
        problems.append(f"'global_step' {state['global_step']} differs from run_state's "
                        f"{state['run_state'].get('global_step')!r}")
    if isinstance(state.get("model"), dict):
        problems += _model_problems(state["model"], model)
    if problems:
        raise UnusableCheckpoint("; ".join(problems[:4]) + (f" (and {len(problems) - 4} more)"
                                                            if len(problems) > 4 else ""))


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of the model: its whole state dict when every parameter trains, else (adapters
    on a frozen base: --peft lora|qlora) the trainable parameters alone, a few MB: the frozen base is rebuilt
    from --model_name on resume, so saving it again would cost gigabytes and say nothing."""
    named = list(model.named_parameters())
    if all(p.requires_grad for _, p in named):
        return model.state_dict()
    return {n: p.detach() for n, p in named if p.requires_grad}


def load_model_tensors(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Load what ``model_tensors`` saved (checked first by ``validate_state``): the whole model, or its
    trainable tensors into a model whose other weights are the frozen base."""
    if all(p.requires_grad for p in model.parameters()):
        model.load_state_dict(saved)
        return
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in saved.items():
            named[name].copy_(value)


def _model_problems(saved: dict, model: torch.nn.Module | None) -> list[str]:
    not_tensors = [k for k, v in saved.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        return [f"model entries that are not tensors: {', '.join(map(str, not_tensors[:3]))}"]
    if model is None:
        return []
    expected = {k: tuple(v.shape) for k, v in model_tensors(model).items()}  # adapters: the trainable tensors
    problems = []
    missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing:
        problems.append(f"the model's {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} "
                        f"({len(missing)} tensors) are missing")
    if extra:
        problems.append(f"it holds tensors this model has not: {', '.join(extra[:3])}"
                        f"{' ...' if len(extra) > 3 else ''} (another model's checkpoint?)")
    wrong = [f"{k} {tuple(saved[k].shape)} (the model's is {shape})" for k, shape in expected.items()
             if k in saved and tuple(saved[k].shape) != shape]
    if wrong:
        problems.append(f"shapes differ: {', '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}")
    return problems


def find_resume_checkpoint(ckpt_dir: Path, model: torch.nn.Module | None = None) -> tuple[Path, dict] | None:
    """The newest complete, loadable, valid checkpoint; every other one is skipped with a warning saying why."""
    for path in sorted(list_checkpoints(ckpt_dir), key=lambda p: int(p.name.split("_")[1]), reverse=True):
        if not (path / COMPLETE_MARKER).exists():
            logger.warning("skipping incomplete checkpoint %s (no %s marker)", path, COMPLETE_MARKER)
            continue
        try:
            return path, load_checkpoint_file(path, model)
        except UnusableCheckpoint as err:  # torn, garbage, planted, old or incomplete: fall back to an older one
            logger.warning("skipping unusable checkpoint %s: %s", path, err)
    return None
