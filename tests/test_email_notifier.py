"""The email transport against a real SMTP server on localhost (aiosmtpd, STARTTLS with a self-signed
certificate, AUTH), plus servers that refuse, hang, reject the password or offer no TLS: sending never blocks,
logs what failed, and never shows the password, nor sends it over a connection without TLS unless allowed.
What the trainer's emails say: tests/test_run_emails.py.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_email_notifier.py -q
"""

from __future__ import annotations

import json
import logging
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
from src.utils.email_notifier import Email, EmailSender, Section, resolve_email_config

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
    """aiosmtpd on 127.0.0.1 with STARTTLS required and AUTH checked against one login; collects messages.
    ``tls=False``: a plain server (no STARTTLS) that offers AUTH; ``auth="required"`` refuses mail without a login,
    ``auth=None`` offers no AUTH at all (a local relay)."""

    def __init__(self, cert: Path | None = None, key: Path | None = None, password: str = PASSWORD, tls: bool = True,
                 auth: str | None = "offered"):
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
        if auth is not None:
            kwargs.update(authenticator=authenticator, auth_require_tls=tls, auth_required=auth == "required")
        self.port = free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port, **kwargs)
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


def make_sender(env: dict, **kwargs) -> EmailSender:
    config, level, message = resolve_email_config(env)
    assert config is not None, message
    kwargs.setdefault("retries", 2)
    kwargs.setdefault("backoff_s", 0.2)
    return EmailSender(config, **kwargs)


def note(n: int = 1) -> Email:
    return Email(f"[Theta] note {n}", f"Note {n}", sections=[Section("Run", rows=[("n", str(n))])])


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
    config, level, message = resolve_email_config({**full, "EMAIL_ALLOW_PLAIN_AUTH": "maybe"})
    assert config is None and "EMAIL_ALLOW_PLAIN_AUTH" in message
    assert PASSWORD not in message


def test_full_configuration_and_defaults():
    config, level, _ = resolve_email_config({"EMAIL_SENDER": SENDER, "EMAIL_RECIPIENT": RECIPIENTS,
                                             "EMAIL_PASSWORD": PASSWORD, "EMAIL_USE_SSL": "true"})
    assert level == "" and config.recipients == ["me@example.com", "team@example.org"]
    assert config.smtp_server == "smtp.gmail.com" and config.smtp_port == 465 and config.use_ssl and not config.use_tls
    assert config.status_interval_min == 10 and config.max_per_hour == 20 and not config.allow_plain_auth
    assert PASSWORD not in repr(config) and PASSWORD not in config.describe()


def test_plain_connections_say_what_happens_to_the_password():
    plain = resolve_email_config(email_env(25, None, EMAIL_USE_TLS="0", EMAIL_SMTP_SERVER="mail.example.org"))[0]
    assert not plain.encrypted and not plain.loopback and "no password sent" in plain.describe()
    assert "EMAIL_ALLOW_PLAIN_AUTH=1" in plain.plain_auth_note()
    allowed = resolve_email_config(email_env(25, None, EMAIL_USE_TLS="0", EMAIL_ALLOW_PLAIN_AUTH="1"))[0]
    assert "password sent unencrypted" in allowed.describe() and allowed.loopback  # 127.0.0.1
    assert resolve_email_config(email_env(587, None))[0].plain_auth_note() == ""


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
    assert en.classify_error(en.PlainAuthRefused("needs a login")) == "plain_auth"
    assert en.classify_error(smtplib.SMTPRecipientsRefused({})) == "rejected"


def test_numbers_are_in_fixed_notation():
    assert en.fmt_number(1.981e-07) == "0.0000" and en.fmt_number(-1e-9) == "0.0000"
    assert en.fmt_number(3349.7, 2) == "3349.70" and en.fmt_number(3e-05, 6) == "0.000030"
    assert en.fmt_number(float("nan")) == "NaN" and en.fmt_number(None) == "n/a"
    assert en.fmt_duration(3725) == "1h 02m" and en.fmt_duration(65) == "1m 05s"


