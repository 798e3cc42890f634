"""Email notifications against a real SMTP server on localhost (aiosmtpd, STARTTLS with a self-signed certificate,
AUTH), plus servers that refuse, hang or reject the password: the notifier never blocks and logs what failed.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_email_notifier.py -q
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import socket
import ssl
import subprocess
import sys
import threading
import time
from email import message_from_bytes, policy
from pathlib import Path

import pytest

from helpers import free_port
from src.utils import email_notifier as en
from src.utils.email_notifier import TrainingEmailNotifier, resolve_email_config

PASSWORD = "s3cret-Pa55word-xyz"
SENDER = "theta@example.com"
RECIPIENTS = "me@example.com, team@example.org"


# ---------------------------------------------------------------------------------------------------------------
# A real SMTP server
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1, made by the openssl command."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


class SmtpServer:
    """aiosmtpd on 127.0.0.1 with STARTTLS required and AUTH checked against one login; collects messages."""

    def __init__(self, cert: Path, key: Path, password: str = PASSWORD, tls: bool = True):
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import AuthResult

        self.messages: list = []
        self.auth_attempts = 0
        self.received = threading.Event()
        outer = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):
                outer.messages.append(message_from_bytes(envelope.content, policy=policy.default))
                outer.received.set()
                return "250 OK"

        def authenticator(server, session, envelope, mechanism, auth_data):
            outer.auth_attempts += 1
            ok = auth_data.login.decode() == SENDER and auth_data.password.decode() == password
            # handled=False: aiosmtpd answers 535 itself; with the default True a failed login gets no reply.
            return AuthResult(success=ok, handled=False)

        kwargs = {}
        if tls:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(cert), str(key))
            kwargs = dict(tls_context=context, require_starttls=True)
        self.port = free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port, authenticator=authenticator,
                                     auth_require_tls=tls, **kwargs)
        self.controller.start()

    def wait_for(self, n: int, timeout: float = 20) -> list:
        deadline = time.time() + timeout
        while len(self.messages) < n and time.time() < deadline:
            time.sleep(0.05)
        return self.messages

    def stop(self) -> None:
        self.controller.stop()


@pytest.fixture
def smtp_server(tls_cert):
    server = SmtpServer(*tls_cert)
    yield server
    server.stop()


def email_env(port: int, cert: Path | None, **more) -> dict[str, str]:
    env = {"EMAIL_SENDER": SENDER, "EMAIL_RECIPIENT": RECIPIENTS, "EMAIL_PASSWORD": PASSWORD,
           "EMAIL_SMTP_SERVER": "127.0.0.1", "EMAIL_SMTP_PORT": str(port), "EMAIL_USE_TLS": "1",
           "EMAIL_STATUS_INTERVAL_MIN": "0", "EMAIL_TIMEOUT_S": "3"}
    if cert is not None:
        env["EMAIL_CA_FILE"] = str(cert)
    env.update(more)
    return env


def make_notifier(env: dict, **kwargs) -> TrainingEmailNotifier:
    config, level, message = resolve_email_config(env)
    assert config is not None, message
    kwargs.setdefault("retries", 2)
    kwargs.setdefault("backoff_s", 0.2)
    kwargs.setdefault("gpu_probe", lambda: GPU_INFO)
    return TrainingEmailNotifier(config, **kwargs)


GPU_INFO = {"source": "nvidia-smi", "gpus": [
    {"index": 0, "name": "NVIDIA GeForce RTX 3060", "temperature_c": 84, "memory_used_mb": 11800,
     "memory_total_mb": 12288, "memory_free_mb": 488, "utilization_pct": 98, "power_w": 165.2, "power_limit_w": 170}],
    "system": {"cpu_count": 8, "cpu_percent": 35.0, "ram_used_mb": 9000, "ram_total_mb": 32000, "ram_percent": 28.1}}

EPOCH_1 = {"epoch": 1, "step": 40, "train_loss": 2.5, "val_loss": 2.25, "val_perplexity": 9.4877,
           "val_token_accuracy": 0.412, "learning_rate": 3e-5, "seconds": 600.0,
           "domains": {"networking": {"loss": 2.0, "perplexity": 7.39, "token_accuracy": 0.45},
                       "<b>bold</b> & co": {"loss": 3.4, "perplexity": 29.96, "token_accuracy": 0.2}}}
EPOCH_2 = {**EPOCH_1, "epoch": 2, "step": 80, "train_loss": 2.0, "val_loss": 2.6, "val_perplexity": 13.46,
           "learning_rate": 1e-8}


def parts(msg) -> dict[str, str]:
    """content type -> text, for the text parts of a message."""
    return {p.get_content_type(): p.get_content() for p in msg.walk() if p.get_content_maintype() == "text"}


def subj(msg) -> str:
    """The subject, unfolded (a long one is folded onto the next line by the generator)."""
    return " ".join(str(msg["Subject"]).split())


def all_text(msg) -> str:
    return msg.as_string()


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------

def test_nothing_configured_is_off_with_one_info_line():
    config, level, message = resolve_email_config({})
    assert config is None and level == "info" and "nothing configured" in message


def test_half_configured_warns_naming_the_missing_variables():
    config, level, message = resolve_email_config({"EMAIL_SENDER": SENDER, "EMAIL_SMTP_SERVER": "smtp.x.org"})
    assert config is None and level == "warning"
    assert "EMAIL_RECIPIENT" in message and "EMAIL_PASSWORD" in message and "EMAIL_SENDER" not in message


def test_disabled_and_invalid_values():
    full = email_env(587, None)
    assert resolve_email_config({**full, "EMAIL_ENABLED": "0"})[1] == "info"
    config, level, message = resolve_email_config({**full, "EMAIL_SMTP_PORT": "abc"})
    assert config is None and level == "warning" and "EMAIL_SMTP_PORT" in message
    assert PASSWORD not in message


def test_full_configuration_and_defaults():
    config, level, _ = resolve_email_config({"EMAIL_SENDER": SENDER, "EMAIL_RECIPIENT": RECIPIENTS,
                                             "EMAIL_PASSWORD": PASSWORD, "EMAIL_USE_SSL": "true"})
    assert level == "" and config.recipients == ["me@example.com", "team@example.org"]
    assert config.smtp_server == "smtp.gmail.com" and config.smtp_port == 465 and config.use_ssl and not config.use_tls
    assert config.status_interval_min == 10 and config.max_per_hour == 20
    assert PASSWORD not in repr(config) and PASSWORD not in config.describe()


def test_dotenv_file_is_read_and_environment_wins(tmp_path, monkeypatch):
    env_file = tmp_path / ".env"
    env_file.write_text(f"EMAIL_SENDER={SENDER}\nEMAIL_RECIPIENT=a@b.c\nEMAIL_PASSWORD={PASSWORD}\n"
                        "EMAIL_SMTP_PORT=2525\n", encoding="utf-8")
    for k in [k for k in list(__import__("os").environ) if k.startswith("EMAIL_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("EMAIL_SMTP_PORT", "2626")
    config, _, _ = resolve_email_config(dotenv_path=env_file)
    assert config.recipients == ["a@b.c"] and config.smtp_port == 2626


def test_classify_error_kinds():
    import smtplib

    assert en.classify_error(socket.gaierror(-2, "Name or service not known")) == "dns"
    assert en.classify_error(ConnectionRefusedError(111, "refused")) == "connection"
    assert en.classify_error(socket.timeout("timed out")) == "timeout"
    assert en.classify_error(ssl.SSLCertVerificationError("bad cert")) == "tls"
    assert en.classify_error(smtplib.SMTPNotSupportedError("STARTTLS extension not supported by server.")) == "tls"
    assert en.classify_error(smtplib.SMTPAuthenticationError(535, b"bad")) == "auth"
    assert en.classify_error(smtplib.SMTPRecipientsRefused({})) == "rejected"


def test_numbers_are_in_fixed_notation():
    assert en._f(1.981e-07) == "0.0000" and en._f(-1e-9) == "0.0000" and en._f(3349.7, 2) == "3349.70"
    assert en._f(3e-05, 6) == "0.000030" and en._f(float("nan")) == "NaN" and en._f(None) == "n/a"


def test_alert_thresholds():
    alerts = en.metric_alerts(EPOCH_2, [EPOCH_1], total_epochs=10, initial_lr=3e-5, extra={"kl": 0.7,
                                                                                         "difficult_ratio": 0.8})
    text = " ".join(t for _, t in alerts)
    assert "learning rate collapsed" in text and "overfitting" in text
    assert "KL divergence" in text and "difficult-example ratio" in text
    assert "domain <b>bold</b> & co: token accuracy" in text
    assert en.metric_alerts({"val_loss": math.nan}, [], None, None, {})[0][0] == "critical"
    assert en.metric_alerts({"val_perplexity": 3.0, "val_token_accuracy": 0.8, "val_loss": 1.1}, [], 5, None, {}) == []


# ---------------------------------------------------------------------------------------------------------------
# Every email, through STARTTLS + AUTH
# ---------------------------------------------------------------------------------------------------------------

def test_all_emails_reach_a_real_server(smtp_server, tls_cert, tmp_path):
    run = "theta_enhanced_20260101_230000"
    run_dir = tmp_path / "models" / run
    run_dir.mkdir(parents=True)
    stats = tmp_path / "stats"
    (stats / run).mkdir(parents=True)
    png = b"\x89PNG\r\n\x1a\n" + b"0" * 64
    (stats / run / "loss_curve.png").write_bytes(png)
    (stats / f"evaluation_{run}.json").write_text(json.dumps({
        "test_records": 72, "perplexity": 12.3456, "token_accuracy": 0.4321, "loss": 2.51,
        "per_domain": {"networking": {"perplexity": 10.5, "token_accuracy": 0.5}},
        "samples": [{"question": "What does <script>alert(1)</script> do?", "prediction": "x & y",
                     "reference": "a <tag>"}]}), encoding="utf-8")
    log = tmp_path / "overnight.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)) + "Traceback: boom\n", encoding="utf-8")
    n = make_notifier(email_env(smtp_server.port, tls_cert[0]), run_name=run, run_dir=run_dir, log_file=log)

    n.start(argparse.Namespace(model_name="gpt2-medium", epochs=10, batch_size=3,
                                                     learning_rate=3e-5, use_ema=True, email_password=PASSWORD))
    n.update_metrics({"ema_decay": 0.998, "curriculum_competence": 0.75})
    n.epoch(1, EPOCH_1)
    n.epoch(2, EPOCH_2)
    n.status()
    n.completed({"run": run, "status": "completed", "global_step": 80, "epochs_run": 2, "best_epoch": 1,
                          "best_val_loss": 2.25, "seconds": 1234.5, "final_model": str(run_dir / "theta_final")})
    n.failed("RuntimeError: CUDA out of memory", step="train")
    assert n.close(timeout=30)
    msgs = smtp_server.wait_for(6)
    assert n.counts["sent"] == 6 and n.counts["failed"] == 0 and smtp_server.auth_attempts >= 1
    by_subject = {subj(m): m for m in msgs}
    subjects = list(by_subject)
    assert subjects[0] == f"[Theta] started: {run} (gpt2-medium, 10 epochs)"
    assert subjects[1].startswith("[Theta] epoch 1/10: val loss 2.2500, perplexity 9.49")
    assert subjects[2].startswith("[Theta] epoch 2/10: val loss 2.6000") and "alerts]" in subjects[2]
    assert subjects[3].startswith("[Theta] status: epoch 2/10, GPU 84 C")
    assert subjects[4] == f"[Theta] completed: {run}, best val loss 2.2500 (epoch 1), test perplexity 12.35"
    assert subjects[5] == f"[Theta] FAILED: {run} at train: RuntimeError: CUDA out of memory"
    for m in msgs:
        assert m["From"] == SENDER and m["To"] == "me@example.com, team@example.org"
        text = parts(m)
        assert set(text) == {"text/plain", "text/html"}, subj(m)
        assert PASSWORD not in all_text(m)
    start = parts(msgs[0])
    assert "gpt2-medium" in start["text/plain"] and "ema" in start["text/plain"]
    assert "NVIDIA GeForce RTX 3060" in start["text/html"]
    epoch1 = parts(msgs[1])
    for figure in ("2.5000", "2.2500", "9.49", "0.412", "3.00e-05", "epoch 1/10 (10%)", "ETA", "ema decay",
                   "curriculum competence", "35% of 8 cores"):
        assert figure in epoch1["text/plain"], figure
    # Dataset text (here a domain name) is escaped in HTML and kept verbatim in plain text.
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; co" in epoch1["text/html"] and "<b>bold</b>" not in epoch1["text/html"]
    assert "<b>bold</b> & co" in epoch1["text/plain"]
    epoch2 = parts(msgs[2])["text/plain"]
    assert "learning rate collapsed" in epoch2 and "GPU 0 at 84 C" in epoch2 and "memory 96% full" in epoch2
    done = msgs[4]
    attachments = {p.get_filename(): p for p in done.iter_attachments()}
    assert set(attachments) == {"loss_curve.png", f"evaluation_{run}.json"}
    assert attachments["loss_curve.png"].get_content_type() == "image/png"
    assert attachments["loss_curve.png"].get_content() == png
    assert json.loads(attachments[f"evaluation_{run}.json"].get_content())["test_records"] == 72
    done_text = parts(done)
    assert "12.35" in done_text["text/plain"] and "0.432" in done_text["text/plain"]
    assert "&lt;script&gt;" in done_text["text/html"] and "<script>" not in done_text["text/html"]
    failed = parts(msgs[5])["text/plain"]
    assert "CUDA out of memory" in failed and "Traceback: boom" in failed and "line 99" in failed
    assert "line 10\n" not in failed  # only the last lines of the log


def test_completion_without_report_draws_the_curve(smtp_server, tls_cert, tmp_path):
    run_dir = tmp_path / "models" / "theta_enhanced_20260101_000000"
    run_dir.mkdir(parents=True)
    (run_dir / "loss_history.json").write_text(json.dumps([EPOCH_1, EPOCH_2]), encoding="utf-8")
    n = make_notifier(email_env(smtp_server.port, tls_cert[0]), run_name=run_dir.name, run_dir=run_dir)
    n.completed({"status": "completed", "best_val_loss": 2.25, "best_epoch": 1})
    assert n.close(timeout=30)
    (msg,) = smtp_server.wait_for(1)
    (png,) = list(msg.iter_attachments())
    assert png.get_filename() == "loss_curve.png" and png.get_content()[:4] == b"\x89PNG"
    assert "no evaluation summary" in parts(msg)["text/plain"]


def test_periodic_status_from_the_background_thread(smtp_server, tls_cert):
    n = make_notifier(email_env(smtp_server.port, tls_cert[0], EMAIL_STATUS_INTERVAL_MIN="0.01"))
    n.start({"epochs": 3}) # start + one status every 0.6 s
    msgs = smtp_server.wait_for(3)
    n.completed({"status": "completed"})
    n.close(timeout=30)
    assert any(subj(m).startswith("[Theta] status: before the first epoch") for m in msgs)


def test_rate_limit_skips_progress_but_not_completion(smtp_server, tls_cert):
    n = make_notifier(email_env(smtp_server.port, tls_cert[0], EMAIL_MAX_PER_HOUR="2"), lifecycle_emails=True)
    for epoch in range(1, 5):
        n.epoch(epoch, {**EPOCH_1, "epoch": epoch})
    n.completed({"status": "completed"})
    assert n.close(timeout=30)
    msgs = smtp_server.wait_for(3)
    assert n.counts["sent"] == 3 and n.counts["rate_limited"] == 2
    assert subj(msgs[-1]).startswith("[Theta] completed")


def test_lifecycle_off_sends_epochs_only(smtp_server, tls_cert):
    n = make_notifier(email_env(smtp_server.port, tls_cert[0]), lifecycle_emails=False)
    n.start({"epochs": 2})
    n.epoch(1, EPOCH_1)
    n.failed("boom")
    n.completed({"status": "completed"})
    assert n.close(timeout=30)
    assert [subj(m).split(":")[0] for m in smtp_server.wait_for(1)] == ["[Theta] epoch 1/2"]


# ---------------------------------------------------------------------------------------------------------------
# Servers that refuse, hang or reject: calls return at once, failures are logged and counted
# ---------------------------------------------------------------------------------------------------------------

def calls(n) -> None:
    n.start({"epochs": 2})
    n.epoch(1, EPOCH_1)
    n.completed({"status": "completed"})


def test_refusing_server(caplog):
    caplog.set_level(logging.WARNING)
    n = make_notifier(email_env(free_port(), None))
    calls(n)
    n.close(timeout=20)
    assert n.counts["connection"] >= 3 and n.counts["failed"] == 3 and n.counts["sent"] == 0
    assert "(connection)" in caplog.text and "EMAIL_SMTP_PORT" in caplog.text and PASSWORD not in caplog.text


def test_hanging_server_never_blocks_a_call(monkeypatch):
    """Every call returns while the server is still hanging: the calls finish with the send provably stuck."""
    n = make_notifier(email_env(free_port(), None))
    entered, release = threading.Event(), threading.Event()

    def hang(msg):
        entered.set()
        release.wait(30)  # a server that never answers

    monkeypatch.setattr(n, "_deliver", hang)
    n.start({"epochs": 2})
    assert entered.wait(10)  # the sender thread is now inside the hanging server
    caller = threading.Thread(target=lambda: (n.epoch(1, EPOCH_1), n.status(), n.failed("boom"),
                                             n.completed({"status": "completed"})))
    caller.start()
    caller.join(10)
    try:
        assert not caller.is_alive() and not release.is_set() and n.counts["sent"] == 0
        assert n._queue.qsize() == 4  # all four queued behind the stuck one, none sent
    finally:
        release.set()
    assert n.close(timeout=10) and n.counts["sent"] == 5


def test_hanging_real_server_times_out_and_close_is_bounded(caplog):
    caplog.set_level(logging.WARNING)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # accepts connections (the kernel does) and never says a word
    try:
        n = make_notifier(email_env(listener.getsockname()[1], None, EMAIL_TIMEOUT_S="1"), retries=2)
        calls(n)
        assert n.close(timeout=2) is False  # gave up on the queue instead of waiting for every retry
        assert n.counts["timeout"] >= 1 and n.counts["dropped"] >= 1 and "(timeout)" in caplog.text
    finally:
        listener.close()


INTERFACE = ("start", "epoch", "status", "completed", "failed", "close")


def test_one_interface_and_a_misspelt_method_is_an_error():
    import inspect

    n = make_notifier(email_env(free_port(), None))
    null = en.NullNotifier()
    for name in INTERFACE + ("update_metrics",):
        real, nothing = getattr(n, name), getattr(null, name)
        assert list(inspect.signature(real).parameters) == list(inspect.signature(nothing).parameters), name
    assert null.start({"epochs": 1}) is None and null.close() is True
    for obj in (n, null):
        with pytest.raises(AttributeError):
            obj.epoch_updat(1, EPOCH_1)  # the old string-name dispatch would have sent nothing, silently
        with pytest.raises(AttributeError):
            obj.epoch_update(1, EPOCH_1)  # the names before the one interface are gone
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
    assert n.update_metrics(None) is None
    assert n.counts["failed"] == 3 and "start failed" in caplog.text and "epoch failed" in caplog.text
    assert PASSWORD not in caplog.text and "********" in caplog.text
    n.close(timeout=0)


def test_the_password_never_reaches_an_email(smtp_server, tls_cert):
    n = make_notifier(email_env(smtp_server.port, tls_cert[0]))
    n.failed(f"login with {PASSWORD} refused", step="train")
    assert n.close(timeout=30)
    (msg,) = smtp_server.wait_for(1)
    assert PASSWORD not in msg.as_string() and "********" in parts(msg)["text/plain"]


def test_wrong_password_is_tried_once_and_never_logged(smtp_server, tls_cert, caplog):
    caplog.set_level(logging.INFO)
    n = make_notifier(email_env(smtp_server.port, tls_cert[0], EMAIL_PASSWORD="wrong-" + PASSWORD))
    calls(n)
    n.close(timeout=20)
    # One login call (smtplib tries each mechanism the server offers), then nothing more.
    assert n.counts["auth"] == 1 and smtp_server.auth_attempts <= 2 and n.counts["dropped"] == 2
    assert smtp_server.messages == [] and "(auth)" in caplog.text and "app password" in caplog.text
    assert PASSWORD not in caplog.text


def test_untrusted_certificate_is_a_tls_failure(smtp_server, caplog):
    caplog.set_level(logging.WARNING)
    n = make_notifier(email_env(smtp_server.port, None))  # no EMAIL_CA_FILE: the self-signed cert is refused
    n.epoch(1, EPOCH_1)
    n.close(timeout=20)
    assert n.counts["tls"] == 1 and "(tls)" in caplog.text and smtp_server.messages == []


# ---------------------------------------------------------------------------------------------------------------
# python -m src.utils.email_notifier --test
# ---------------------------------------------------------------------------------------------------------------

def cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    import os

    base = {k: v for k, v in os.environ.items() if not k.startswith("EMAIL_")}
    return subprocess.run([sys.executable, "-m", "src.utils.email_notifier", *args],
                          cwd=Path(__file__).resolve().parents[1], env={**base, **env}, capture_output=True,
                          text=True, timeout=60)


def test_cli_test_email(smtp_server, tls_cert, tmp_path):
    empty = tmp_path / "empty.env"
    empty.write_text("")
    ok = cli(email_env(smtp_server.port, tls_cert[0]), "--test", "--env-file", str(empty))
    assert ok.returncode == 0, ok.stderr
    assert "test email sent to me@example.com, team@example.org" in ok.stdout
    assert subj(smtp_server.wait_for(1)[0]).startswith("[Theta] test email")
    bad = cli(email_env(smtp_server.port, tls_cert[0], EMAIL_PASSWORD="nope"), "--test", "--env-file", str(empty))
    assert bad.returncode == 1 and "FAILED (auth:" in bad.stderr and "app password" in bad.stderr
    off = cli({}, "--test", "--env-file", str(empty))
    assert off.returncode == 2 and "nothing configured" in off.stdout


# ---------------------------------------------------------------------------------------------------------------
# create_notifier: what the trainer calls
# ---------------------------------------------------------------------------------------------------------------

def test_create_notifier_rules(monkeypatch, tmp_path):
    import os

    from src.training import email_integration as ei

    for k in [k for k in os.environ if k.startswith("EMAIL_") or k in ("RANK", "THETA_NOTIFY_FROM_SCRIPT")]:
        monkeypatch.delenv(k)
    monkeypatch.setattr(en, "PROJECT_ROOT", tmp_path)  # no .env there
    off = ei.create_notifier(tmp_path / "models" / "r1", None)
    assert off is None or isinstance(off, en.NullNotifier)
    for k, v in email_env(587, None).items():
        monkeypatch.setenv(k, v)
    n = ei.create_notifier(tmp_path / "models" / "r1", None)
    assert n.lifecycle_emails and n.run_name == "r1" and n.log_file == tmp_path / "models" / "r1" / "train.log"
    assert n._worker is None  # no thread until something is sent
    monkeypatch.setenv("THETA_NOTIFY_FROM_SCRIPT", "1")
    assert not ei.create_notifier(tmp_path / "models" / "r1", None).lifecycle_emails
    monkeypatch.setenv("RANK", "1")
    other_rank = ei.create_notifier(tmp_path / "models" / "r1", None)
    assert other_rank is None or isinstance(other_rank, en.NullNotifier)
