"""The recipe's pieces: the logged R-Drop KL, the contrastive term under any split, EMA's host reads, theta_final/
never absent, weighted sampling, atomic folders, --dry_run.

The first four hold problems that once shipped (issue 12's bugs 5-8; each test failed on the code before its fix);
the oracles are independent computations (torch's KL and cross-entropy, hand-computed frequencies, spies on the
file system and on CUDA synchronisation).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sys
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from helpers import loss_setup
from src.model.theta_model import ThetaModel, split_prompt
from src.training.lm_data import TokenizedDataset, collate, load_prepared_records
from src.utils.common import UserError, atomic_dir
import src.training.train_enhanced as te


def _args(model_dir, data, out, *extra):
    return te.parse_args(["--model_name", str(model_dir), "--data_path", str(data), "--output_dir", str(out),
                          "--epochs", "1", "--batch_size", "4", "--learning_rate", "1e-3", "--max_length", "96",
                          "--num_samples", "0", "--seed", "3", "--no_progress_bar", "--domain_eval_frequency", "0",
                          *extra])


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


# --- the logged R-Drop KL with quality weighting (issue 12, bug 5) ---------------------------------------------

def test_rdrop_kl_with_quality_weighting_is_logged_with_the_loss_normaliser(tiny_model_dir, tiny_records):
    tm = ThetaModel.load(tiny_model_dir, device="cpu")
    tm.model.train()  # dropout on: the two passes differ
    recs = [dict(tiny_records[0], quality_score=1.0), dict(tiny_records[1], quality_score=0.1),
            dict(tiny_records[20], quality_score=0.4)]
    ds = TokenizedDataset(recs, tm.tokenizer, max_length=96)
    batch = collate(ds.examples, tm.tokenizer.pad_token_id)
    setup = loss_setup("--use_rdrop", "--rdrop_alpha", "0.5", "--use_quality_weighting", "--quality_weighting_floor",
                       "0.2")
    norm = setup.normaliser([batch])
    torch.manual_seed(0)
    result = te.accumulate_gradients(tm.model, [batch], {"targets": norm}, setup, torch.device("cpu"), nullcontext())
    # oracle: the same doubled forward (same dropout masks), KL and CE from torch, weights and counts by hand
    torch.manual_seed(0)
    with torch.no_grad():
        ids, attn = batch["input_ids"], batch["attention_mask"]
        logits = tm.model(input_ids=torch.cat([ids, ids]), attention_mask=torch.cat([attn, attn])).logits
    B = ids.shape[0]
    lp1, lp2 = (torch.log_softmax(x[:, :-1].double(), -1) for x in (logits[:B], logits[B:]))
    kl = 0.5 * (F.kl_div(lp2, lp1, log_target=True, reduction="none").sum(-1)
                + F.kl_div(lp1, lp2, log_target=True, reduction="none").sum(-1))  # (B, T-1) symmetric KL
    targets = batch["labels"][:, 1:]
    mask = (targets != -100).double()
    w = torch.tensor([0.2 + 0.8 * q for q in (1.0, 0.1, 0.4)], dtype=torch.float64)[:, None]
    weighted_tokens = float((w * mask).sum())
    assert norm == pytest.approx(weighted_tokens)
    ce = 0.5 * sum(F.cross_entropy(lp.reshape(-1, lp.shape[-1]), targets.reshape(-1), ignore_index=-100,
                                   reduction="none").view_as(targets) for lp in (lp1, lp2))
    expected_kl = float((w * mask * kl).sum()) / weighted_tokens
    expected_loss = float((w * mask * (ce + 0.5 * kl)).sum()) / weighted_tokens
    # was 1.3x: unweighted KL / weighted count
    assert float(result["sums"]["kl"]) / norm == pytest.approx(expected_kl, rel=1e-4)
    assert float(result["loss"]) / norm == pytest.approx(expected_loss, rel=1e-5)


# --- the contrastive term and how a step is split (issue 12, bug 6) --------------------------------------------

CONTRASTIVE = ["--use_code_contrastive", "--code_contrastive_scope", "all", "--code_contrastive_weight", "1.0",
               "--max_steps", "3"]


def test_contrastive_term_does_not_change_with_micro_batch_split_or_oom_halving(tmp_path, tiny_model_no_dropout,
                                                                                 prepared_data, monkeypatch):
    te.train(_args(tiny_model_no_dropout, prepared_data, tmp_path / "4x1", *CONTRASTIVE))
    te.train(_args(tiny_model_no_dropout, prepared_data, tmp_path / "1x4", *CONTRASTIVE, "--batch_size", "1",
                   "--gradient_accumulation_steps", "4"))
    from transformers import GPT2LMHeadModel

    real_forward = GPT2LMHeadModel.forward

    def small_memory_forward(self, input_ids=None, **kw):  # a GPU that fits 2 records at a time
        if self.training and input_ids.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(self, input_ids=input_ids, **kw)

    monkeypatch.setattr(GPT2LMHeadModel, "forward", small_memory_forward)
    te.train(_args(tiny_model_no_dropout, prepared_data, tmp_path / "oom", *CONTRASTIVE))
    assert "micro-batch now 2 x 2" in (tmp_path / "oom" / "train.log").read_text()
    runs = {name: _metrics(tmp_path / name) for name in ("4x1", "1x4", "oom")}
    terms = {name: [x["contrastive"] for x in lines] for name, lines in runs.items()}
    assert terms["4x1"][0] == 0.0 and min(terms["4x1"][1:]) > 0.1  # the first step has no negatives yet
    for name in ("1x4", "oom"):  # at batch 1 it used to be exactly 0; halving changed it
        assert terms[name] == pytest.approx(terms["4x1"], rel=1e-4, abs=1e-6), name
    a = load_file(str(tmp_path / "4x1" / "theta_final" / "model.safetensors"))
    for name in ("1x4", "oom"):
        b = load_file(str(tmp_path / name / "theta_final" / "model.safetensors"))
        assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), name


def test_loss_on_all_with_the_contrastive_loss_is_refused_naming_both_flags(capsys):
    with pytest.raises(SystemExit):
        te.parse_args(["--use_code_contrastive", "--loss_on", "all"])
    err = capsys.readouterr().err
    assert "--use_code_contrastive" in err and "--loss_on all" in err
    assert te.parse_args(["--use_code_contrastive", "--loss_on", "all", "--ablation_mode", "code_contrastive"])


# --- EMA reads of a non-blocking device-to-host copy (issue 12, bug 7) ------------------------------------------

class _CudaParam:
    """A parameter that says it lives on CUDA; its copies to the host log themselves (no GPU needed)."""

    def __init__(self, events: list, value: torch.Tensor):
        self.events, self.value, self.requires_grad = events, value, True
        self.device = torch.device("cuda", 0)

    def detach(self):
        return self

    def to(self, device=None, dtype=None, non_blocking=False, copy=False):
        if non_blocking:
            self.events.append("copy")  # returns at once; the GPU fills the pinned buffer later
        return self.value.to(dtype=dtype or self.value.dtype).clone()


class _CudaModel:
    def __init__(self, params: dict):
        self.params = params

    def named_parameters(self):
        return iter(self.params.items())


def test_ema_host_read_waits_for_its_non_blocking_copies(monkeypatch):
    events: list[str] = []
    model = _CudaModel({"a": _CudaParam(events, torch.ones(3)), "b": _CudaParam(events, torch.full((2,), 2.0))})
    ema = te.ExponentialMovingAverage(model, decay=0.5, device="cpu")
    ema.start(model)
    assert all(s.device.type == "cpu" for s in ema.shadow)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    real_lerp = torch._foreach_lerp_
    monkeypatch.setattr(torch, "_foreach_lerp_", lambda *a, **k: (events.append("read"), real_lerp(*a, **k))[1])
    model.params["a"].value = torch.full((3,), 3.0)
    ema.update(model)
    read = events.index("read")
    assert events[:read].count("copy") == 2 and "sync" in events[events.index("copy"):read], events
    assert ema.shadow[0].tolist() == [2.0, 2.0, 2.0]  # 0.5 x 1 + 0.5 x 3


# --- theta_final/ never absent (issue 12, bug 8); atomic_dir ----------------------------------------------------

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the atomic swap (RENAME_EXCHANGE) is Linux's")
def test_theta_final_is_never_absent_while_it_is_replaced(tmp_path, tiny_model_dir, prepared_data, monkeypatch):
    run = tmp_path / "run"
    args = ("--max_steps", "2", "--resume", "never")
    assert te.train(_args(tiny_model_dir, prepared_data, run, *args))["exit_code"] == 0
    final = run / "theta_final"
    absent: list[str] = []

    def watching(fn):  # after every folder removal or rename: is theta_final/ still there?
        def call(*a, **k):
            out = fn(*a, **k)
            if not final.is_dir() or not (final / "model.safetensors").is_file():
                absent.append(f"{fn.__name__}{a}")
            return out
        return call

    for module, name in ((shutil, "rmtree"), (os, "replace"), (os, "rename")):
        monkeypatch.setattr(module, name, watching(getattr(module, name)))
    assert te.train(_args(tiny_model_dir, prepared_data, run, *args, "--seed", "4"))["exit_code"] == 0
    assert not absent, absent
    assert (final / "model.safetensors").is_file()
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "folder"
    with atomic_dir(target, marker="COMPLETE") as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("half-written")
            raise RuntimeError("crash while writing")
    assert (target / "a.txt").read_text() == "old" and (target / "COMPLETE").is_file()
    with atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]  # replaced whole: nothing of the old one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


# --- the default sampler honours sample_weight -------------------------------------------------------------------

def test_weighted_draw_frequencies_follow_sample_weight_times_tracker_weight():
    base = [1.0, 2.0, 3.0, 4.0, 0.0]
    sampler = te.WeightedRecordSampler(base)
    draws = Counter()
    for seed in range(400):
        draws.update(sampler.draw([0, 1, 2, 3, 4], 0, torch.Generator().manual_seed(seed)))
    total = sum(draws.values())
    assert total == 400 * 5 and draws[4] == 0  # len(pool) draws per epoch; weight 0 is never drawn
    assert np.allclose([draws[i] / total for i in range(4)], [0.1, 0.2, 0.3, 0.4], atol=0.02)  # w / sum(w)
    tracker = te.DynamicCurriculumTracker(5, warmup_epochs=0, momentum=0.5)
    tracker.update([0, 1, 2, 3, 4], [1.0, 2.0, 4.0, 6.0, 3.0])  # median 3: weights 1/3->0.5, 2/3, 4/3, 2, 1
    both = te.WeightedRecordSampler(base, [tracker])
    draws = Counter()
    for seed in range(400):
        draws.update(both.draw([0, 1, 2, 3], 1, torch.Generator().manual_seed(seed)))  # a pool without record 4
    product = np.array([1 * 0.5, 2 * 2 / 3, 3 * 4 / 3, 4 * 2.0])
    assert np.allclose([draws[i] / 1600 for i in range(4)], product / product.sum(), atol=0.02)
    assert te.WeightedRecordSampler([2.0] * 4).draw([0, 1, 2, 3], 0, torch.Generator().manual_seed(0)) \
        in [list(p) for p in itertools.permutations(range(4))]  # equal weights: a permutation


def test_sample_weight_composes_with_curriculum_and_stratification():
    n = 24
    diffs = [1 + i % 3 for i in range(n)]
    domains = [i % 2 for i in range(n)]
    weights = [0.0 if i % 4 == 0 else 1.0 + i % 3 for i in range(n)]
    curriculum = te.CurriculumSampler(diffs, [str(i) for i in range(n)], 0.5, 4)
    sampler = te.TrainingSampler(n, 4, seed=1, parts=[curriculum, te.DomainStratifiedSampler(domains)],
                                 base_weights=weights)
    pool = set(curriculum.pool(0))
    batches = sampler.batches(0)
    drawn = [i for b in batches for i in b]
    assert all(i in pool and weights[i] > 0 for i in drawn)  # the pool, weight 0 never
    assert all(sorted(Counter(domains[i] for i in b).values()) == [2, 2] for b in batches)
    assert len(batches) == sampler.num_batches(0)


def test_sample_weight_is_checked_and_reported(tmp_path, tiny_model_dir, prepared_data):
    data = json.loads(prepared_data.read_text())
    data["records"][3]["sample_weight"] = -1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(UserError, match="record 3 .*sample_weight"):
        load_prepared_records(bad)


# --- the stratified sampler and the planned step count (the fix behind bug 4) -------------------------------------

def test_validation_batches_cover_every_record_once_and_pad_little():
    lengths = [30, 5, 17, 5, 90, 12, 44]  # 7 records: 2 ranks cannot hold equal shares
    for world in (1, 2, 3):
        shares = [te.validation_batches(lengths, 2, rank, world) for rank in range(world)]
        seen = [i for share in shares for b in share for i in b]
        assert sorted(seen) == list(range(len(lengths))), world  # none dropped, none twice
        for share in shares:
            flat = [i for b in share for i in b]
            assert [lengths[i] for i in flat] == sorted(lengths[i] for i in flat)  # by length: neighbours batch
            assert all(1 <= len(b) <= 2 for b in share)
    assert te.validation_batches(lengths, 3) == [[1, 3, 5], [2, 0, 6], [4]]


def test_stratified_mix_spreads_over_the_domains_a_pool_holds():
    domains = [0] * 10 + [1] * 10 + [2] * 10
    strat = te.DomainStratifiedSampler(domains)
    order = list(range(20))  # a pool without domain 2
    out = strat.arrange(order, batch_size=4)
    assert len(out) == 20 and Counter(domains[i] for i in out) == {0: 10, 1: 10}


# --- CONTRACTS item 8: --dry_run, summary keys ------------------------------------------------------------------

def test_dry_run_shows_each_token_and_whether_it_is_a_target(tmp_path, tiny_model_dir, prepared_data, capsys):
    summary = te.train(_args(tiny_model_dir, prepared_data, tmp_path / "run", "--dry_run"))
    assert summary["exit_code"] == 0 and summary["status"] == "dry_run"
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "checkpoints").exists()
    first = next(r for r in json.loads(prepared_data.read_text())["records"] if r.get("split", "train") == "train")
    tok = ThetaModel.load(tiny_model_dir, device="cpu").tokenizer
    n_answer = len(tok(" " + first["answer"].strip())["input_ids"]) + 1  # + end of text
    out = capsys.readouterr().out.split("record ")[1].splitlines()
    assert sum(1 for line in out if " target " in line) == n_answer
    n_prompt = len(tok(split_prompt(first["question"], None, first.get("context"))[0])["input_ids"])
    assert sum(1 for line in out if line.startswith("  ")) == n_prompt + n_answer  # one line per token
