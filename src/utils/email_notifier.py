"""Email transport for Theta: the settings (``.env``), one queue thread that sends with smtplib (timeouts, retries
with back-off, an hourly limit), the rendering of the sections a message is made of, and ``NullNotifier``.

A small sink that never gets in the way of training. ``send`` snapshots nothing itself: it takes a function that
builds an :class:`Email`, puts it on a queue and returns at once; one background thread builds the message
(plain text and HTML of the same sections) and sends it. A dead, slow or refusing server costs the caller
nothing; failures are logged with their kind (dns, connection, timeout, tls, plain_auth, auth, rejected) and
counted, never with the password.

What an email *says* lives with the code that owns its data: the trainer's start, epoch, status, completion and
failure emails in ``src/training/run_emails.py``, the overnight chain's start, failure and completion emails in
``src/utils/overnight.py``. Both hand this module an ``Email``.

    python -m src.utils.email_notifier --test          # send a test email; says exactly what failed
    python -m src.utils.email_notifier --show-config   # the configuration in effect (password masked)

    from src.utils.email_notifier import Email, EmailSender, Section, load_email_config
    config = load_email_config()            # None when email is off (one log line says why)
    sender = EmailSender(config, run_name="theta_enhanced_20260101_230000")
    sender.send("note", lambda: Email("[Theta] note", "A note", sections=[Section("Run", rows=[("epochs", "3")])]))
    sender.close()                          # waits at most shutdown_wait_s for what is queued

Configuration (environment, else ``.env`` in the project root; see ``.env.example`` and
documentation/EMAIL_NOTIFICATIONS.md): EMAIL_ENABLED, EMAIL_SENDER, EMAIL_RECIPIENT (comma-separated),
EMAIL_PASSWORD, EMAIL_SMTP_SERVER, EMAIL_SMTP_PORT, EMAIL_USE_TLS (STARTTLS), EMAIL_USE_SSL (implicit TLS),
EMAIL_ALLOW_PLAIN_AUTH, EMAIL_STATUS_INTERVAL_MIN, EMAIL_MAX_PER_HOUR, and the optional EMAIL_TIMEOUT_S and
EMAIL_CA_FILE.

Sharp edges: the password is never sent over a connection without TLS unless ``EMAIL_ALLOW_PLAIN_AUTH=1`` (a
server that then insists on a login refuses the email with a ``plain_auth`` failure; a local relay that asks for
no login still works); priority emails (completion, failure, test) bypass the hourly limit; after an
authentication failure nothing more is sent by this sender (retrying a wrong password can lock the account); at
exit, queued emails get ``shutdown_wait_s`` seconds (default 15), then the process leaves without them.
"""

from __future__ import annotations

import atexit
import collections
import functools
import html
import ipaddress
import logging
import math
import os
import queue
import smtplib
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any, Callable, Mapping

if __package__ in (None, ""):  # run as a file: make `src` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from src.utils.common import FlagParser, PROJECT_ROOT

logger = logging.getLogger(__name__)

SUBJECT_PREFIX = "[Theta]"
LEVEL_COLOURS = {"critical": ("#b71c1c", "#ffebee"), "warning": ("#8d6e00", "#fff8e1"), "ok": ("#1b5e20", "#e8f5e9")}

