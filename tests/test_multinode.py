"""Two "nodes" on one machine: two torchrun commands meeting on 127.0.0.1 (gloo) train like one process.

What a user who outgrows one machine runs, one command per machine (here both on this one, a free port each time):

    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 1 --master_addr 127.0.0.1 --master_port 29500 \
        -m src.training.train_enhanced --device cpu ...
    torchrun --nnodes 2 --node_rank 1 --nproc_per_node 1 --master_addr 127.0.0.1 --master_port 29500 \
        -m src.training.train_enhanced --device cpu ...

Oracles: the summary's ``replica_sha256`` (one hash per rank, all-gathered: every rank holds the same weights)
and one process at the same global batch (2 ranks x 2 = 4), within 1e-5 (no dropout, learning rate 1e-3: see
test_recipe_matrix.py on Adam and summation order).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import free_port
from recipe_harness.common import PROJECT_ROOT, QUIET_ENV, SMALL_LR, final_weights, max_difference, parse
from recipe_harness.fixtures import env, one_thread  # noqa: F401 (pytest fixtures)
import src.training.train_enhanced as te

pytestmark = pytest.mark.slow  # two torchrun launches (about a minute); the default run and CI still run it


def plain_argv(env: dict, out, batch: int) -> list[str]:
    return ["--model_name", str(env["nodrop"]), "--data_path", str(env["data"]), "--datasets_dir",
            str(env["datasets"]), "--output_dir", str(out), "--epochs", "2", "--batch_size", str(batch),
            "--learning_rate", SMALL_LR, "--max_length", "64", "--num_samples", "0", "--domain_eval_frequency", "0",
            "--seed", "3", "--device", "cpu", "--no_progress_bar"]


def test_two_node_launch_trains_like_one_process(env, tmp_path):
    port = free_port()
    nodes = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node_rank),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
               "-m", "src.training.train_enhanced", *plain_argv(env, tmp_path / "two_nodes", 2)]
        nodes.append(subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, env={**os.environ, **QUIET_ENV}))
    try:
        single = te.train(parse(plain_argv(env, tmp_path / "single", 4)))  # meanwhile, the reference
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.communicate()
    for node_rank, (node, output) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {node_rank} exited {node.returncode}:\n{output[-3000:]}"
    config = json.loads((tmp_path / "two_nodes" / "training_config.json").read_text(encoding="utf-8"))
    assert config["environment"]["world_size"] == 2 and config["status"] == "completed"
    summary = config["summary"]
    assert single["exit_code"] == 0 and summary["global_step"] == single["global_step"] == 20, (summary, single)
    assert "replica_sha256" in summary, "needs the replica_sha256 summary key (CONTRACTS item 8)"
    hashes = summary["replica_sha256"]
    assert len(hashes) == 2 and hashes[0] == hashes[1], f"the two nodes' ranks hold different weights: {hashes}"
    worst = max_difference(final_weights(tmp_path / "single"), final_weights(tmp_path / "two_nodes"))
    assert worst[0] <= 1e-5, f"two nodes differ from one process at the same global batch by {worst[0]:.3g} " \
                             f"({worst[1]})"
