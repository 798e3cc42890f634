"""Run several training configurations in one process (or one torchrun launch) and record what each rank holds.

A torchrun launch costs about 25 s on a 2-core machine, mostly imports, so the interaction-matrix tests start it
once and let this script run every configuration in sequence, each through the public entry point
``train(parse_args(argv))`` with its own ``--output_dir``:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/recipe_harness/ddp_matrix.py spec.json
    python tests/recipe_harness/ddp_matrix.py spec.json        # the same runs in one ordinary process

``spec.json`` is ``{"runs": [{"name": str, "argv": [str, ...]}, ...]}``; every ``argv`` names its own
``--output_dir``. For each run and rank the script writes, into that output folder:

- ``harness_rank<R>.json``: the returned summary (or the error, when ``train`` raised) and the world size;
- ``harness_rank<R>.safetensors``: under DDP, the parameters of the module this rank handed to
  ``DistributedDataParallel``, copied when ``train`` returned. Only rank 0 saves ``theta_final/``, so this is the
  one way to look at every rank's weights without relying on the trainer's own ``replica_sha256``.

A run that raises does not stop the others. The process group is created here with a short timeout, so a rank
that waits on a collective its peer never joins fails within three minutes instead of gloo's default half hour
(not one minute: on a busy 2-core machine a peer's validation and saving can take tens of seconds).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import sys
import traceback
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_ROOT))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

COLLECTIVE_TIMEOUT_S = 180


class WrappedModules:
    """Remembers every module handed to ``DistributedDataParallel`` (the replicas the ranks must agree on).

    It wraps the class's ``__init__`` rather than the name the trainer imports, so it sees the wrapper however the
    trainer refers to it.
    """

    def __init__(self):
        self.modules: list[torch.nn.Module] = []
        ddp = torch.nn.parallel.DistributedDataParallel
        original = ddp.__init__
        seen = self.modules

        def recording_init(wrapper, module, *args, **kwargs):
            original(wrapper, module, *args, **kwargs)
            seen.append(module)

        ddp.__init__ = recording_init

    def take_last(self) -> torch.nn.Module | None:
        module = self.modules[-1] if self.modules else None
        self.modules.clear()
        return module


def parameter_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter (tied ones once), detached, contiguous, on the CPU: a safetensors-ready copy."""
    return {name: p.detach().to("cpu").clone().contiguous() for name, p in module.named_parameters()}


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].numpy().tobytes())
    return h.hexdigest()


def run_one(te, argv: list[str], wrapped: WrappedModules, rank: int, world: int) -> None:
    out = Path(argv[argv.index("--output_dir") + 1])
    record: dict = {"world": world, "rank": rank}
    try:
        record["summary"] = te.train(te.parse_args(argv))
    except BaseException as err:  # SystemExit from argparse included: record it, go on with the next run
        record["error"] = f"{type(err).__name__}: {err}"
        record["traceback"] = traceback.format_exc()[-4000:]
    module = wrapped.take_last()
    out.mkdir(parents=True, exist_ok=True)
    if module is not None:
        tensors = parameter_copy(module)
        record["harness_sha256"] = digest(tensors)
        save_file(tensors, str(out / f"harness_rank{rank}.safetensors"))
    (out / f"harness_rank{rank}.json").write_text(json.dumps(record, indent=1, default=str), encoding="utf-8")


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    import src.training.train_enhanced as te

    wrapped = WrappedModules()
    for run in spec["runs"]:
        run_one(te, run["argv"], wrapped, rank, world)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