_TRUE = {"1", "true", "yes", "on", "y"}
_FALSE = {"0", "false", "no", "off", "n", ""}
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class EmailConfig:
    """Resolved email settings. ``repr`` never shows the password."""
    sender: str
    recipients: list[str]
    password: str = field(repr=False)
    smtp_server: str = "smtp.gmail.com"
    smtp_port: int = 587
    use_tls: bool = True
    use_ssl: bool = False
    allow_plain_auth: bool = False
    status_interval_min: float = 10.0
    max_per_hour: int = 20
    timeout_s: float = 10.0
    ca_file: str | None = None

    @property
    def encrypted(self) -> bool:
        return self.use_ssl or self.use_tls

    @property
    def loopback(self) -> bool:
        """The server runs on this machine (nothing it is sent crosses a network)."""
        host = self.smtp_server.strip("[]").lower()
        if host in _LOOPBACK_NAMES:
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def plain_auth_note(self) -> str:
        """What happens to the password on a connection without TLS; "" when the connection is encrypted."""
        if self.encrypted:
            return ""
        if self.allow_plain_auth:
            return "the password is sent unencrypted when the server asks for a login (EMAIL_ALLOW_PLAIN_AUTH=1)"
        return ("no password is sent without TLS, so a server that asks for a login refuses the emails; set "
                "EMAIL_USE_TLS=1 (port 587) or EMAIL_USE_SSL=1 (port 465), or EMAIL_ALLOW_PLAIN_AUTH=1 to send the "
                "password unencrypted")

    def describe(self) -> str:
        if self.use_ssl:
            mode = "SSL"
        elif self.use_tls:
            mode = "STARTTLS"
        else:
            mode = ("plain (no TLS), password sent unencrypted" if self.allow_plain_auth
                    else "plain (no TLS), no password sent")
        # No | < > & here: the Windows script echoes this line.
        return (f"from {self.sender} to {', '.join(self.recipients)} via {self.smtp_server}:{self.smtp_port} {mode}, "
                f"status every {self.status_interval_min:g} min, at most {self.max_per_hour}/hour")


def _read_settings(env: Mapping[str, str] | None, dotenv_path: Path | None) -> dict[str, str]:
    """EMAIL_* settings: ``.env`` values, overridden by the environment (or by ``env`` when given)."""
    values: dict[str, str] = {}
    path = dotenv_path if dotenv_path is not None else PROJECT_ROOT / ".env"
    if env is None and path.is_file():
        try:
            from dotenv import dotenv_values

            values.update({k: v for k, v in dotenv_values(path).items() if v is not None})
        except Exception as err:  # a broken .env must not stop training
            logger.warning("could not read %s: %s", path, err)
    source = os.environ if env is None else env
    values.update({k: v for k, v in source.items() if k.startswith("EMAIL_")})
    return {k: v.strip() for k, v in values.items() if k.startswith("EMAIL_")}


