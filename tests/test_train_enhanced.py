"""The training engine: loss maths, accumulation, resume, signals, faults, tensorboard, DDP, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import PROJECT_ROOT, run_script
import src.training.train_enhanced as te
from full_logits import full_logits_token_losses
from src.training.lm_data import TokenizedDataset, collate
from src.training.lm_loss import TargetIndex, head_loss
from src.training.run_emails import TrainingEmailNotifier
from src.utils.email_notifier import EmailConfig, EmailSender

def _args(model_dir, data, out, *extra):
    return te.parse_args(["--model_name", str(model_dir), "--data_path", str(data), "--output_dir", str(out),
                          "--epochs", "2", "--batch_size", "4", "--learning_rate", "3e-3", "--max_length", "96",
                          "--num_samples", "0", "--seed", "3", "--no_progress_bar", "--domain_eval_frequency", "0",
                          *extra])  # the generation check is tested with the techniques


def _weights(run: Path, folder: str = "theta_final") -> dict[str, torch.Tensor]:
    return load_file(str(run / folder / "model.safetensors"))


# --- loss maths ------------------------------------------------------------------------------------------------

def test_loss_is_shifted_masked_cross_entropy_by_hand():
    """The trainer's loss at the target positions (lm_loss.head_loss, what step_losses calls) against a loop by hand
    over the full logits ``hidden @ weight.T``."""
    torch.manual_seed(0)
    B, T, C, V = 3, 7, 5, 11
    hidden, weight = torch.randn(B, T, C), torch.randn(V, C)
    logits = hidden @ weight.T
    labels = torch.randint(0, V, (B, T))
    labels[0, :3] = -100  # a prompt
    labels[1, 5:] = -100  # padding
    labels[2, :] = -100
    labels[2, 4] = 5      # a single target
    out = head_loss(hidden, weight, TargetIndex.from_labels(labels), chunk_rows=4)
    total, count = 0.0, 0
    for b in range(B):
        for t in range(T - 1):
            target = int(labels[b, t + 1])
            if target == -100:
                continue
            log_probs = logits[b, t] - torch.logsumexp(logits[b, t], dim=0)  # position t predicts token t + 1
            total -= float(log_probs[target])
            count += 1
    assert len(out.token_loss) == count == te.LossSetup().normaliser([{"input_ids": labels, "labels": labels}])
    assert float(out.loss) / count == pytest.approx(total / count, rel=1e-5)


def test_dataset_masks_prompt_and_appends_eos(tiny_model_dir, tiny_records):
    from src.model.theta_model import ThetaModel, split_prompt

    tm = ThetaModel.load(tiny_model_dir, device="cpu")
    rec = tiny_records[0]
    ds = TokenizedDataset([rec], tm.tokenizer, max_length=256)
    ex = ds[0]
    n_prompt = len(tm.tokenizer(split_prompt(rec["question"])[0])["input_ids"])
    assert ex["input_ids"][-1] == tm.tokenizer.eos_token_id
    assert ex["labels"][:n_prompt] == [-100] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    all_ds = TokenizedDataset([rec], tm.tokenizer, max_length=256, loss_on="all")
    assert all_ds[0]["labels"] == all_ds[0]["input_ids"]
    short = TokenizedDataset([rec], tm.tokenizer, max_length=n_prompt + 2)
    assert short.truncated == 1 and len(short[0]["input_ids"]) == n_prompt + 2
    batch = collate([ex, short[0]], pad_id=tm.tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, len(ex["input_ids"]))  # padded to the longest, not max_length
    assert (batch["labels"][1, n_prompt + 2:] == -100).all() and (batch["attention_mask"][1, n_prompt + 2:] == 0).all()


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulated_gradient_is_the_token_mean_of_the_whole_step(tiny_model_no_dropout, tiny_records):
    """Oracle: one batch of 4 uneven records vs the same records as 2 micro-batches of 2 (and 4 of 1)."""
    from src.model.theta_model import ThetaModel

    tm = ThetaModel.load(tiny_model_no_dropout, device="cpu")
    recs = [tiny_records[0], tiny_records[1], tiny_records[17], tiny_records[30]]  # different lengths
    ds = TokenizedDataset(recs, tm.tokenizer, max_length=96)
    pad = tm.tokenizer.pad_token_id
    setup = te.LossSetup()
    cpu = torch.device("cpu")

    def run(window):
        tm.model.zero_grad(set_to_none=True)
        te.accumulate_gradients(tm.model, window, {"targets": setup.normaliser(window)}, setup, cpu, nullcontext())
        return _grads(tm.model)

    whole = run([collate(ds.examples, pad)])
    halves = run([collate(ds.examples[:2], pad), collate(ds.examples[2:], pad)])
    singles = run([collate([ex], pad) for ex in ds.examples])
    for name in whole:
        assert torch.allclose(whole[name], halves[name], atol=1e-7, rtol=1e-4), name
        assert torch.allclose(whole[name], singles[name], atol=1e-7, rtol=1e-4), name
    # the common bug, a mean of micro-batch means, gives a different gradient on uneven lengths
    tm.model.zero_grad(set_to_none=True)
    for ex in ds.examples:
        b = collate([ex], pad)
        loss, mask = full_logits_token_losses(tm.model(input_ids=b["input_ids"]).logits, b["labels"])
        (loss.sum() / mask.sum() / 4).backward()
    wrong = _grads(tm.model)
    assert max((wrong[n] - whole[n]).abs().max() for n in whole) > 1e-4


def test_accumulation_matches_one_big_batch_in_training(tmp_path, tiny_model_no_dropout, prepared_data):
    te.train(_args(tiny_model_no_dropout, prepared_data, tmp_path / "big", "--max_steps", "3",
                   "--batch_size", "4", "--gradient_accumulation_steps", "1"))
    te.train(_args(tiny_model_no_dropout, prepared_data, tmp_path / "acc", "--max_steps", "3",
                   "--batch_size", "2", "--gradient_accumulation_steps", "2"))
    big, acc = _weights(tmp_path / "big"), _weights(tmp_path / "acc")
    # Adam turns float-rounding differences of the gradient into small weight differences; far below one
    # step's size (lr 3e-3 per element), which is where a wrong normalisation would show.
    for name in big:
        assert torch.allclose(big[name], acc[name], atol=1e-4), name
    losses = [[json.loads(x)["loss"] for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
              for r in ("big", "acc")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


# --- resume, signals, faults -----------------------------------------------------------------------------------

def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, tiny_model_dir, prepared_data):
    full = te.train(_args(tiny_model_dir, prepared_data, tmp_path / "full"))
    assert full["exit_code"] == 0 and full["global_step"] == full["planned_steps"]
    run = tmp_path / "resumed"
    first = te.train(_args(tiny_model_dir, prepared_data, run, "--stop_after_step", "3"))  # as a SIGTERM would
    assert first["exit_code"] == te.EXIT_INTERRUPTED and first["global_step"] == 3
    assert first["status"] == "interrupted" and not (run / "theta_final").exists()
    second = te.train(_args(tiny_model_dir, prepared_data, run, "--stop_after_step", "3"))  # the same command
    assert second["exit_code"] == 0 and second["global_step"] == full["global_step"]
    a, b = _weights(tmp_path / "full"), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical, dropout included
    hist_a = json.loads((tmp_path / "full" / "loss_history.json").read_text())
    hist_b = json.loads((run / "loss_history.json").read_text())
    assert [h["val_loss"] for h in hist_a] == [h["val_loss"] for h in hist_b]
    assert [h["train_loss"] for h in hist_a] == pytest.approx([h["train_loss"] for h in hist_b], rel=1e-9)
    # tensorboard continues at the right step: every step once, no overlapping curves
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert sorted(steps) == list(range(1, full["global_step"] + 1))
    assert {"val/loss", "val/perplexity", "val/token_accuracy", "train/lr", "train/grad_norm"} <= \
        set(acc.Tags()["scalars"])
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, full["global_step"] + 1))


def test_resume_skips_incomplete_and_corrupt_checkpoints(tmp_path, tiny_model_dir, prepared_data):
    run = tmp_path / "run"
    te.train(_args(tiny_model_dir, prepared_data, run, "--save_every_steps", "1", "--keep_last_n_checkpoints", "5",
                   "--stop_after_step", "3"))
    ckpts = sorted(te.list_checkpoints(run / "checkpoints"), key=lambda p: int(p.name.split("_")[1]))
    assert [p.name for p in ckpts] == ["step_1", "step_2", "step_3"]
    (ckpts[-1] / te.COMPLETE_MARKER).unlink()              # an interrupted save
    (ckpts[-2] / "state.pt").write_bytes(b"not a checkpoint")  # a torn file
    path, state = te.find_resume_checkpoint(run / "checkpoints")
    assert path.name == "step_1" and state["global_step"] == 1


def test_sigterm_saves_a_loadable_checkpoint(tmp_path, tiny_model_dir, prepared_data):
    run = tmp_path / "run"
    cmd = [sys.executable, "src/training/train_enhanced.py", "--model_name", str(tiny_model_dir), "--data_path",
           str(prepared_data), "--output_dir", str(run), "--epochs", "200", "--batch_size", "2", "--num_samples", "0",
           "--max_length", "96", "--no_progress_bar"]
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == te.EXIT_INTERRUPTED, output[-2000:]
    assert "Traceback" not in output
    found = te.find_resume_checkpoint(run / "checkpoints")
    assert found is not None
    path, state = found
    assert state["global_step"] >= 2 and (path / te.COMPLETE_MARKER).exists()
    assert json.loads((run / "training_config.json").read_text())["status"] == "interrupted"


def _run_at_epoch_start(args):
    """The recipe's set-up pieces, up to the first step of the first epoch."""
    run = te.start_run(args)
    te.load_data(run)
    te.setup_run(run)
    te.begin_epoch(run)
    return run


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path, tiny_model_dir, prepared_data):
    run = _run_at_epoch_start(_args(tiny_model_dir, prepared_data, tmp_path / "run", "--max_nonfinite_steps", "2"))
    real = run.loss.lm_loss  # the LM-loss hook of the recipe's one loss (R-Drop's door): NaN comes in through it

    def nan_loss(*args, **kwargs):
        out = real(*args, **kwargs)
        return {**out, "loss_sum": out["loss_sum"] * float("nan")}

    weights = lambda: {n: p.detach().clone() for n, p in run.model.named_parameters()}  # noqa: E731
    before = weights()
    run.loss.lm_loss = nan_loss
    result = te.optimizer_step(run, te.next_window(run))
    assert not result.finite and run.state.nonfinite_total == 1 and run.state.global_step == 1
    assert all(torch.equal(before[n], p) for n, p in weights().items())  # skipped: no update at all
    run.loss.lm_loss = real
    assert te.optimizer_step(run, te.next_window(run)).finite and run.state.nonfinite_in_row == 0
    assert any(not torch.equal(before[n], p) for n, p in weights().items())
    run.loss.lm_loss = nan_loss
    te.optimizer_step(run, te.next_window(run))
    with pytest.raises(te.StopTraining) as stop:  # the second in a row: --max_nonfinite_steps 2
        te.optimizer_step(run, te.next_window(run))
    assert stop.value.exit_code == te.EXIT_NONFINITE and run.state.nonfinite_total == 3
    te.close_outputs(run)
    run.exit_code, run.status = stop.value.exit_code, stop.value.status
    summary = te.finish(run)
    assert summary["exit_code"] == te.EXIT_NONFINITE and summary["nonfinite_steps"] == 3
    assert not (tmp_path / "run" / "theta_final").exists()


