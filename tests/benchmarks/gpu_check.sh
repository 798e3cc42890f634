#!/usr/bin/env bash
# GPU check (documentation/PERFORMANCE.md, "GPU check"): throughput and MFU of the gpt2 and gpt2-medium shapes in
# bf16 and fp16, the rtx3060 profile's peak memory uncapped and capped at 12 GiB, CPU offload 0 / 0.5 / 1, EMA's
# device-to-host copy, a real CUDA out-of-memory recovery, FlashAttention packing, the pre-flight's memory model
# against the CUDA probe, the rtx3060-lora profile's shape under QLoRA and LoRA (peak memory, tokens/s).
# Expected time: under 8 minutes on one GPU (about 15 short training runs); disk: about 7 GB in a temp folder (the 1.5B random-weight folder of section 8 is 3 GB).
# Without CUDA it checks its plan and exits 0 saying so. The report goes to $OUT/gpu_check/ when $OUT is set.
#
#   tests/benchmarks/gpu_check.sh
#   tests/benchmarks/gpu_check.sh --sections 1,2 --out /tmp/gpu_check
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" tests/benchmarks/gpu_check.py "$@"