# ---------------------------------------------------------------------------------------------------------------
# Sending through STARTTLS + AUTH: sections rendered twice, text escaped, attachments, the limit
# ---------------------------------------------------------------------------------------------------------------

def test_an_email_reaches_a_real_server_in_both_parts(smtp_server, tls_cert):
    sender = make_sender(email_env(smtp_server.port, tls_cert[0]), run_name="r1")
    email = Email("[Theta] x <b>", "Heading & more", [("critical", "a <i>b</i>")],
                  [Section("Rows", rows=[("<k>", "v & w")]), Section("Table", table=(["a"], [["<td>"]])),
                   Section("Pre", pre=f"line with {PASSWORD}")],
                  [en.Attachment("x.json", f'{{"pw": "{PASSWORD}"}}'.encode(), "application", "json", text=True)])
    sender.send("x", lambda: email)
    assert sender.close(timeout=30)
    (msg,) = smtp_server.wait_for(1)
    assert sender.counts["sent"] == 1 and smtp_server.auth_attempts >= 1
    assert msg["From"] == SENDER and msg["To"] == "me@example.com, team@example.org" and msg["X-Theta-Run"] == "r1"
    text = parts(msg)
    assert "[CRITICAL] a <i>b</i>" in text["text/plain"] and "<k>  v & w" in text["text/plain"]
    assert "a &lt;i&gt;b&lt;/i&gt;" in text["text/html"] and "&lt;td&gt;" in text["text/html"]
    (attachment,) = list(msg.iter_attachments())
    assert json.loads(attachment.get_content()) == {"pw": "********"}
    assert PASSWORD not in all_text(msg) and "********" in text["text/plain"]


def test_rate_limit_skips_progress_but_not_priority(smtp_server, tls_cert):
    sender = make_sender(email_env(smtp_server.port, tls_cert[0], EMAIL_MAX_PER_HOUR="2"))
    for n in range(1, 5):
        sender.send("epoch", lambda n=n: note(n))
    sender.send("completed", lambda: note(9), priority=True)
    assert sender.close(timeout=30)
    msgs = smtp_server.wait_for(3)
    assert sender.counts["sent"] == 3 and sender.counts["rate_limited"] == 2
    assert [subj(m) for m in msgs] == ["[Theta] note 1", "[Theta] note 2", "[Theta] note 9"]


# ---------------------------------------------------------------------------------------------------------------
# Plain connections: the password never goes out without TLS unless allowed
# ---------------------------------------------------------------------------------------------------------------

def plain_env(port: int, **more) -> dict:
    env = email_env(port, None, EMAIL_USE_TLS="0", **more)
    env.pop("EMAIL_CA_FILE", None)
    return env


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")  # aiosmtpd: that is the point here
def test_without_tls_the_password_is_not_sent_unless_allowed(caplog):
    caplog.set_level(logging.WARNING)
    server = SmtpServer(tls=False, auth="required")
    try:
        refused = make_sender(plain_env(server.port))
        refused.send("epoch", lambda: note(1))
        refused.close(timeout=20)
        assert server.auth_attempts == 0 and server.messages == []  # no AUTH exchange at all: no password sent
        assert refused.counts["plain_auth"] == 1 and refused.counts["sent"] == 0
        assert "(plain_auth)" in caplog.text and "EMAIL_ALLOW_PLAIN_AUTH=1" in caplog.text
        allowed = make_sender(plain_env(server.port, EMAIL_ALLOW_PLAIN_AUTH="1"))
        allowed.send("epoch", lambda: note(2))
        assert allowed.close(timeout=20) and allowed.counts["sent"] == 1
        assert server.auth_attempts >= 1 and [subj(m) for m in server.wait_for(1)] == ["[Theta] note 2"]
    finally:
        server.stop()


def test_a_local_relay_without_login_still_works_without_tls():
    relay = SmtpServer(tls=False, auth=None)
    try:
        sender = make_sender(plain_env(relay.port))
        sender.send("epoch", lambda: note(1))
        assert sender.close(timeout=20) and sender.counts["sent"] == 1
        assert [subj(m) for m in relay.wait_for(1)] == ["[Theta] note 1"]
    finally:
        relay.stop()


