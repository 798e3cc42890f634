"""src/training/preflight.py: impossible set-ups stop with the fix named (no disk, a missing model, a batch that
does not fit a simulated GPU), the data counts match a count made by hand, the arithmetic of the disk and duration
estimates, the token checks, and the test email.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_preflight.py -q
"""

from __future__ import annotations

import json
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace

import pytest

from recipe_harness.fixtures import one_thread  # noqa: F401 (fixture: torch on one thread, the tiny model's speed)
from src.training import preflight as pf
from test_email_notifier import SmtpServer, email_env, tls_cert  # noqa: F401 (fixture)

Usage = namedtuple("Usage", "total used free")


def run(capsys, *argv, probe_factory=None) -> tuple[int, str]:
    code = pf.main(list(argv), probe_factory=probe_factory)
    return code, capsys.readouterr().out


@pytest.fixture
def prepared(tmp_path, tiny_records) -> Path:
    """A prepared file written here (the records as preparation would write them, every fifth for validation):
    these tests check the pre-flight, not preparation."""
    from src.utils.data_contract import PREPARED_FORMAT_VERSION

    records = [{**r, "split": "validation" if i % 5 == 0 else "train", "quality_score": 0.8, "difficulty": 2}
               for i, r in enumerate(tiny_records)]
    path = tmp_path / "enhanced_training_data.json"
    path.write_text(json.dumps({"format_version": PREPARED_FORMAT_VERSION, "records": records}))
    return path


@pytest.fixture
def base(tmp_path, tiny_model_dir, prepared) -> list[str]:
    run_dir = tmp_path / "models" / "theta_enhanced_20300101_000000"
    run_dir.mkdir(parents=True)
    return ["--profile", "quick", "--run_dir", str(run_dir), "--data_path", str(prepared),
            "--", "--model_name", str(tiny_model_dir), "--max_length", "128"]


def test_a_good_setup_passes_and_records_its_report(capsys, base, monkeypatch):
    for k in [k for k in __import__("os").environ if k.startswith("EMAIL_")]:
        monkeypatch.delenv(k)
    code, out = run(capsys, *base)
    assert code == 0, out
    for name in ("flags", "model", "tokens", "disk", "data", "memory", "duration", "email"):
        assert f" {name} " in out
    report = json.loads((Path(base[3]) / "preflight.json").read_text())
    assert report["fatal"] == [] and report["estimate"]
    assert [c["level"] for c in report["checks"] if c["name"] == "memory"] == ["skip"]  # no CUDA here


def test_no_disk_stops_with_the_fix(capsys, base, monkeypatch):
    monkeypatch.setattr(pf.shutil, "disk_usage", lambda path: Usage(10 * pf.GB, 10 * pf.GB - 5 * pf.MB, 5 * pf.MB))
    code, out = run(capsys, *base)
    assert code == 2 and "FATAL disk" in out and "5 MB free" in out
    assert "fix: free some space there, or keep fewer checkpoints (--keep_last_n_checkpoints 1, --no_ema)" in out
    assert "pre-flight FAILED" in out


def test_missing_model_stops_with_the_fix(capsys, base):
    argv = base[:-4] + ["--model_name", str(Path(base[3]) / "no such model")]
    code, out = run(capsys, *argv)
    assert code == 2 and "FATAL model" in out and "model folder not found" in out and "fix:" in out
    # A hub name that is not cached, offline: the message says how to get it or what to use instead.
    code, out = run(capsys, *base[:-4], "--model_name", "theta-no-such-org/no-model")
    assert code == 2 and "cannot load the hub model" in out and "--model_name theta-tiny" in out


def test_a_batch_that_does_not_fit_the_simulated_gpu_stops_with_the_flags(capsys, base):
    made = {}

    def factory(model, device, targs):
        # Capacity between what micro-batch 3 and 4 need at the probed length (R-Drop doubles the batch).
        probe = pf.SimulatedProbe.for_model(model, 0)
        probe.capacity = probe.peak(7, 128)  # 7 sequences of 128 fit, 8 do not
        made["probe"] = probe
        return probe

    # --no_data: the probe runs at --max_length (with data: the longest record, when shorter).
    nodata = base[:6] + ["--no_data"] + base[6:]
    code, out = run(capsys, *nodata, "--batch_size", "8", probe_factory=factory)
    assert code == 2 and "FATAL memory" in out and "micro-batch 8 at 128 tokens does not fit" in out
    # R-Drop (on in the quick profile) doubles the batch: 2 x 3 = 6 sequences fit, 2 x 4 = 8 do not. Of the
    # micro-batches up to 3, 2 divides the effective batch 8: four steps of 2.
    assert "fix: --batch_size 2 --gradient_accumulation_steps 4 (the largest micro-batch that fits is 3; " \
           "effective batch 8, was 8)" in out
    # The same set-up on a large enough simulated card passes the memory check.
    code, out = run(capsys, *nodata, "--batch_size", "2", probe_factory=factory)
    assert " ok    memory    micro-batch 2 (x2 for R-Drop) at 128 tokens fits" in out