def resolve_email_config(env: Mapping[str, str] | None = None,
                         dotenv_path: Path | None = None) -> tuple[EmailConfig | None, str, str]:
    """``(config or None, level, message)``: level is "" when configured, "info" when off on purpose or by
    default, "warning" when half configured or invalid (the message names the variables)."""
    s = _read_settings(env, dotenv_path)
    enabled_raw = s.get("EMAIL_ENABLED", "").lower()
    if enabled_raw and enabled_raw not in _TRUE | _FALSE:
        return None, "warning", f"email notifications off: EMAIL_ENABLED={s['EMAIL_ENABLED']!r} is not 1/0/true/false"
    if enabled_raw in _FALSE - {""}:
        return None, "info", "email notifications off (EMAIL_ENABLED=0)"
    required = ["EMAIL_SENDER", "EMAIL_RECIPIENT", "EMAIL_PASSWORD"]
    present = [k for k in required + ["EMAIL_SMTP_SERVER"] if s.get(k)]
    if not present and enabled_raw not in _TRUE:
        return None, "info", "email notifications off: nothing configured (copy .env.example to .env to turn them on)"
    missing = [k for k in required if not s.get(k)]
    if missing:
        return None, "warning", (f"email notifications OFF: {', '.join(missing)} not set (the other EMAIL_ settings "
                                 "are; see .env.example)")
    problems = []

    def flag(name: str, default: bool) -> bool:
        raw = s.get(name, "").lower()
        if raw and raw not in _TRUE | _FALSE:
            problems.append(f"{name}={s[name]!r} is not 1/0/true/false")
        return default if not raw else raw in _TRUE

    def number(name: str, default: float, cast: Callable, minimum: float) -> Any:
        raw = s.get(name, "")
        if not raw:
            return default
        try:
            value = cast(raw)
        except ValueError:
            problems.append(f"{name}={raw!r} is not a number")
            return default
        if value < minimum:
            problems.append(f"{name}={raw!r} must be at least {minimum:g}")
        return value

    use_ssl = flag("EMAIL_USE_SSL", False)
    use_tls = flag("EMAIL_USE_TLS", not use_ssl) and not use_ssl
    recipients = [r.strip() for r in s["EMAIL_RECIPIENT"].split(",") if r.strip()]
    bad = [r for r in recipients + [s["EMAIL_SENDER"]] if "@" not in r]
    if bad:
        problems.append(f"not an email address: {', '.join(bad)} (EMAIL_SENDER / EMAIL_RECIPIENT)")
    ca_file = s.get("EMAIL_CA_FILE") or None
    if ca_file and not Path(ca_file).is_file():
        problems.append(f"EMAIL_CA_FILE={ca_file} does not exist")
    config = EmailConfig(
        sender=s["EMAIL_SENDER"], recipients=recipients, password=s["EMAIL_PASSWORD"],
        smtp_server=s.get("EMAIL_SMTP_SERVER") or "smtp.gmail.com",
        smtp_port=number("EMAIL_SMTP_PORT", 465 if use_ssl else 587, int, 1),
        use_tls=use_tls, use_ssl=use_ssl, allow_plain_auth=flag("EMAIL_ALLOW_PLAIN_AUTH", False),
        status_interval_min=number("EMAIL_STATUS_INTERVAL_MIN", 10.0, float, 0),
        max_per_hour=number("EMAIL_MAX_PER_HOUR", 20, int, 1),
        timeout_s=number("EMAIL_TIMEOUT_S", 10.0, float, 0.1), ca_file=ca_file)
    if problems:
        return None, "warning", "email notifications OFF: " + "; ".join(problems)
    return config, "", ""


_reported: set[str] = set()


def load_email_config(env: Mapping[str, str] | None = None, dotenv_path: Path | None = None) -> EmailConfig | None:
    """The configuration, or None; logs why it is off once per process (info, or a warning when half set)."""
    config, level, message = resolve_email_config(env, dotenv_path)
    if message and message not in _reported:
        _reported.add(message)
        (logger.warning if level == "warning" else logger.info)("%s", message)
    return config


# ---------------------------------------------------------------------------------------------------------------
# Failure kinds
# ---------------------------------------------------------------------------------------------------------------

class PlainAuthRefused(smtplib.SMTPException):
    """The server wants a login, and the connection has no TLS: the password was not sent."""


FAILURE_HINTS = {
    "dns": "the server name does not resolve: check EMAIL_SMTP_SERVER and the network",
    "connection": "no connection: check EMAIL_SMTP_SERVER, EMAIL_SMTP_PORT (587 STARTTLS, 465 SSL) and firewalls",
    "timeout": "the server did not answer in time (EMAIL_TIMEOUT_S): wrong port, or a firewall dropping packets",
    "tls": "TLS failed: EMAIL_USE_TLS / EMAIL_USE_SSL must match the port (587 STARTTLS, 465 SSL); a private "
           "certificate needs EMAIL_CA_FILE",
    "plain_auth": "the server asks for a login and the connection has no TLS, so the password was not sent: set "
                  "EMAIL_USE_TLS=1 (587) or EMAIL_USE_SSL=1 (465), or EMAIL_ALLOW_PLAIN_AUTH=1 to send it unencrypted",
    "auth": "login refused: check EMAIL_SENDER and EMAIL_PASSWORD (Gmail, Outlook and Yahoo need an app password)",
    "rejected": "the server refused the sender or a recipient: check EMAIL_SENDER and EMAIL_RECIPIENT",
    "other": "unexpected error",
}


