"""Inference formats of a Theta model: int8 dynamic quantisation of the decoder layers, and half-precision weights.

The model layer's side of ``src/training/optimize_for_inference.py``: the surgery that makes an int8 model, the
folder format it is saved in, and how ``ThetaModel.load`` turns any folder that script writes back into a model
on the right device. It imports nothing from ``src/training/`` and nothing from ``theta_model.py``, which imports
it: the int8 folder's file names are owned here, once. Every supported family (gpt2, llama, qwen2, qwen3,
mistral, phi3) goes through the same code: the decoder layers are found by the model's own block class.

    from src.model.quantization import quantize_blocks_int8, save_quantized, load_quantized_model
    n = quantize_blocks_int8(tm.model)             # every linear layer of the decoder layers, in place
    save_quantized(tm.model, tm.tokenizer, Path("theta_inference"), {"layers": n})
    model = load_quantized_model(Path("theta_inference"))

Folder formats (what ``ThetaModel.load`` accepts):
- fp32 / fp16 / bf16: a plain Hugging Face folder (``model.safetensors``); the config's ``dtype`` says which.
  Half weights are meant for CUDA; on the CPU they are loaded as fp32, since CPUs without half-precision units
  compute fp16/bf16 many times more slowly than fp32.
- int8: config, generation config, tokenizer, ``quantized_model.pt`` (the quantised state dict), a ``README.md``
  saying what it is and the marker ``theta_quantization.json``. CPU only (the fbgemm/onednn kernels).
  Theta-only: transformers reads none of torch's eager quantised modules, so ``AutoModelForCausalLM``, pipeline(),
  lm-evaluation-harness and llama.cpp's converter find no weight file here and stop with an error (never random
  weights); other tools open the full-precision ``theta_final/`` (documentation/INTEROP.md).

Sharp edge: an int8 folder is a torch pickle of quantised tensors, not safetensors, and is tied to the eager
quantiser's module layout; it is rebuilt by quantising a fresh model of the same config the same way, then
loading the weights.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from src.utils.common import atomic_write_json

logger = logging.getLogger(__name__)

# The int8 folder's files (theta_model.check_model_folder and optimize_for_inference.py read these names).
QUANTIZED_MARKER = "theta_quantization.json"
QUANTIZED_WEIGHTS = "quantized_model.pt"
QUANTIZED_README = "README.md"
QUANTIZATION_FORMAT = 1
LOADS_WITH = "theta"  # what opens an int8 folder (optimization_metrics.json's "loads_with")
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


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(dotted path, list)`` of a causal LM's decoder layers: ``transformer.h`` (GPT-2), ``model.layers`` (Llama,
    Qwen2/3, Mistral, Phi-3), or wherever the family keeps them.

    Found by the model's own block class: ``_no_split_modules`` names it (GPT2Block, LlamaDecoderLayer...), and the
    layers are the ``nn.ModuleList`` whose every entry is one. Raises ValueError naming the model class when there
    is none (not a decoder-only transformer of a known shape).
    """
    wanted = set(getattr(model, "_no_split_modules", None) or ())
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and \
                all(type(child).__name__ in wanted for child in module):
            return name, module
    raise ValueError(f"{type(model).__name__}: no list of decoder layers found (looked for an nn.ModuleList of "
                     f"{sorted(wanted) or 'its _no_split_modules classes'})")


def quantize_blocks_int8(model: PreTrainedModel) -> int:
    """int8 dynamic quantisation of every linear layer of the decoder layers (in place); returns how many.

    Dynamic quantisation stores weights as int8 with one scale per tensor and quantises activations on the fly,
    per batch: no calibration data, CPU only. GPT-2's ``Conv1D`` layers become ``nn.Linear`` first (torch's
    quantiser does not recognise them). Embeddings, norms and the LM head stay fp32: the head is tied to the token
    embeddings in GPT-2 and Qwen2 (quantising it would untie them), it is the most precision-sensitive layer, and
    it is one matmul of the forward against 4-7 per layer.
    Cost: on small models the per-call (de)quantisation overhead can outweigh the int8 matmul gain, which is
    why ``optimize_for_inference.py --quantize auto`` measures before it keeps the result.
    """
    from torch.ao.quantization import quantize_dynamic

    model.eval()
    _, layers = decoder_layers(model)
    conv1d_to_linear(layers)
    with quiet_quantization_warnings():
        quantize_dynamic(layers, {nn.Linear}, dtype=torch.qint8, inplace=True)  # swaps the layers' children
    return sum(1 for m in layers.modules() if is_quantized_linear(m))


def is_quantized_linear(module: nn.Module) -> bool:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    return isinstance(module, DynamicQuantizedLinear)


def save_quantized(model: PreTrainedModel, tokenizer, path: Path, meta: dict, source: str | None = None) -> Path:
    """An int8 folder of ``model`` (quantised by :func:`quantize_blocks_int8`) and its tokenizer: config,
    generation config, tokenizer, the quantised state dict, a README naming what opens it (``source``: the
    full-precision folder other tools should use) and the marker file (written last: a folder with the marker is
    complete)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    model.generation_config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    with quiet_quantization_warnings():
        torch.save(model.state_dict(), path / QUANTIZED_WEIGHTS)
    (path / QUANTIZED_README).write_text(int8_readme(meta.get("layers"), source), encoding="utf-8")
    atomic_write_json(path / QUANTIZED_MARKER, {"format": QUANTIZATION_FORMAT, **meta})
    return path


def int8_readme(layers: int | None, source: str | None) -> str:
    """The int8 folder's README: Theta-only, how to load it, and the folder other tools open instead."""
    other = f"`{source}`" if source else "the `theta_final/` folder this was made from"
    return f"""# Theta int8 inference model (opens with Theta only)

{layers if layers is not None else "The"} linear layers of the decoder are int8, quantised by torch's dynamic
quantisation and stored as a torch state dict (`{QUANTIZED_WEIGHTS}`), for CPU inference. Only Theta's loader
rebuilds this format:

    python -m src.model.theta_model chat --model_path <this folder>
    from src.model.theta_model import ThetaModel; tm = ThetaModel.load("<this folder>")

There is no `model.safetensors` here, so `transformers.AutoModelForCausalLM.from_pretrained`, `pipeline()`,
lm-evaluation-harness, peft and llama.cpp's `convert_hf_to_gguf.py` stop with a missing-weights error. For those
tools use the full-precision model: {other} (documentation/INTEROP.md in the Theta repository).
"""


def load_quantized_model(path: Path) -> PreTrainedModel:
    """Rebuild a folder written by :func:`save_quantized`: the architecture of its config (any supported family,
    through the Auto classes), quantised the same way, then the saved int8 weights. ``ThetaModel.load`` calls it
    for folders with the marker."""
    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # random init, overwritten below
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
