"""What the trainer's emails say (src/training/run_emails.py), read back from a real SMTP server on localhost: start,
epochs with the techniques' fields the trainer really writes, status, completion with the report's loss curve,
failure; the alerts against hand-set thresholds; the notifier's interface, and the factory the trainer calls.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_run_emails.py -q
"""

from __future__ import annotations

import argparse
import inspect
import logging
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from src.training import run_emails as emails
from src.training.report import plot_loss_curve
from src.utils import email_notifier as en
from test_email_notifier import (PASSWORD, SmtpServer, all_text, email_env, free_port, make_sender, parts,  # noqa: F401
                                 smtp_server, subj, tls_cert)

ROOT = Path(__file__).resolve().parents[1]
RUN = "theta_enhanced_20260101_230000"

GPU_INFO = {"source": "nvidia-smi", "gpus": [
    {"index": 0, "name": "NVIDIA GeForce RTX 3060", "temperature_c": 84, "memory_used_mb": 11800,
     "memory_total_mb": 12288, "memory_free_mb": 488, "utilization_pct": 98, "power_w": 165.2, "power_limit_w": 170}],
    "system": {"cpu_count": 8, "cpu_percent": 35.0, "ram_used_mb": 9000, "ram_total_mb": 32000, "ram_percent": 28.1}}

# Epoch entries as train_enhanced.epoch_entry writes them, with the fields EMA, R-Drop and the dynamic curriculum
# add (their epoch_fields).
EPOCH_1 = {"epoch": 1, "step": 40, "train_loss": 2.5, "val_loss": 2.25, "val_perplexity": 9.4877,
           "val_token_accuracy": 0.412, "learning_rate": 3e-5, "seconds": 600.0,
           "domains": {"networking": {"loss": 2.0, "perplexity": 7.39, "token_accuracy": 0.45},
                       "<b>bold</b> & co": {"loss": 3.4, "perplexity": 29.96, "token_accuracy": 0.2}},
           "ema": {"active": True, "decay": 0.998, "updates": 40}, "train_kl": 0.0123, "difficult_ratio": 0.25}
EPOCH_2 = {**EPOCH_1, "epoch": 2, "step": 80, "train_loss": 2.0, "val_loss": 2.6, "val_perplexity": 13.46,
           "learning_rate": 1e-8, "train_kl": 0.7, "difficult_ratio": 0.8}
SUMMARY = {"run": RUN, "status": "completed", "global_step": 80, "planned_steps": 80, "epochs_run": 2,
           "best_epoch": 1, "best_val_loss": 2.25, "seconds": 1234.5, "final_model": f"models/{RUN}/theta_final",
           "exit_code": 0}


def make_notifier(env: dict, run_dir: Path | None = None, **kwargs) -> emails.TrainingEmailNotifier:
    kwargs.setdefault("gpu_probe", lambda: GPU_INFO)
    return emails.TrainingEmailNotifier(make_sender(env, run_name=RUN), run_dir=run_dir, **kwargs)


def test_alert_thresholds():
    alerts = emails.metric_alerts(EPOCH_2, [EPOCH_1], total_epochs=10, initial_lr=3e-5)
    text = " ".join(t for _, t in alerts)
    assert "learning rate collapsed" in text and "overfitting" in text
    assert "R-Drop KL divergence 0.700 > 0.5" in text and "difficult-example ratio 0.80 > 0.6" in text
    assert "domain <b>bold</b> & co: token accuracy" in text
    assert emails.metric_alerts({"val_loss": math.nan}, [], None, None)[0][0] == "critical"
    assert emails.metric_alerts({"val_perplexity": 3.0, "val_token_accuracy": 0.8, "val_loss": 1.1, "train_kl": 0.1,
                              "difficult_ratio": 0.5}, [], 5, None) == []


def test_technique_rows_show_every_field_beyond_the_standard_ones():
    assert emails.technique_rows(EPOCH_1) == [("difficult ratio", "0.2500"), ("ema active", "True"),
                                           ("ema decay", "0.9980"), ("ema updates", "40"), ("train kl", "0.0123")]
    assert emails.technique_rows({k: v for k, v in EPOCH_1.items() if k in emails.ENTRY_FIELDS}) == []


