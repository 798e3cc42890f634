"""Inference formats of a Theta model: int8 dynamic quantisation of the block layers, and half-precision weights.

The model layer's side of ``src/training/optimize_for_inference.py``: the surgery that makes an int8 model, the
folder format it is saved in, and how ``ThetaModel.load`` turns any folder that script writes back into a model
on the right device. It imports nothing from ``src/training/`` and nothing from ``theta_model.py``, which imports
it: the int8 folder's file names are owned here, once.

    from src.model.quantization import quantize_blocks_int8, save_quantized, load_quantized_model
    n = quantize_blocks_int8(tm.model)             # every linear layer of the blocks, in place
    save_quantized(tm.model, tm.tokenizer, Path("theta_inference"), {"layers": n})
    model = load_quantized_model(Path("theta_inference"))

Folder formats (what ``ThetaModel.load`` accepts):
- fp32 / fp16 / bf16: a plain Hugging Face folder (``model.safetensors``); the config's ``dtype`` says which.
  Half weights are meant for CUDA; on the CPU they are loaded as fp32, since CPUs without half-precision units
  compute fp16/bf16 many times more slowly than fp32.
- int8: config, generation config, tokenizer, ``quantized_model.pt`` (the quantised state dict) and the marker
  ``theta_quantization.json``. CPU only (the fbgemm/onednn kernels).

Sharp edge: an int8 folder is a torch pickle of quantised tensors, not safetensors, and is tied to the eager
quantiser's module layout; it is rebuilt by quantising a fresh model the same way, then loading the weights.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
import torch
from torch import nn
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from src.utils.common import atomic_write_json

logger = logging.getLogger(__name__)

# The int8 folder's files (theta_model.check_model_folder and optimize_for_inference.py read these names).
QUANTIZED_MARKER = "theta_quantization.json"
QUANTIZED_WEIGHTS = "quantized_model.pt"
QUANTIZATION_FORMAT = 1
HALF_DTYPES = (torch.float16, torch.bfloat16)


def conv1d_to_linear(module: nn.Module) -> int:
    """Replace every ``Conv1D`` under ``module`` by an equal ``nn.Linear`` (in place); returns how many.

    GPT-2's block layers are ``transformers`` ``Conv1D`` (``x @ W + b`` with W of shape (in, out)), which torch's
    quantiser does not recognise; ``nn.Linear`` stores (out, in), hence the transpose. The outputs are identical.
    """
    count = 0
    for name, child in module.named_children():
        if isinstance(child, Conv1D):
            n_in, n_out = child.weight.shape
            linear = nn.Linear(n_in, n_out, device=child.weight.device, dtype=child.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(child.weight.t())
                linear.bias.copy_(child.bias)
            setattr(module, name, linear)
            count += 1
        else:
            count += conv1d_to_linear(child)
    return count


@contextmanager
def quiet_quantization_warnings():
    """torch 2.13 marks torch.ao.quantization deprecated (its successor, torchao, is another package); the eager
    dynamic quantiser still works, so its deprecation notices are not repeated on every run and every load."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao\..*")
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*deprecated.*")
        warnings.filterwarnings("ignore", message=r".*TypedStorage is deprecated.*")
        yield


def quantize_blocks_int8(model: GPT2LMHeadModel) -> int:
    """int8 dynamic quantisation of every linear layer of the transformer blocks (in place); returns how many.

    Dynamic quantisation stores weights as int8 with one scale per tensor and quantises activations on the fly,
    per batch: no calibration data, CPU only. Embeddings, layer norms and the LM head (tied to the token
    embeddings) stay fp32: quantising the head would untie it, and it is the most precision-sensitive layer.
    Cost: on small models the per-call (de)quantisation overhead can outweigh the int8 matmul gain, which is
    why ``optimize_for_inference.py --quantize auto`` measures before it keeps the result.
    """
    from torch.ao.quantization import quantize_dynamic

    model.eval()
    conv1d_to_linear(model.transformer.h)
    with quiet_quantization_warnings():
        model.transformer.h = quantize_dynamic(model.transformer.h, {nn.Linear}, dtype=torch.qint8)
    return sum(1 for m in model.transformer.h.modules() if is_quantized_linear(m))


def is_quantized_linear(module: nn.Module) -> bool:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    return isinstance(module, DynamicQuantizedLinear)


def save_quantized(model: GPT2LMHeadModel, tokenizer, path: Path, meta: dict) -> Path:
    """An int8 folder of ``model`` (quantised by :func:`quantize_blocks_int8`) and its tokenizer: config,
    generation config, tokenizer, the quantised state dict and the marker file (written last: a folder with the
    marker is complete)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    model.generation_config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    with quiet_quantization_warnings():
        torch.save(model.state_dict(), path / QUANTIZED_WEIGHTS)
    atomic_write_json(path / QUANTIZED_MARKER, {"format": QUANTIZATION_FORMAT, **meta})
    return path


def load_quantized_model(path: Path) -> GPT2LMHeadModel:
    """Rebuild a folder written by :func:`save_quantized`: the same architecture, quantised the same way, then
    the saved int8 weights. ``ThetaModel.load`` calls it for folders with the marker."""
    path = Path(path)
    config = GPT2Config.from_pretrained(path)
    model = GPT2LMHeadModel(config)  # random init, overwritten below
    quantize_blocks_int8(model)
    with quiet_quantization_warnings():
        state = torch.load(path / QUANTIZED_WEIGHTS, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()


def is_quantized_folder(path: Path) -> bool:
    return (Path(path) / QUANTIZED_MARKER).is_file()


def placement(path: Path, device: torch.device) -> torch.device:
    """Where a folder's model can run: an int8 folder on the CPU only (a warning when another device was asked)."""
    if is_quantized_folder(path) and device.type != "cpu":
        logger.warning("%s is int8-quantised, which runs on the CPU only: loading it on the CPU", path)
        return torch.device("cpu")
    return device


def fit_dtype_to_device(model: nn.Module, device: torch.device) -> nn.Module:
    """Half-precision weights (an fp16/bf16 inference folder) on the CPU become fp32: CPUs without half-precision
    units run them many times more slowly. On CUDA they stay as saved. Returns the model."""
    try:
        dtype = next(model.parameters()).dtype
    except StopIteration:
        return model
    if device.type == "cpu" and dtype in HALF_DTYPES:
        logger.info("%s weights on the CPU: computing in fp32 (half precision is for CUDA)",
                    str(dtype).replace("torch.", ""))
        model.float()
    return model