@pytest.mark.parametrize("capacity", [0, 1, 5, 6, 17, 64, 100])
def test_largest_fitting_batch_matches_a_linear_search(capacity):
    def probe(batch, seq):
        if batch * seq > capacity * 10:
            raise pf.ProbeOutOfMemory("no")
        return batch * seq

    expected = max([b for b in range(1, 64) if b * 10 <= capacity * 10] or [0])
    assert pf.largest_fitting_batch(probe, 10, 64) == min(expected, 63)


def test_simulated_probe_of_a_gpt2_shape_by_hand():
    """GPT-2's shapes give Korthikanti et al.'s 34 x hidden bytes per token and layer; the head costs the trainer's
    chunked loss (lm_loss.py), not [B, T, V] logits."""
    shape = pf.ModelShape("gpt2", hidden=8, layers=2, intermediate=32, vocab=50, heads=2, kv_heads=2, head_dim=4,
                          tied_head=True, positions=16, gated_mlp=False, layer_norm_bias=True, qkv_bias=True,
                          out_bias=True, mlp_bias=True, residual_dropout=True)
    assert shape.activation_bytes_per_token() == 34 * 8 * 2
    # 50 x 8 token + 16 x 8 position embeddings; per layer: qkv 8 x 24 + 24, proj 8 x 8 + 8, fc 8 x 32 + 32,
    # proj 32 x 8 + 8, two LayerNorms 2 x 16; the final LayerNorm 16; the head tied.
    assert shape.parameters() == 400 + 128 + 2 * (216 + 72 + 288 + 264 + 32) + 16 == 2288
    probe = pf.SimulatedProbe(10 * pf.GB, shape, pf.WeightMemory(1000))
    # 16 B x 1000 + the head's fp32 gradient 4 x 50 x 8 + 12 tokens x (544 activations + 8 x 8 gathered rows and
    # their gradient) + one chunk of 12 logits rows and their gradient, 8 x 50 x 12
    assert probe(3, 4) == 16 * 1000 + 1600 + 12 * (544 + 64) + 8 * 50 * 12
    with pytest.raises(pf.ProbeOutOfMemory):
        pf.SimulatedProbe(16_000, shape, pf.WeightMemory(1000))(1, 1)