def classify_error(err: BaseException) -> str:
    """One of dns, auth, plain_auth, tls, timeout, rejected, connection, other."""
    if isinstance(err, PlainAuthRefused):
        return "plain_auth"
    if isinstance(err, socket.gaierror):
        return "dns"
    if isinstance(err, smtplib.SMTPAuthenticationError):
        return "auth"
    if isinstance(err, ssl.SSLError) or (isinstance(err, smtplib.SMTPNotSupportedError)
                                         and "starttls" in str(err).lower()):
        return "tls"
    if isinstance(err, (socket.timeout, TimeoutError)) or (
            isinstance(err, smtplib.SMTPServerDisconnected) and "timed out" in str(err)):  # smtplib wraps it
        return "timeout"
    if isinstance(err, (smtplib.SMTPRecipientsRefused, smtplib.SMTPSenderRefused, smtplib.SMTPDataError)):
        return "rejected"
    if isinstance(err, (smtplib.SMTPConnectError, smtplib.SMTPServerDisconnected, ConnectionError, OSError)):
        return "connection"
    return "other"


_RETRYABLE = {"dns", "connection", "timeout", "other"}


# ---------------------------------------------------------------------------------------------------------------
# What a message is made of, and its rendering (plain text and HTML of the same content)
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Section:
    """A titled block: key/value rows, a table, or preformatted text."""
    title: str
    rows: list[tuple[str, str]] = field(default_factory=list)
    table: tuple[list[str], list[list[str]]] | None = None
    pre: str | None = None


@dataclass
class Attachment:
    filename: str
    data: bytes
    maintype: str
    subtype: str
    text: bool = False  # text attachments are redacted like the body


@dataclass
class Email:
    """One message: subject, heading, alerts ``(level, text)`` at the top, sections, attachments."""
    subject: str
    heading: str
    alerts: list[tuple[str, str]] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)
    attachments: list[Attachment] = field(default_factory=list)