# ---------------------------------------------------------------------------------------------------------------
# Servers that refuse, hang or reject: calls return at once, failures are logged and counted
# ---------------------------------------------------------------------------------------------------------------

def three(sender: EmailSender) -> None:
    sender.send("start", lambda: note(1))
    sender.send("epoch", lambda: note(2))
    sender.send("completed", lambda: note(3), priority=True)


def test_refusing_server(caplog):
    caplog.set_level(logging.WARNING)
    sender = make_sender(email_env(free_port(), None))
    three(sender)
    sender.close(timeout=20)
    assert sender.counts["connection"] >= 3 and sender.counts["failed"] == 3 and sender.counts["sent"] == 0
    assert "(connection)" in caplog.text and "EMAIL_SMTP_PORT" in caplog.text and PASSWORD not in caplog.text


def test_hanging_server_never_blocks_a_call(monkeypatch):
    """Every call returns while the server is still hanging: the calls finish with the send provably stuck."""
    sender = make_sender(email_env(free_port(), None))
    entered, release = threading.Event(), threading.Event()

    def hang(msg):
        entered.set()
        release.wait(30)  # a server that never answers

    monkeypatch.setattr(sender, "_deliver", hang)
    sender.send("start", lambda: note(0))
    assert entered.wait(10)  # the sender thread is now inside the hanging server
    caller = threading.Thread(target=lambda: three(sender))
    caller.start()
    caller.join(10)
    try:
        assert not caller.is_alive() and not release.is_set() and sender.counts["sent"] == 0
        assert sender._queue.qsize() == 3  # all three queued behind the stuck one, none sent
    finally:
        release.set()
    assert sender.close(timeout=10) and sender.counts["sent"] == 4


def test_hanging_real_server_times_out_and_close_is_bounded(caplog):
    caplog.set_level(logging.WARNING)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # accepts connections (the kernel does) and never says a word
    try:
        sender = make_sender(email_env(listener.getsockname()[1], None, EMAIL_TIMEOUT_S="1"), retries=2)
        three(sender)
        assert sender.close(timeout=2) is False  # gave up on the queue instead of waiting for every retry
        assert sender.counts["timeout"] >= 1 and sender.counts["dropped"] >= 1 and "(timeout)" in caplog.text
    finally:
        listener.close()


def test_a_failing_build_never_raises_and_hides_the_password(caplog):
    caplog.set_level(logging.WARNING)
    sender = make_sender(email_env(free_port(), None))

    def broken() -> Email:
        raise RuntimeError(f"cannot read settings (password={PASSWORD})")

    sender.send("epoch", broken)
    sender.close(timeout=10)
    assert sender.counts["build_error"] == 1 and "could not build the epoch email" in caplog.text
    assert PASSWORD not in caplog.text and "********" in caplog.text


def test_wrong_password_is_tried_once_and_never_logged(smtp_server, tls_cert, caplog):
    caplog.set_level(logging.INFO)
    sender = make_sender(email_env(smtp_server.port, tls_cert[0], EMAIL_PASSWORD="wrong-" + PASSWORD))
    three(sender)
    sender.close(timeout=20)
    # One login call (smtplib tries each mechanism the server offers), then nothing more.
    assert sender.counts["auth"] == 1 and smtp_server.auth_attempts <= 2 and sender.counts["dropped"] == 2
    assert smtp_server.messages == [] and "(auth)" in caplog.text and "app password" in caplog.text
    assert PASSWORD not in caplog.text


def test_untrusted_certificate_is_a_tls_failure(smtp_server, caplog):
    caplog.set_level(logging.WARNING)
    sender = make_sender(email_env(smtp_server.port, None))  # no EMAIL_CA_FILE: the self-signed cert is refused
    sender.send("epoch", lambda: note(1))
    sender.close(timeout=20)
    assert sender.counts["tls"] == 1 and "(tls)" in caplog.text and smtp_server.messages == []


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