def test_cuda_oom_halves_the_micro_batch_with_the_same_result(tmp_path, tiny_model_no_dropout, prepared_data,
                                                              monkeypatch):
    te.train(_args(tiny_model_no_dropout, prepared_data, tmp_path / "plain", "--max_steps", "3"))
    from transformers import GPT2LMHeadModel

    real_forward = GPT2LMHeadModel.forward

    def small_memory_forward(self, input_ids=None, **kw):
        if self.training and input_ids.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(self, input_ids=input_ids, **kw)

    monkeypatch.setattr(GPT2LMHeadModel, "forward", small_memory_forward)
    te.train(_args(tiny_model_no_dropout, prepared_data, tmp_path / "oom", "--max_steps", "3"))
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "oom")
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)  # see the accumulation test on tolerance
    assert "micro-batch now 2 x 2 accumulation" in (tmp_path / "oom" / "train.log").read_text()


class _FailingSender(EmailSender):
    """The real sender whose every email fails inside it (as a broken mail set-up would)."""

    def send(self, kind, build, priority=False):
        raise RuntimeError("mail server on fire")


class _HangingSender(EmailSender):
    """The real sender whose SMTP server never answers."""

    def _deliver(self, msg):
        time.sleep(30)


def test_a_failing_or_hanging_notifier_never_stops_training(tmp_path, tiny_model_dir, prepared_data):
    config = EmailConfig(sender="a@example.org", recipients=["b@example.org"], password="pw", status_interval_min=0)
    for kind in (_FailingSender, _HangingSender):
        notifier = TrainingEmailNotifier(kind(config, run_name="t", shutdown_wait_s=0.2),
                                         run_dir=tmp_path / kind.__name__)
        summary = te.train(_args(tiny_model_dir, prepared_data, tmp_path / kind.__name__, "--epochs", "1",
                                 "--batch_size", "8"), notifier)
        notifier.close(timeout=0.2)
        assert summary["exit_code"] == 0 and (tmp_path / kind.__name__ / "theta_final").is_dir()
        if kind is _FailingSender:
            assert notifier.counts["failed"] >= 3  # start, epoch and completed were each called and each failed
        else:
            assert notifier.history and notifier.history[0]["epoch"] == 1  # the epoch entry reached it...
            assert notifier.sender.pending() > 0  # ...and training did not wait for the silent server