def test_simulated_probe_of_a_tiny_llama_by_hand(family_dirs):
    """The tiny Llama of tests/model_families.py (hidden 64, 2 layers, intermediate 128, 4 heads of 16, 2 KV
    heads, vocabulary 512, untied head, no dropout), computed here by hand from those numbers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(family_dirs["llama"])
    # parameters: embedding 512 x 64 = 32768; a layer: q 64 x 64 = 4096, k and v 64 x 32 = 2048 each, o 4096,
    # gate/up/down 3 x 64 x 128 = 24576, two RMSNorms 128 -> 36992; the final norm 64; the untied head 32768.
    params = 32768 + 2 * 36992 + 64 + 32768
    assert params == 139584 == sum(p.numel() for p in model.parameters())
    shape = pf.ModelShape.from_config(model.config)
    assert shape.parameters() == params
    # per token and layer, 16-bit: norm inputs 2 x 128 = 256; attention input 128, q 128, k and v 2 x 64, the
    # output projection's input 128 = 512; MLP input 128, gate, up, SiLU and product 4 x 256 = 1024; no dropout
    per_layer = 256 + 512 + 128 + 1024
    assert shape.activation_bytes_per_token() == 2 * per_layer == 3840
    assert shape.activation_bytes_per_token(checkpointing=True) == 2 * 128 + per_layer
    probe = pf.SimulatedProbe.for_model(model, 10 * pf.GB)
    # 16 B x 139584 + head gradient 4 x 512 x 64; 300 tokens x (3840 + 8 x 64); chunk 300 rows x 8 x 512
    assert probe(3, 100) == 16 * 139584 + 131072 + 300 * (3840 + 512) + 300 * 4096 == 4898816
    # a frozen 16-bit base under 10,000 trainable adapter weights and a frozen head (the LoRA issue)
    lora = pf.SimulatedProbe(10 * pf.GB, shape, pf.WeightMemory(10_000, params, 2.0), head_trainable=False)
    assert lora(3, 100) == 16 * 10_000 + 2 * 139584 + 300 * (3840 + 512) + 300 * 4096


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "qwen3", "mistral", "phi3"])
def test_parameters_from_the_config_match_torch_for_every_family(family, family_dirs):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(family_dirs[family])
    assert pf.ModelShape.from_config(AutoConfig.from_pretrained(family_dirs[family])).parameters() == \
        sum(p.numel() for p in model.parameters())


def test_the_memory_probe_steps_through_the_trainer_loss_not_full_logits(family_dirs, monkeypatch):
    """probe_step (CudaProbe's step) on the CPU, a tiny Llama: one call of the trainer's lm_loss.step_losses, and
    the LM head never sees a position (no [B, T, V] logits); the gradients reached the weights."""
    from contextlib import nullcontext

    import torch
    from transformers import AutoModelForCausalLM

    from src.training import lm_loss

    model = AutoModelForCausalLM.from_pretrained(family_dirs["llama"])
    calls, head_positions = [], []
    real = lm_loss.step_losses
    monkeypatch.setattr(lm_loss, "step_losses", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    model.get_output_embeddings().register_forward_hook(lambda m, i, o: head_positions.append(i[0].shape[-2]))
    stepped, real_step = [], torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        stepped.append(all(p.grad is not None for g in self.param_groups for p in g["params"]))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    pf.probe_step(model, 2, 16, torch.device("cpu"), nullcontext())
    assert len(calls) == 1 and torch.equal(calls[0]["labels"], calls[0]["input_ids"])
    assert calls[0]["input_ids"].shape == (2, 16) and head_positions == [0]
    assert stepped == [True] and model.get_output_embeddings().weight.grad is None  # every gradient, then freed


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_probe_measures_a_tiny_llama(family_dirs):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(family_dirs["llama"]).cuda()
    peak = pf.CudaProbe(model, torch.device("cuda"), torch.autocast("cuda", dtype=torch.bfloat16))(2, 64)
    assert peak >= 16 * sum(p.numel() for p in model.parameters())


def test_expected_run_bytes_is_the_peak_by_hand():
    # 1000 parameters, 2 kept, EMA: a checkpoint is 1000 x (4 weights + 8 Adam + 4 EMA) = 16000 B, a model 4000 B.
    # Writing the third checkpoint beside two, with theta_best/: 3 x 16000 + 4000 = 52000; the end: 2 x 16000 +
    # 4 x 4000 = 48000.
    assert pf.expected_run_bytes(1000, keep_checkpoints=2, use_ema=True) == {
        "per_checkpoint": 16000, "model": 4000, "peak": 52000, "phase": "while a checkpoint is written"}
    # CPU offload of half the parameters adds their fp32 masters: 1000 x (12 + 2) = 14000 B a checkpoint.
    assert pf.expected_run_bytes(1000, 1, False, offload_fraction=0.5)["peak"] == 2 * 14000 + 4000
    # No EMA: a checkpoint is 3 models, so the end (3 x 12000 + 4 x 4000 = 52000) ties the last checkpoint's write.
    assert pf.expected_run_bytes(1000, 3, False)["peak"] == 4 * 12000 + 4000 == 3 * 12000 + 4 * 4000
    # Adapters: 10 trainable weights of 1000, EMA on: a checkpoint is 10 x 16 = 160 B, the model folders still
    # whole (4000 B): writing the third checkpoint 3 x 160 + 4000 = 4480, the end 2 x 160 + 4 x 4000 = 16320.
    assert pf.expected_run_bytes(1000, 2, True, trainable=10) == {
        "per_checkpoint": 160, "model": 4000, "peak": 16320, "phase": "at the end, with the three model folders"}


def test_check_disk_counts_what_a_resumed_run_already_holds(tmp_path, monkeypatch):
    targs = SimpleNamespace(keep_last_n_checkpoints=2, use_ema=False, use_cpu_offload=False, cpu_offload_fraction=0.5)
    peak = pf.expected_run_bytes(10 ** 6, 2, False)["peak"]  # 3 x 12 MB + 4 MB = 40 MB
    run_dir = tmp_path / "run"
    monkeypatch.setattr(pf.shutil, "disk_usage", lambda path: Usage(10 * peak, 9 * peak, peak - 10 ** 6))
    assert pf.check_disk(run_dir, 10 ** 6, targs).level == "fatal"  # a new run: 1 MB short
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "state.pt").write_bytes(b"\0" * 2 * 10 ** 6)  # a resumed run's 2 MB are counted
    check = pf.check_disk(run_dir, 10 ** 6, targs)
    assert check.level == "warn" and "2 MB of it already there" in check.message, check.message


def test_step_time_fit_and_counts_by_hand():
    # seconds = 0.5 + 0.01 x tokens exactly: least squares finds it
    assert pf.fit_step_time([(100, 1.5), (200, 2.5), (400, 4.5)]) == (pytest.approx(0.5), pytest.approx(0.01))
    # a negative intercept falls back to seconds proportional to tokens: 7 s over 700 tokens
    assert pf.fit_step_time([(100, 0.1), (600, 6.9)]) == (0.0, pytest.approx(7.0 / 700))
    assert pf.fit_step_time([(300, 3.0)]) == (0.0, pytest.approx(0.01))  # one size: proportional
    lengths = [5, 9, 3, 7]
    assert pf.padded_tokens([[0, 1], [2], [3, 2]], lengths) == 2 * 9 + 1 * 3 + 2 * 7  # each batch at its longest
    assert pf.padded_tokens([[0, 1], [2]], lengths, packed=True) == 5 + 9 + 3
    # --max_steps 10 of epochs of 4, 4, 4, 4: three epochs start (the third is cut short and validated at the end)
    assert pf.epochs_validated([4, 4, 4, 4], 10) == 3 and pf.epochs_validated([4, 4], 8) == 2


def test_the_estimate_plans_the_steps_the_trainer_runs_and_leaves_nothing_behind(capsys, base, tmp_path):
    """Oracle: the trainer itself. With the curriculum's smaller first pools (--profile quick has it), the planned
    steps the pre-flight reports are the summary's planned_steps and the steps the run took; the pre-flight writes
    nothing into the run folder but preflight.json and leaves the global random state as it was."""
    import torch

    import src.training.train_enhanced as te

    run_dir = Path(base[3])
    flags = base[base.index("--") + 1:] + ["--epochs", "3"]
    rng = torch.get_rng_state()
    code, out = run(capsys, *base, "--epochs", "3", "--domain_eval_frequency", "0")
    assert code == 0, out
    assert torch.equal(torch.get_rng_state(), rng)
    assert sorted(p.name for p in run_dir.iterdir()) == ["preflight.json"]
    plan = json.loads((run_dir / "preflight.json").read_text())["plan"]
    summary = te.train(te.parse_args(["--profile", "quick", "--data_path", base[5], "--output_dir", str(run_dir),
                                      "--no_progress_bar", "--num_samples", "0", "--domain_eval_frequency", "0",
                                      *flags]))
    assert summary["exit_code"] == 0 and summary["global_step"] == summary["planned_steps"], summary
    assert plan["planned_steps"] == summary["planned_steps"]
    assert plan["steps_in_epoch"][0] < plan["steps_in_epoch"][-1]  # the curriculum's smaller first pool is seen
    assert len(plan["steps_in_epoch"]) == 3 and plan["timed_steps"] >= 1 and plan["train_s"] > 0
    assert f"training about {json.loads((run_dir / 'preflight.json').read_text())['estimate']}" in out


def test_a_set_up_the_trainer_would_refuse_is_fatal(capsys, base, tmp_path, tiny_records):
    """A prepared file with no validation record passes the data counts, but the trainer's set-up refuses it."""
    from src.utils.data_contract import PREPARED_FORMAT_VERSION

    data = tmp_path / "no_validation.json"
    data.write_text(json.dumps({"format_version": PREPARED_FORMAT_VERSION,
                                "records": [{**r, "split": "train"} for r in tiny_records]}))
    argv = base[:4] + ["--data_path", str(data)] + base[6:]
    code, out = run(capsys, *argv)
    assert code == 2 and "FATAL setup" in out and "no validation records" in out


def test_data_counts_match_a_count_by_hand(capsys, base, tmp_path, tiny_model_dir):
    from src.model.theta_model import ThetaModel, split_prompt

    records = [{"id": "ok", "question": "What is DNS?", "answer": "It maps names.", "domain": "networking"},
               {"id": "long-answer", "question": "What is TCP?", "answer": "reliable stream " * 40,
                "domain": "networking"},
               {"id": "long-question", "question": "why " * 60 + "?", "answer": "Because.", "domain": "networking"},
               {"id": "val", "question": "What is UDP?", "answer": "Datagrams.", "domain": "networking",
                "split": "validation"}]
    data = tmp_path / "prepared.json"
    data.write_text(json.dumps({"format_version": json.loads(Path(base[5]).read_text())["format_version"],
                                "records": records}))  # the same version as the fixture's file
    tok = ThetaModel.load(tiny_model_dir).tokenizer
    L = 32
    # By hand: a record is cut when prompt + answer + end-of-text exceed L tokens; it has no target left when its
    # prompt alone fills the L positions (the first answer token would be at position >= L).
    truncated = no_target = 0
    for r in records:
        p = len(tok(split_prompt(r["question"], None, r.get("context"))[0])["input_ids"])
        a = len(tok(" " + r["answer"].strip())["input_ids"]) + 1
        truncated += p + a > L
        no_target += p >= L
    assert (truncated, no_target) == (2, 1)
    argv = base[:4] + ["--data_path", str(data), "--only", "data", "--", "--model_name", str(tiny_model_dir),
                       "--max_length", str(L)]
    code, out = run(capsys, *argv)
    assert code == 0, out
    assert (f"warn  data      4 records: {no_target} with no target token after truncation at {L} tokens, "
            f"{truncated} answers truncated ({100 * truncated / 4:.1f}%): the trainer skips those {no_target}") in out
    report = json.loads((Path(base[3]) / "preflight.json").read_text())
    assert any("the trainer skips those 1" in w for w in report["warnings"])


def test_token_checks_catch_a_pad_that_is_end_of_text(tiny_model_dir):
    from src.model.theta_model import ThetaModel

    tok = ThetaModel.load(tiny_model_dir).tokenizer
    targs = SimpleNamespace(max_length=64, loss_on="answer")
    assert pf.check_tokens(tok, targs).level == "ok"
    tok.pad_token = tok.eos_token
    check = pf.check_tokens(tok, targs)
    assert check.level == "fatal" and "the pad token" in check.message and check.fix

    class NoEos:
        eos_token_id, pad_token_id, eos_token, pad_token = None, 1, None, "<pad>"

        def __call__(self, texts, **kwargs):
            return {"input_ids": [[5, 6] for _ in texts]}

    check = pf.check_tokens(NoEos(), targs)
    assert check.level == "fatal" and "is not a trained target" in check.message


def test_bad_trainer_flags_are_fatal_and_named(capsys, base):
    code, out = run(capsys, *base, "--batch_size", "0")
    assert code == 2 and "FATAL flags" in out and "--batch_size must be at least 1" in out


def test_email_test_message(capsys, base, tls_cert, monkeypatch):
    server = SmtpServer(*tls_cert)
    try:
        for k, v in email_env(server.port, tls_cert[0]).items():
            monkeypatch.setenv(k, v)
        code, out = run(capsys, *base[:6], "--no_data", "--email_test", *base[6:])
        msgs = server.wait_for(1)
    finally:
        server.stop()
    assert code == 0 and "ok    email     test message sent to" in out
    assert "test email" in msgs[0]["Subject"]


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_email_without_tls_is_a_warning_naming_the_setting(monkeypatch):
    """Regression: with TLS off the pre-flight said "ok ... plain (no TLS)" while the password went out in clear."""
    monkeypatch.setattr("src.utils.email_notifier.PROJECT_ROOT", Path("/nonexistent"))  # no .env

    def check(port: int, send_test: bool, **env):
        for k in [k for k in __import__("os").environ if k.startswith("EMAIL_")]:
            monkeypatch.delenv(k)
        for k, v in email_env(port, None, EMAIL_USE_TLS="0", **env).items():
            monkeypatch.setenv(k, v)
        return pf._email_check(send_test)

    remote = check(25, False, EMAIL_SMTP_SERVER="mail.example.org")
    assert remote.level == "warn" and "no password is sent without TLS" in remote.message
    assert "EMAIL_ALLOW_PLAIN_AUTH=1" in remote.fix and "EMAIL_USE_TLS=1" in remote.fix
    allowed = check(25, False, EMAIL_SMTP_SERVER="mail.example.org", EMAIL_ALLOW_PLAIN_AUTH="1")
    assert allowed.level == "warn" and "password is sent unencrypted" in allowed.message
    relay = SmtpServer(tls=False, auth=None)  # a relay on this machine that asks for no login: fine
    locked = SmtpServer(tls=False, auth="required")  # one that does: the password is not sent, the test fails
    try:
        assert check(relay.port, True).level == "ok" and len(relay.wait_for(1)) == 1
        refused = check(locked.port, True)
        assert refused.level == "warn" and "plain_auth" in refused.message and locked.auth_attempts == 0
    finally:
        relay.stop()
        locked.stop()