def test_the_trainers_emails_reach_a_real_server(smtp_server, tls_cert, tmp_path):
    run_dir = tmp_path / "models" / RUN
    run_dir.mkdir(parents=True)
    log = tmp_path / "train.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)) + "Traceback: boom\n", encoding="utf-8")
    n = make_notifier(email_env(smtp_server.port, tls_cert[0]), run_dir=run_dir, log_file=log)
    n.start(argparse.Namespace(model_name="gpt2-medium", epochs=10, batch_size=3, learning_rate=3e-5, use_ema=True,
                               use_rdrop=False, email_password=PASSWORD))
    n.epoch(1, EPOCH_1)
    n.epoch(2, EPOCH_2)
    n.status()
    n.completed(SUMMARY)
    n.failed("RuntimeError: CUDA out of memory", step="train")
    assert n.close(timeout=30)
    msgs = smtp_server.wait_for(6)
    assert n.counts["sent"] == 6 and n.counts["failed"] == 0
    subjects = [subj(m) for m in msgs]
    assert subjects[0] == f"[Theta] started: {RUN} (gpt2-medium, 10 epochs)"
    assert subjects[1].startswith("[Theta] epoch 1/10: val loss 2.2500, perplexity 9.49")
    assert subjects[2].startswith("[Theta] epoch 2/10: val loss 2.6000") and "alerts]" in subjects[2]
    assert subjects[3].startswith("[Theta] status: epoch 2/10, GPU 84 C")
    assert subjects[4] == f"[Theta] completed: {RUN}, best val loss 2.2500 (epoch 1)"
    assert subjects[5] == f"[Theta] FAILED: {RUN} at train: RuntimeError: CUDA out of memory"
    for m in msgs:
        assert set(parts(m)) == {"text/plain", "text/html"} and PASSWORD not in all_text(m)
    start = parts(msgs[0])["text/plain"]
    assert "gpt2-medium" in start and "techniques on  ema" in start
    epoch1 = parts(msgs[1])
    for figure in ("2.5000", "2.2500", "9.49", "0.412", "3.00e-05", "epoch 1/10 (10%)", "ETA", "ema decay",
                   "0.9980", "train kl", "difficult ratio", "35% of 8 cores"):
        assert figure in epoch1["text/plain"], figure
    # Dataset text (here a domain name) is escaped in HTML and kept verbatim in plain text.
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; co" in epoch1["text/html"] and "<b>bold</b>" not in epoch1["text/html"]
    epoch2 = parts(msgs[2])["text/plain"]
    assert "learning rate collapsed" in epoch2 and "GPU 0 at 84 C" in epoch2 and "memory 96% full" in epoch2
    assert "R-Drop KL divergence" in epoch2
    done = parts(msgs[4])["text/plain"]
    assert "best val loss  2.2500" in done and "evaluation" not in done.lower()  # the chain adds the test set
    failed = parts(msgs[5])["text/plain"]
    assert "CUDA out of memory" in failed and "Traceback: boom" in failed and "line 99" in failed
    assert "line 10\n" not in failed  # only the last lines of the log


def test_the_completion_curve_is_the_reports_plot(tmp_path):
    """The email draws the loss curve with the report's own plot (no second plotting code): the PNG attached when
    the report has none is byte for byte the report's loss_curve.png of the same history."""
    run_dir = tmp_path / "models" / RUN
    run_dir.mkdir(parents=True)
    (run_dir / "loss_history.json").write_text(__import__("json").dumps([EPOCH_1, EPOCH_2]), encoding="utf-8")
    email = emails.completion_email(RUN, SUMMARY, [EPOCH_1, EPOCH_2],
                                 evaluation_file=tmp_path / "stats" / f"evaluation_{RUN}.json")
    (curve,) = email.attachments
    report_png = plot_loss_curve([EPOCH_1, EPOCH_2], tmp_path)
    assert curve.filename == "loss_curve.png" and curve.data == report_png.read_bytes()
    assert ("warning", f"no evaluation summary (evaluation_{RUN}.json not found)") in email.alerts