# --- command line ----------------------------------------------------------------------------------------------

def test_profiles_and_explicit_flags():
    args = te.parse_args(["--profile", "quick", "--epochs", "7"])
    assert args.model_name == "theta-tiny" and args.epochs == 7
    args = te.parse_args(["--profile", "rtx3060"])
    assert (args.model_name, args.batch_size, args.gradient_accumulation_steps, args.learning_rate, args.epochs,
            args.patience, args.warmup_proportion, args.scheduler_type, args.num_cycles, args.weight_decay) == \
        ("gpt2-medium", 3, 4, 3e-5, 20, 5, 0.15, "cosine_hard_restarts", 4, 0.01)
    assert te.parse_args(["--no_color"]).color is False and te.parse_args(["--color"]).color is True
    assert te.parse_args(["--gradient_checkpointing"]).gradient_checkpointing is True
    assert te.parse_args(["--no_gradient_checkpointing"]).gradient_checkpointing is False


@pytest.mark.parametrize("flags,named", [(["--batch_size", "0"], "--batch_size"),
                                         (["--learning_rate", "-1"], "--learning_rate"),
                                         (["--warmup_proportion", "1.5"], "--warmup_proportion"),
                                         (["--resume", "/no/such/checkpoint"], "--resume"),
                                         (["--scheduler_type", "triangle"], "--scheduler_type"),
                                         (["--use_cpu_offload", "--precision", "fp16"], "--precision fp16")])