def render(heading: str, alerts: list[tuple[str, str]], sections: list[Section]) -> tuple[str, str]:
    """``(plain, html)`` of the same content. Every piece of text is HTML-escaped in the HTML part."""
    e = html.escape
    plain = [heading, "=" * len(heading), ""]
    parts = [f'<html><body style="font-family:Arial,Helvetica,sans-serif;font-size:14px;color:#222">'
             f'<h2 style="margin:0 0 12px">{e(heading)}</h2>']
    if alerts:
        plain.append("Alerts:")
        for level, text in alerts:
            plain.append(f"  [{level.upper()}] {text}")
            fg, bg = LEVEL_COLOURS.get(level, LEVEL_COLOURS["warning"])
            parts.append(f'<div style="background:{bg};color:{fg};border-left:4px solid {fg};padding:6px 10px;'
                         f'margin:4px 0"><b>{e(level.upper())}</b> {e(text)}</div>')
        plain.append("")
    for sec in sections:
        plain += [sec.title, "-" * len(sec.title)]
        parts.append(f'<h3 style="margin:16px 0 6px">{e(sec.title)}</h3>')
        if sec.rows:
            width = max(len(k) for k, _ in sec.rows)
            plain += [f"  {k.ljust(width)}  {v}" for k, v in sec.rows]
            parts.append('<table style="border-collapse:collapse">' + "".join(
                f'<tr><td style="padding:2px 12px 2px 0;color:#555">{e(k)}</td><td style="padding:2px 0">'
                f'<b>{e(v)}</b></td></tr>' for k, v in sec.rows) + "</table>")
        if sec.table:
            headers, body = sec.table
            widths = [max(len(str(c)) for c in col) for col in zip(headers, *body)]
            plain.append("  " + "  ".join(h.ljust(w) for h, w in zip(headers, widths)))
            plain += ["  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in body]
            cell = 'style="border:1px solid #ccc;padding:3px 8px"'
            parts.append('<table style="border-collapse:collapse">'
                         + "<tr>" + "".join(f'<th {cell}>{e(h)}</th>' for h in headers) + "</tr>"
                         + "".join("<tr>" + "".join(f"<td {cell}>{e(str(c))}</td>" for c in row) + "</tr>"
                                   for row in body) + "</table>")
        if sec.pre is not None:
            plain += ["  " + line for line in sec.pre.splitlines()]
            parts.append(f'<pre style="background:#f5f5f5;padding:8px;font-size:12px;white-space:pre-wrap">'
                         f'{e(sec.pre)}</pre>')
        plain.append("")
    parts.append('<p style="color:#888;font-size:12px">Sent by Theta. Settings: .env (see '
                 'documentation/EMAIL_NOTIFICATIONS.md).</p></body></html>')
    return "\n".join(plain) + "\n", "".join(parts)


def fmt_number(value: Any, digits: int = 4, unit: str = "") -> str:
    """A number for a table; None, NaN and inf are spelt out."""
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{value}{unit}"
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "inf"
    if isinstance(value, int):
        return f"{value}{unit}"
    text = f"{value:.{digits}f}"  # fixed notation: never 1.981e-07 for what is effectively 0
    return f"{text.lstrip('-') if set(text) <= set('-0.') else text}{unit}"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "n/a"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}h {rem // 60:02d}m" if h else f"{rem // 60}m {rem % 60:02d}s"


def read_tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a text file ('' when unreadable); reads at most the last 64 KB."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 65536))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------------------------
# The sender
# ---------------------------------------------------------------------------------------------------------------

def never_raises(method: Callable) -> Callable:
    """The one guard: a method that fails logs a warning (password redacted), counts it and returns None.

    Training calls the notifier directly; nothing it does may raise into the loop or wait on the network (the
    network work happens on the queue thread, which has its own error handling in ``_handle``). The object needs
    ``counts`` and ``redact``.
    """
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as err:
            self.counts["failed"] += 1
            logger.warning("email: %s failed: %s", method.__name__, self.redact(repr(err)))
            return None
    return wrapper


@dataclass
class _Job:
    kind: str
    build: Callable[[], Email]
    priority: bool = False  # completion, failure and test emails ignore the hourly limit


_STOP = object()


class EmailSender:
    """Sends :class:`Email` objects from one background thread: retries with back-off, an hourly limit, a
    bounded wait at close. ``counts`` holds sent/failed/dropped totals and one counter per failure kind;
    ``last_error`` the latest failure as ``(kind, message)``."""

    def __init__(self, config: EmailConfig, run_name: str = "theta", retries: int = 3, backoff_s: float = 2.0,
                 shutdown_wait_s: float = 15.0):
        self.config = config
        self.run_name = run_name  # the X-Theta-Run header
        self.retries, self.backoff_s, self.shutdown_wait_s = max(1, retries), backoff_s, shutdown_wait_s
        self.counts: collections.Counter = collections.Counter()
        self.last_error: tuple[str, str] | None = None
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._worker: threading.Thread | None = None
        self._closing = threading.Event()
        self._closed = False
        self._auth_failed = False
        self._sent_times: collections.deque = collections.deque()
        atexit.register(self.close)

    @never_raises
    def send(self, kind: str, build: Callable[[], Email], priority: bool = False) -> None:
        """Queue one email; ``build`` runs on the sender thread. Returns at once, never raises."""
        if self._closed:
            self.counts["dropped"] += 1
            return
        with self._lock:
            if self._worker is None:
                self._worker = threading.Thread(target=self._drain, daemon=True, name="email-sender")
                self._worker.start()
        self._queue.put(_Job(kind, build, priority))

    def send_now(self, email: Email) -> tuple[bool, str]:
        """Send one email now, in this thread, once. ``(True, "")`` or ``(False, "<kind>: <error>. <hint>")``."""
        try:
            self._deliver(self._message(email))
        except Exception as err:
            kind = classify_error(err)
            self.counts[kind] += 1
            self.last_error = (kind, self.redact(str(err) or type(err).__name__))
            return False, f"{kind}: {self.last_error[1]}. {FAILURE_HINTS[kind]}"
        self.counts["sent"] += 1
        return True, ""

    def pending(self) -> int:
        """Emails queued and not yet handled."""
        return self._queue.unfinished_tasks

    @never_raises
    def close(self, timeout: float | None = None) -> bool:
        """Wait at most ``timeout`` (default ``shutdown_wait_s``) seconds for queued emails. Returns True when
        everything queued was handled. Safe to call twice."""
        if self._closed:
            return self._queue.unfinished_tasks == 0
        self._closed = True
        if self._worker is None:
            return True
        self._queue.put(_STOP)
        wait = self.shutdown_wait_s if timeout is None else timeout
        self._worker.join(wait)
        self._closing.set()  # cut retry back-offs short if the worker is still busy
        left = self._queue.qsize()
        if self._worker.is_alive():
            logger.warning("email: gave up waiting after %.0f s; %d email(s) not sent", wait, left + 1)
            self.counts["dropped"] += left + 1
            return False
        return True

    def redact(self, text: str) -> str:
        pw = self.config.password
        return text.replace(pw, "********") if pw else text

    # --- the queue thread --------------------------------------------------------------------------------------
    def _drain(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is _STOP:
                    return
                self._handle(job)
            finally:
                self._queue.task_done()

    def _handle(self, job: _Job) -> None:
        if self._auth_failed:
            self.counts["dropped"] += 1
            return
        now = time.time()
        while self._sent_times and now - self._sent_times[0] > 3600:
            self._sent_times.popleft()
        if not job.priority and len(self._sent_times) >= self.config.max_per_hour:
            self.counts["rate_limited"] += 1
            logger.warning("email: %s email skipped, EMAIL_MAX_PER_HOUR=%d reached", job.kind,
                           self.config.max_per_hour)
            return
        try:
            msg = self._message(job.build())
        except Exception as err:
            self.counts["failed"] += 1
            self.counts["build_error"] += 1
            logger.warning("email: could not build the %s email: %s", job.kind, self.redact(repr(err)))
            return
        for attempt in range(1, self.retries + 1):
            try:
                self._deliver(msg)
            except Exception as err:
                kind = classify_error(err)
                self.counts[kind] += 1
                text = self.redact(str(err) or type(err).__name__)
                self.last_error = (kind, text)
                final = attempt == self.retries or kind not in _RETRYABLE or self._closing.is_set()
                logger.warning("email: %s email%s failed (%s): %s%s", job.kind,
                               f" attempt {attempt}/{self.retries}" if self.retries > 1 else "", kind, text,
                               f". {FAILURE_HINTS[kind]}" if final else "; retrying")
                if kind == "auth":
                    self._auth_failed = True
                    logger.error("email: authentication failed; no more emails from this process")
                if final:
                    self.counts["failed"] += 1
                    return
                self._closing.wait(self.backoff_s * 2 ** (attempt - 1))
            else:
                self._sent_times.append(time.time())
                self.counts["sent"] += 1
                logger.info("email: sent %r", msg["Subject"])
                return

    def _deliver(self, msg: EmailMessage) -> None:
        """One SMTP session: connect (SSL or plain), STARTTLS when asked, log in when offered and the connection
        is encrypted (or plain login is allowed), send."""
        c = self.config
        context = ssl.create_default_context(cafile=c.ca_file) if c.encrypted else None
        if c.use_ssl:
            smtp: smtplib.SMTP = smtplib.SMTP_SSL(c.smtp_server, c.smtp_port, timeout=c.timeout_s, context=context)
        else:
            smtp = smtplib.SMTP(c.smtp_server, c.smtp_port, timeout=c.timeout_s)
        with smtp:
            smtp.ehlo()
            if c.use_tls and not c.use_ssl:
                smtp.starttls(context=context)
                smtp.ehlo()
            may_log_in = c.encrypted or c.allow_plain_auth  # AUTH PLAIN/LOGIN would show the password in clear
            if c.password and smtp.has_extn("auth") and may_log_in:
                smtp.login(c.sender, c.password)
            try:
                smtp.send_message(msg, from_addr=c.sender, to_addrs=c.recipients)
            except smtplib.SMTPResponseException as err:
                if err.smtp_code == 530 and not may_log_in:  # 530: authentication required
                    raise PlainAuthRefused(f"{c.smtp_server}:{c.smtp_port} requires a login and the connection "
                                           "has no TLS") from err
                raise

    def _message(self, email: Email) -> EmailMessage:
        plain, html_text = render(email.heading, email.alerts, email.sections)
        msg = EmailMessage()
        msg["Subject"] = self.redact(email.subject)
        msg["From"] = self.config.sender
        msg["To"] = ", ".join(self.config.recipients)
        msg["Date"] = formatdate(localtime=True)
        msg["Message-ID"] = make_msgid(domain="theta.local")
        msg["X-Theta-Run"] = self.run_name
        msg.set_content(self.redact(plain))
        msg.add_alternative(self.redact(html_text), subtype="html")
        for a in email.attachments:
            data = self.redact(a.data.decode("utf-8")).encode("utf-8") if a.text else a.data
            msg.add_attachment(data, maintype=a.maintype, subtype=a.subtype, filename=a.filename)
        return msg


def probe_email() -> Email:
    """The test message of ``--test`` and of the pre-flight."""
    return Email(f"{SUBJECT_PREFIX} test email from {socket.gethostname()}", "Theta email test",
                 [("ok", "email notifications work")])


def send_test_email(config: EmailConfig) -> tuple[bool, str]:
    """Send the test message now; ``(True, "")`` or ``(False, "<kind>: <error>. <hint>")``."""
    sender = EmailSender(config, run_name="test")
    email = probe_email()
    email.sections.append(Section("Settings", rows=[("server", f"{config.smtp_server}:{config.smtp_port}"),
                                                    ("to", ", ".join(config.recipients))]))
    return sender.send_now(email)


class NullNotifier:
    """The notifier when email is off: every method of the trainer's notifier interface, each doing nothing.

    It has no ``__getattr__``: a misspelt method name is an AttributeError here too, not a silent no-op.
    """
    lifecycle_emails = False

    def start(self, args: Any = None) -> None:
        """Nothing (email is off)."""

    def epoch(self, epoch: int, entry: Mapping[str, Any]) -> None:
        """Nothing (email is off)."""

    def status(self) -> None:
        """Nothing (email is off)."""

    def completed(self, summary: Mapping[str, Any]) -> None:
        """Nothing (email is off)."""

    def failed(self, error: str, step: str | None = None, log_file: Path | None = None) -> None:
        """Nothing (email is off)."""

    def close(self, timeout: float | None = None) -> bool:
        """Nothing to wait for: True."""
        return True


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = FlagParser(description="Theta email notifications: check the configuration, send a test.")
    p.add_argument("--test", action="store_true", help="send a test email now and report what failed")
    p.add_argument("--show-config", action="store_true", help="print the configuration in effect (no password)")
    p.add_argument("--env-file", type=Path, default=None, help="a .env file (default: .env in the project root)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.env_file is not None and not args.env_file.is_file():
        print(f"error: --env-file {args.env_file} not found", file=sys.stderr)
        return 2
    config, level, message = resolve_email_config(dotenv_path=args.env_file)
    if config is None:
        print(message if not args.test else f"{'warning' if level == 'warning' else 'info'}: {message}")
        return 2 if args.test else 0
    print(f"email: {config.describe()}")
    if config.plain_auth_note():
        print(f"warning: {config.plain_auth_note()}")
    if not args.test:
        if not args.show_config:
            p.print_help()
        return 0
    ok, problem = send_test_email(config)
    if ok:
        print(f"test email sent to {', '.join(config.recipients)}")
        return 0
    print(f"test email FAILED ({problem})", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