def test_the_email_modules_import_no_plotting_library():
    code = "import sys, src.training.run_emails, src.utils.email_notifier; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_periodic_status_from_the_background_thread(smtp_server, tls_cert):
    n = make_notifier(email_env(smtp_server.port, tls_cert[0], EMAIL_STATUS_INTERVAL_MIN="0.01"))
    n.start({"epochs": 3})  # start + one status every 0.6 s
    msgs = smtp_server.wait_for(3)
    n.completed({"status": "completed"})
    n.close(timeout=30)
    assert any(subj(m).startswith("[Theta] status: before the first epoch") for m in msgs)


def test_lifecycle_off_sends_epochs_only(smtp_server, tls_cert):
    n = make_notifier(email_env(smtp_server.port, tls_cert[0]), lifecycle_emails=False)
    n.start({"epochs": 2})
    n.epoch(1, EPOCH_1)
    n.failed("boom")
    n.completed({"status": "completed"})
    assert n.close(timeout=30)
    assert [subj(m).split(":")[0] for m in smtp_server.wait_for(1)] == ["[Theta] epoch 1/2"]


def test_a_hanging_server_never_blocks_the_trainers_calls(monkeypatch):
    n = make_notifier(email_env(free_port(), None))
    entered, release = threading.Event(), threading.Event()
    monkeypatch.setattr(n.sender, "_deliver", lambda msg: (entered.set(), release.wait(30)))
    n.start({"epochs": 2})
    assert entered.wait(10)
    caller = threading.Thread(target=lambda: (n.epoch(1, EPOCH_1), n.status(), n.failed("boom"),
                                             n.completed({"status": "completed"})))
    caller.start()
    caller.join(10)
    try:
        assert not caller.is_alive() and n.sender.pending() == 5 and n.counts["sent"] == 0
    finally:
        release.set()
    assert n.close(timeout=10) and n.counts["sent"] == 5


INTERFACE = ("start", "epoch", "status", "completed", "failed", "close")


def test_one_interface_and_a_misspelt_method_is_an_error():
    n = make_notifier(email_env(free_port(), None))
    null = en.NullNotifier()
    for name in INTERFACE:
        real, nothing = getattr(n, name), getattr(null, name)
        assert list(inspect.signature(real).parameters) == list(inspect.signature(nothing).parameters), name
    assert not hasattr(n, "update_metrics") and not hasattr(null, "update_metrics")  # nothing called it
    assert null.start({"epochs": 1}) is None and null.close() is True
    for obj in (n, null):
        with pytest.raises(AttributeError):
            obj.epoch_updat(1, EPOCH_1)  # a string-name dispatch would have sent nothing, silently
    n.close(timeout=0)


def test_a_failing_method_never_raises_and_hides_the_password(caplog):
    caplog.set_level(logging.WARNING)
    n = make_notifier(email_env(free_port(), None))

    class Broken:
        @property
        def __dict__(self):
            raise RuntimeError(f"cannot read settings (password={PASSWORD})")

    class NotAMapping:
        def keys(self):
            raise ValueError(f"bad entry {PASSWORD}")

    assert n.start(Broken()) is None
    assert n.epoch(1, NotAMapping()) is None
    assert n.counts["failed"] == 2 and "start failed" in caplog.text and "epoch failed" in caplog.text
    assert PASSWORD not in caplog.text and "********" in caplog.text
    n.close(timeout=0)


def test_create_notifier_rules(monkeypatch, tmp_path):
    for k in [k for k in os.environ if k.startswith("EMAIL_") or k in ("RANK", "THETA_NOTIFY_FROM_SCRIPT")]:
        monkeypatch.delenv(k)
    monkeypatch.setattr(en, "PROJECT_ROOT", tmp_path)  # no .env there
    assert isinstance(emails.create_notifier(tmp_path / "models" / "r1"), en.NullNotifier)
    for k, v in email_env(587, None).items():
        monkeypatch.setenv(k, v)
    n = emails.create_notifier(tmp_path / "models" / "r1", None)
    assert n.lifecycle_emails and n.run_name == "r1" and n.log_file == tmp_path / "models" / "r1" / "train.log"
    assert n.sender._worker is None  # no thread until something is sent
    monkeypatch.setenv("THETA_NOTIFY_FROM_SCRIPT", "1")
    assert not emails.create_notifier(tmp_path / "models" / "r1", None).lifecycle_emails
    monkeypatch.setenv("RANK", "1")
    assert isinstance(emails.create_notifier(tmp_path / "models" / "r1", None), en.NullNotifier)