def test_bad_flags_name_the_flag_without_traceback(flags, named, capsys):
    with pytest.raises(SystemExit) as stop:  # in-process: the command line's own path is the test below
        te.run_entry_point(te.main, flags)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and named in err and "Traceback" not in err


def test_command_line_errors_exit_2_without_traceback(tmp_path, tiny_model_dir):
    out = run_script(["-m", "src.training.train_enhanced", "--batch_size", "0"])  # argparse
    assert out.returncode == 2 and "--batch_size" in out.stderr and "Traceback" not in out.stderr
    bad = tmp_path / "enhanced_training_data.json"
    bad.write_text('[{"question": "q", "answer": "a"}]')
    out = run_script(["src/training/train_enhanced.py", "--model_name", str(tiny_model_dir), "--data_path", str(bad),
                      "--output_dir", str(tmp_path / "run")])  # a UserError, run as a file
    assert out.returncode == 2 and "re-run data preparation" in out.stderr.lower() and "Traceback" not in out.stderr


# --- distributed -----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_torchrun_two_processes_match_single_process(tmp_path, tiny_model_no_dropout, prepared_data):
    common = ["--model_name", str(tiny_model_no_dropout), "--data_path", str(prepared_data), "--max_steps", "3",
              "--learning_rate", "3e-3", "--max_length", "96", "--num_samples", "0", "--seed", "3",
              "--no_progress_bar", "--device", "cpu"]
    single = run_script(["-m", "src.training.train_enhanced", *common, "--batch_size", "4",
                         "--output_dir", str(tmp_path / "single")])
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "src.training.train_enhanced", *common, "--batch_size", "2",
                          "--output_dir", str(tmp_path / "ddp")], cwd=PROJECT_ROOT, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert ddp.returncode == 0, ddp.stdout[-2000:] + ddp.stderr[-2000:]
    a, b = _weights(tmp_path / "single"), _weights(tmp_path / "ddp")
    # same global batch of 4: gradients agree up to float summation order
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)
    config = json.loads((tmp_path / "ddp" / "training_config.json").read_text())
    assert config["environment"]["world_size"] == 2


def test_hyperparameters_doc_lists_every_flag():
    doc = (PROJECT_ROOT / "documentation" / "HYPERPARAMETERS.md").read_text(encoding="utf-8")
    flags = [o for a in te.build_parser()._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    missing = [f for f in flags if f"`{f}`" not in doc]
    assert not missing, f"regenerate with documentation/make_hyperparameters_md.py: {missing}"
