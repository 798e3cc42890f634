"""Email progress reports for training runs: start, every epoch, a periodic GPU status, completion and failure.

A small sink that never gets in the way of training. Each call snapshots its data, puts a job on a queue and
returns at once; one background thread builds the message (HTML and plain text), and sends it with smtplib
(timeouts, retries with backoff, a rate limit). A dead, slow or refusing server costs training nothing; failures
are logged with their kind (dns, connection, timeout, tls, auth, rejected) and counted, never with the password.

    python -m src.utils.email_notifier --test          # send a test email; says exactly what failed
    python -m src.utils.email_notifier --show-config   # the configuration in effect (password masked)

    from src.utils.email_notifier import NullNotifier, TrainingEmailNotifier, load_email_config
    config = load_email_config()            # None when email is off (one log line says why)
    notifier = TrainingEmailNotifier(config, run_name="theta_enhanced_20260101_230000") if config else NullNotifier()
    notifier.start(args)
    notifier.epoch(1, {"train_loss": 2.1, "val_loss": 1.9, ...})
    notifier.completed(summary)             # or notifier.failed(error, step="train", log_file=log)
    notifier.close()

The interface is ``start``, ``epoch``, ``status``, ``completed``, ``failed``, ``close`` (plus ``update_metrics``).
Every method returns at once and never raises: one guard (``_guarded``) catches and logs, one queue thread
talks to the server. ``NullNotifier`` has the same methods doing nothing; neither has a catch-all, so a
misspelt method name is an AttributeError.

Configuration (environment, else ``.env`` in the project root; see ``.env.example`` and
documentation/EMAIL_NOTIFICATIONS.md): EMAIL_ENABLED, EMAIL_SENDER, EMAIL_RECIPIENT (comma-separated),
EMAIL_PASSWORD, EMAIL_SMTP_SERVER, EMAIL_SMTP_PORT, EMAIL_USE_TLS (STARTTLS), EMAIL_USE_SSL (implicit TLS),
EMAIL_STATUS_INTERVAL_MIN, EMAIL_MAX_PER_HOUR, and the optional EMAIL_TIMEOUT_S and EMAIL_CA_FILE.

Sharp edges: completion, failure and test emails bypass the hourly limit (they come once per run); after an
authentication failure nothing more is sent in this process (retrying a wrong password can lock the account);
at exit, queued emails get ``shutdown_wait_s`` seconds (default 15), then the process leaves without them.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import functools
import html
import json
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
from datetime import datetime, timedelta
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any, Callable, Mapping

if __package__ in (None, ""):  # run as a file: make `src` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from src.utils import gpu_info
from src.utils.common import PROJECT_ROOT

logger = logging.getLogger(__name__)

SUBJECT_PREFIX = "[Theta]"
LOG_TAIL_LINES = 40

# Alert thresholds (documented in documentation/EMAIL_NOTIFICATIONS.md). "warning" is amber, "critical" red.
ALERT_THRESHOLDS: dict[str, float] = {
    "perplexity_warning": 50.0,        # validation perplexity above this
    "perplexity_critical": 500.0,
    "token_accuracy_warning": 0.30,    # validation token accuracy below this
    "token_accuracy_critical": 0.10,
    "kl_warning": 0.5,                 # KL divergence (R-Drop / EMA vs. model) above this
    "kl_critical": 2.0,
    "difficult_ratio_warning": 0.6,    # share of difficult examples the curriculum feeds, above this
    "lr_collapse_ratio": 0.01,         # learning rate below 1% of the initial one ...
    "lr_collapse_before": 0.9,         # ... before 90% of the epochs are done
    "domain_perplexity_ratio": 2.0,    # a domain's perplexity more than 2x the overall one
    "domain_accuracy_gap": 0.15,       # a domain's token accuracy this far below the overall one
    "val_loss_rise": 0.10,             # validation loss 10% above the best so far (overfitting)
    "gpu_temperature_warning": 80.0,   # degrees C
    "gpu_temperature_critical": 87.0,
    "gpu_memory_warning": 0.95,        # share of GPU memory in use
    "ram_warning": 0.90,               # share of system RAM in use
}
_LEVEL_COLOURS = {"critical": ("#b71c1c", "#ffebee"), "warning": ("#8d6e00", "#fff8e1"), "ok": ("#1b5e20", "#e8f5e9")}

_TRUE = {"1", "true", "yes", "on", "y"}
_FALSE = {"0", "false", "no", "off", "n", ""}


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
    status_interval_min: float = 10.0
    max_per_hour: int = 20
    timeout_s: float = 10.0
    ca_file: str | None = None

    def describe(self) -> str:
        mode = "SSL" if self.use_ssl else ("STARTTLS" if self.use_tls else "plain (no TLS)")
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
        use_tls=use_tls, use_ssl=use_ssl,
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

FAILURE_HINTS = {
    "dns": "the server name does not resolve: check EMAIL_SMTP_SERVER and the network",
    "connection": "no connection: check EMAIL_SMTP_SERVER, EMAIL_SMTP_PORT (587 STARTTLS, 465 SSL) and firewalls",
    "timeout": "the server did not answer in time (EMAIL_TIMEOUT_S): wrong port, or a firewall dropping packets",
    "tls": "TLS failed: EMAIL_USE_TLS / EMAIL_USE_SSL must match the port (587 STARTTLS, 465 SSL); a private "
           "certificate needs EMAIL_CA_FILE",
    "auth": "login refused: check EMAIL_SENDER and EMAIL_PASSWORD (Gmail, Outlook and Yahoo need an app password)",
    "rejected": "the server refused the sender or a recipient: check EMAIL_SENDER and EMAIL_RECIPIENT",
    "other": "unexpected error",
}


def classify_error(err: BaseException) -> str:
    """One of dns, auth, tls, timeout, rejected, connection, other."""
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
# Rendering: one structure, two parts (plain text and HTML)
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Section:
    """A titled block: key/value rows, a table, or preformatted text."""
    title: str
    rows: list[tuple[str, str]] = field(default_factory=list)
    table: tuple[list[str], list[list[str]]] | None = None
    pre: str | None = None


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
            fg, bg = _LEVEL_COLOURS.get(level, _LEVEL_COLOURS["warning"])
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


def _f(value: Any, digits: int = 4, unit: str = "") -> str:
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


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "n/a"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}h {rem // 60:02d}m" if h else f"{rem // 60}m {rem % 60:02d}s"


def gpu_sections(info: dict) -> tuple[list[Section], list[tuple[str, str]]]:
    """The GPU table (or the CPU-only line), the CPU/RAM rows, and their alerts."""
    alerts: list[tuple[str, str]] = []
    t = ALERT_THRESHOLDS
    sections = []
    gpus = info.get("gpus") or []
    if gpus:
        rows = []
        for g in gpus:
            used, total = g.get("memory_used_mb"), g.get("memory_total_mb")
            rows.append([str(g.get("index")), str(g.get("name")), _f(g.get("temperature_c"), 0, " C"),
                         f"{_f(used, 0)} / {_f(total, 0)} MiB", _f(g.get("utilization_pct"), 0, "%"),
                         f"{_f(g.get('power_w'), 0)} / {_f(g.get('power_limit_w'), 0)} W"])
            temp = g.get("temperature_c")
            if temp is not None and temp >= t["gpu_temperature_critical"]:
                alerts.append(("critical", f"GPU {g.get('index')} at {temp} C (>= {t['gpu_temperature_critical']:g})"))
            elif temp is not None and temp >= t["gpu_temperature_warning"]:
                alerts.append(("warning", f"GPU {g.get('index')} at {temp} C (>= {t['gpu_temperature_warning']:g})"))
            if used is not None and total and used / total >= t["gpu_memory_warning"]:
                alerts.append(("warning", f"GPU {g.get('index')} memory {100 * used / total:.0f}% full"))
        sections.append(Section(f"GPU ({info.get('source')})", table=(
            ["#", "name", "temperature", "memory", "utilisation", "power"], rows)))
    else:
        sections.append(Section("GPU", rows=[("device", "no CUDA GPU: training on the CPU")]))
    system = info.get("system") or {}
    ram_used, ram_total = system.get("ram_used_mb"), system.get("ram_total_mb")
    sections.append(Section("CPU and RAM", rows=[
        ("CPU", f"{_f(system.get('cpu_percent'), 0, '%')} of {_f(system.get('cpu_count'))} cores"),
        ("RAM", f"{_f(ram_used and ram_used / 1024, 1)} / {_f(ram_total and ram_total / 1024, 1)} GB "
                f"({_f(system.get('ram_percent'), 0, '%')})")]))
    if system.get("ram_percent") is not None and system["ram_percent"] / 100 >= t["ram_warning"]:
        alerts.append(("warning", f"system RAM {system['ram_percent']:.0f}% used"))
    return sections, alerts


def metric_alerts(entry: Mapping[str, Any], history: list[Mapping[str, Any]], total_epochs: int | None,
                  initial_lr: float | None, extra: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Alerts for one epoch's figures (see ALERT_THRESHOLDS)."""
    t = ALERT_THRESHOLDS
    alerts: list[tuple[str, str]] = []
    val_loss = entry.get("val_loss")
    if isinstance(val_loss, (int, float)) and not math.isfinite(val_loss):
        alerts.append(("critical", f"validation loss is {val_loss}: training diverged"))
    ppl = entry.get("val_perplexity")
    if isinstance(ppl, (int, float)) and math.isfinite(ppl):
        if ppl > t["perplexity_critical"]:
            alerts.append(("critical", f"perplexity {ppl:.1f} > {t['perplexity_critical']:g}"))
        elif ppl > t["perplexity_warning"]:
            alerts.append(("warning", f"perplexity {ppl:.1f} > {t['perplexity_warning']:g}"))
    acc = entry.get("val_token_accuracy")
    if isinstance(acc, (int, float)):
        if acc < t["token_accuracy_critical"]:
            alerts.append(("critical", f"token accuracy {acc:.3f} < {t['token_accuracy_critical']:g}"))
        elif acc < t["token_accuracy_warning"]:
            alerts.append(("warning", f"token accuracy {acc:.3f} < {t['token_accuracy_warning']:g}"))
    kl = entry.get("kl", extra.get("kl"))
    if isinstance(kl, (int, float)):
        if kl > t["kl_critical"]:
            alerts.append(("critical", f"KL divergence {kl:.3f} > {t['kl_critical']:g}"))
        elif kl > t["kl_warning"]:
            alerts.append(("warning", f"KL divergence {kl:.3f} > {t['kl_warning']:g}"))
    ratio = entry.get("difficult_ratio", extra.get("difficult_ratio"))
    if isinstance(ratio, (int, float)) and ratio > t["difficult_ratio_warning"]:
        alerts.append(("warning", f"difficult-example ratio {ratio:.2f} > {t['difficult_ratio_warning']:g}"))
    lr, epoch = entry.get("learning_rate"), entry.get("epoch")
    if isinstance(lr, (int, float)) and initial_lr and total_epochs and isinstance(epoch, int):
        if lr < initial_lr * t["lr_collapse_ratio"] and epoch < t["lr_collapse_before"] * total_epochs:
            alerts.append(("warning", f"learning rate collapsed to {lr:.2e} at epoch {epoch}/{total_epochs} "
                                      f"(initial {initial_lr:.2e})"))
    finite = [h["val_loss"] for h in history if isinstance(h.get("val_loss"), (int, float))
              and math.isfinite(h["val_loss"])]
    if isinstance(val_loss, (int, float)) and math.isfinite(val_loss) and finite:
        best = min(finite)
        if best > 0 and val_loss > best * (1 + t["val_loss_rise"]):
            alerts.append(("warning", f"validation loss {val_loss:.4f} is {100 * (val_loss / best - 1):.0f}% above "
                                      f"the best {best:.4f}: overfitting?"))
    for name, d in sorted((entry.get("domains") or {}).items()):
        dp, da = d.get("perplexity"), d.get("token_accuracy")
        if isinstance(dp, (int, float)) and isinstance(ppl, (int, float)) and math.isfinite(ppl) and ppl > 0 \
                and dp > t["domain_perplexity_ratio"] * ppl:
            alerts.append(("warning", f"domain {name}: perplexity {dp:.1f} > {t['domain_perplexity_ratio']:g}x overall"))
        if isinstance(da, (int, float)) and isinstance(acc, (int, float)) and da < acc - t["domain_accuracy_gap"]:
            alerts.append(("warning", f"domain {name}: token accuracy {da:.3f} trails overall {acc:.3f}"))
    return alerts


# ---------------------------------------------------------------------------------------------------------------
# The notifier
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class _Job:
    kind: str
    build: Callable[[], EmailMessage]
    priority: bool = False  # completion, failure and test emails ignore the hourly limit


_STOP = object()


def _guarded(method: Callable) -> Callable:
    """The one guard: a notifier method that fails logs a warning (password redacted) and returns None.

    Training calls the notifier directly; nothing it does may raise into the loop or wait on the network (the
    network work happens on the queue thread, which has its own error handling in ``_handle``).
    """
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as err:
            self.counts["failed"] += 1
            logger.warning("email: %s failed: %s", method.__name__, self._redact(repr(err)))
            return None
    return wrapper


class NullNotifier:
    """The notifier when email is off: every method of the interface, each doing nothing.

    It has no ``__getattr__``: a misspelt method name is an AttributeError here too, not a silent no-op.
    """
    lifecycle_emails = False

    def start(self, args: Any = None) -> None:
        """Nothing (email is off)."""

    def epoch(self, epoch: int, entry: Mapping[str, Any]) -> None:
        """Nothing (email is off)."""

    def status(self) -> None:
        """Nothing (email is off)."""

    def update_metrics(self, metrics: Mapping[str, Any]) -> None:
        """Nothing (email is off)."""

    def completed(self, summary: Mapping[str, Any]) -> None:
        """Nothing (email is off)."""

    def failed(self, error: str, step: str | None = None, log_file: Path | None = None) -> None:
        """Nothing (email is off)."""

    def close(self, timeout: float | None = None) -> bool:
        """Nothing to wait for: True."""
        return True


_SECRET_WORDS = ("password", "secret", "token", "api_key")


class TrainingEmailNotifier:
    """Training progress by email, sent from a background thread (see the module docstring).

    ``lifecycle_emails=False`` keeps start/completion/failure quiet (the overnight scripts send those for the whole
    chain) while epoch and status emails still go out. ``counts`` holds sent/failed/dropped totals and one counter
    per failure kind; ``last_error`` the latest failure as ``(kind, message)``.
    """

    def __init__(self, config: EmailConfig, run_name: str = "theta", run_dir: Path | None = None,
                 stats_dir: Path | None = None, log_file: Path | None = None, lifecycle_emails: bool = True,
                 retries: int = 3, backoff_s: float = 2.0, shutdown_wait_s: float = 15.0,
                 gpu_probe: Callable[[], dict] | None = None):
        self.config = config
        self.run_name = run_name
        self.run_dir = Path(run_dir) if run_dir else None
        self.stats_dir = Path(stats_dir) if stats_dir else (
            self.run_dir.resolve().parent.parent / "stats" if self.run_dir else PROJECT_ROOT / "stats")
        self.log_file = Path(log_file) if log_file else None
        self.lifecycle_emails = lifecycle_emails
        self.retries, self.backoff_s, self.shutdown_wait_s = max(1, retries), backoff_s, shutdown_wait_s
        self.gpu_probe = gpu_probe or (lambda: gpu_info.get_gpu_info())
        self.counts: collections.Counter = collections.Counter()
        self.last_error: tuple[str, str] | None = None
        self.run_info: dict[str, Any] = {}
        self.metrics: dict[str, Any] = {}
        self.history: list[dict] = []
        self.started_at = time.time()
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._worker: threading.Thread | None = None
        self._closing = threading.Event()
        self._closed = False
        self._auth_failed = False
        self._sent_times: collections.deque = collections.deque()
        self._status_stop = threading.Event()
        self._status_thread: threading.Thread | None = None
        atexit.register(self.close)

    # --- the API the trainer and the scripts call (CONTRACTS: start, epoch, status, completed, failed, close) --
    # Each method snapshots its data, enqueues one job and returns; all of them go through _guarded, the one place
    # that keeps a notifier error from reaching the training loop.
    @_guarded
    def start(self, args: Any = None) -> None:
        """Record the run settings, send the start email and start the periodic status thread."""
        info = vars(args) if hasattr(args, "__dict__") else dict(args or {})
        with self._lock:
            self.run_info = {k: (str(v) if isinstance(v, Path) else v) for k, v in info.items()
                             if not any(w in k.lower() for w in _SECRET_WORDS)}
            self.started_at = time.time()
        if self.lifecycle_emails:
            self._enqueue(_Job("start", self._build_start))
        self.start_status_thread()

    @_guarded
    def epoch(self, epoch: int, entry: Mapping[str, Any]) -> None:
        """One email per epoch: progress, ETA, losses, perplexity, accuracy, learning rate, domains, GPU, alerts."""
        entry = json.loads(json.dumps(dict(entry), default=str))  # a snapshot the training loop cannot mutate
        entry.setdefault("epoch", epoch)
        with self._lock:
            previous = list(self.history)
            self.history.append(entry)
            extra = dict(self.metrics)
        self._enqueue(_Job("epoch", lambda: self._build_epoch(epoch, entry, previous, extra)))

    @_guarded
    def status(self) -> None:
        """A status email: latest figures, GPU table, CPU and RAM, alerts. The status thread calls it."""
        with self._lock:
            last = dict(self.history[-1]) if self.history else {}
            history = list(self.history)
            extra = dict(self.metrics)
        self._enqueue(_Job("status", lambda: self._build_status(last, history, extra)))

    @_guarded
    def update_metrics(self, metrics: Mapping[str, Any]) -> None:
        """Merge figures (EMA, curriculum, KL, difficult ratio, ...) shown in the next epoch and status emails."""
        with self._lock:
            self.metrics.update(json.loads(json.dumps(dict(metrics), default=str)))

    @_guarded
    def completed(self, summary: Mapping[str, Any]) -> None:
        """The completion email, with the loss curve and the evaluation summary attached when they exist."""
        self.stop_status_thread()
        summary = json.loads(json.dumps(dict(summary), default=str))
        if self.lifecycle_emails:
            self._enqueue(_Job("completed", lambda: self._build_completed(summary), priority=True))

    @_guarded
    def failed(self, error: str, step: str | None = None, log_file: Path | None = None) -> None:
        """The failure email: the step, the error and the last lines of the log."""
        self.stop_status_thread()
        if self.lifecycle_emails:
            self._enqueue(_Job("failed", lambda: self._build_failed(str(error), step, log_file), priority=True))

    def send_test_email(self) -> tuple[bool, str]:
        """Send one test email now, in this thread. ``(True, "")`` or ``(False, "<kind>: <error>. <hint>")``."""
        msg = self._message(f"{SUBJECT_PREFIX} test email from {socket.gethostname()}",
                            *render("Theta email test", [("ok", "email notifications work")],
                                    [Section("Settings", rows=[("server", f"{self.config.smtp_server}:"
                                                                          f"{self.config.smtp_port}"),
                                                               ("to", ", ".join(self.config.recipients))])]))
        try:
            self._deliver(msg)
        except Exception as err:
            kind = classify_error(err)
            return False, f"{kind}: {self._redact(str(err) or type(err).__name__)}. {FAILURE_HINTS[kind]}"
        return True, ""

    # --- status thread -----------------------------------------------------------------------------------------
    def start_status_thread(self) -> None:
        interval = self.config.status_interval_min * 60
        if interval <= 0 or self._status_thread is not None or self._closed:
            return
        self._status_stop.clear()

        def loop():
            while not self._status_stop.wait(interval):
                self.status()

        self._status_thread = threading.Thread(target=loop, daemon=True, name="email-status")
        self._status_thread.start()

    def stop_status_thread(self) -> None:
        self._status_stop.set()
        self._status_thread = None

    # --- queue and transport -----------------------------------------------------------------------------------
    def _enqueue(self, job: _Job) -> None:
        if self._closed:
            self.counts["dropped"] += 1
            return
        with self._lock:
            if self._worker is None:
                self._worker = threading.Thread(target=self._drain, daemon=True, name="email-sender")
                self._worker.start()
        self._queue.put(job)

    @_guarded
    def close(self, timeout: float | None = None) -> bool:
        """Stop the status thread and wait at most ``timeout`` (default ``shutdown_wait_s``) seconds for queued
        emails. Returns True when everything queued was handled. Safe to call twice."""
        self.stop_status_thread()
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
            msg = job.build()
        except Exception as err:
            self.counts["failed"] += 1
            self.counts["build_error"] += 1
            logger.warning("email: could not build the %s email: %s", job.kind, self._redact(repr(err)))
            return
        for attempt in range(1, self.retries + 1):
            try:
                self._deliver(msg)
            except Exception as err:
                kind = classify_error(err)
                self.counts[kind] += 1
                text = self._redact(str(err) or type(err).__name__)
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
        """One SMTP session: connect (SSL or plain), STARTTLS when asked, login when offered, send."""
        c = self.config
        context = ssl.create_default_context(cafile=c.ca_file) if (c.use_ssl or c.use_tls) else None
        if c.use_ssl:
            smtp: smtplib.SMTP = smtplib.SMTP_SSL(c.smtp_server, c.smtp_port, timeout=c.timeout_s, context=context)
        else:
            smtp = smtplib.SMTP(c.smtp_server, c.smtp_port, timeout=c.timeout_s)
        with smtp:
            smtp.ehlo()
            if c.use_tls and not c.use_ssl:
                smtp.starttls(context=context)
                smtp.ehlo()
            if c.password and smtp.has_extn("auth"):
                smtp.login(c.sender, c.password)
            smtp.send_message(msg, from_addr=c.sender, to_addrs=c.recipients)

    def _redact(self, text: str) -> str:
        pw = self.config.password
        return text.replace(pw, "********") if pw else text

    # --- message building (runs in the sender thread) ---------------------------------------------------------
    def _message(self, subject: str, plain: str, html_text: str) -> EmailMessage:
        msg = EmailMessage()
        msg["Subject"] = self._redact(subject)
        msg["From"] = self.config.sender
        msg["To"] = ", ".join(self.config.recipients)
        msg["Date"] = formatdate(localtime=True)
        msg["Message-ID"] = make_msgid(domain="theta.local")
        msg["X-Theta-Run"] = self.run_name
        msg.set_content(self._redact(plain))
        msg.add_alternative(self._redact(html_text), subtype="html")
        return msg

    def _total_epochs(self) -> int | None:
        epochs = self.run_info.get("epochs")
        return epochs if isinstance(epochs, int) and epochs > 0 else None

    def _progress_rows(self, history: list[dict]) -> list[tuple[str, str]]:
        total = self._total_epochs()
        done = history[-1].get("epoch", len(history)) if history else 0
        rows = [("run", self.run_name), ("elapsed", _duration(time.time() - self.started_at))]
        if total:
            rows.insert(1, ("progress", f"epoch {done}/{total} ({100 * done / total:.0f}%)"))
            secs = [h["seconds"] for h in history if isinstance(h.get("seconds"), (int, float))]
            if secs and done < total:
                left = sum(secs) / len(secs) * (total - done)
                eta = datetime.now() + timedelta(seconds=left)
                rows.append(("ETA", f"{eta:%a %H:%M} (about {_duration(left)} left, if every epoch runs)"))
        return rows

    def _state_rows(self, entry: Mapping[str, Any], extra: Mapping[str, Any]) -> list[tuple[str, str]]:
        """EMA, curriculum and other figures the trainer reported through update_metrics or the epoch entry."""
        keys = sorted({k for k in list(entry) + list(extra)
                       if k.startswith(("ema", "curriculum", "kl", "difficult", "rdrop", "gradient_noise"))})
        return [(k.replace("_", " "), _f(entry.get(k, extra.get(k)))) for k in keys]

    def _initial_lr(self, history: list[dict]) -> float | None:
        lr = self.run_info.get("learning_rate")
        if isinstance(lr, (int, float)):
            return float(lr)
        return history[0].get("learning_rate") if history else None

    def _build_start(self) -> EmailMessage:
        info = self.run_info
        tricks = sorted(k[4:] for k, v in info.items() if k.startswith("use_") and v is True)
        rows = [(label, _f(info.get(key), 6) if isinstance(info.get(key), float) else str(info.get(key)))
                for label, key in [("profile", "profile"), ("model", "model_name"), ("epochs", "epochs"),
                                   ("batch size", "batch_size"), ("accumulation", "gradient_accumulation_steps"),
                                   ("learning rate", "learning_rate"), ("schedule", "scheduler_type"),
                                   ("data", "data_path"), ("output", "output_dir")] if info.get(key) is not None]
        rows.append(("techniques on", ", ".join(tricks) or "none"))
        rows.insert(0, ("host", socket.gethostname()))
        rows.insert(0, ("started", f"{datetime.fromtimestamp(self.started_at):%Y-%m-%d %H:%M:%S}"))
        details = info.get("details") or {}
        rows += [(str(k), str(v)) for k, v in details.items()]
        sections, alerts = gpu_sections(self.gpu_probe())
        plain, html_text = render(f"Training started: {self.run_name}", alerts,
                                  [Section("Run", rows=rows)] + sections)
        model = info.get("model_name") or info.get("profile") or "theta"
        epochs = f", {info['epochs']} epochs" if info.get("epochs") else ""
        return self._message(f"{SUBJECT_PREFIX} started: {self.run_name} ({model}{epochs})", plain, html_text)

    def _build_epoch(self, epoch: int, entry: dict, previous: list[dict], extra: dict) -> EmailMessage:
        history = previous + [entry]
        total = self._total_epochs()
        alerts = metric_alerts(entry, previous, total, self._initial_lr(history), extra)
        prev = previous[-1] if previous else {}

        def delta(key: str) -> str:
            a, b = entry.get(key), prev.get(key)
            if isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isfinite(a) and math.isfinite(b):
                return f" ({a - b:+.4f})"
            return ""

        figures = [("train loss", _f(entry.get("train_loss")) + delta("train_loss")),
                   ("validation loss", _f(entry.get("val_loss")) + delta("val_loss")),
                   ("perplexity", _f(entry.get("val_perplexity"), 2)),
                   ("token accuracy", _f(entry.get("val_token_accuracy"), 3) + delta("val_token_accuracy")),
                   ("learning rate", f"{entry['learning_rate']:.2e}" if isinstance(entry.get("learning_rate"), float)
                    else _f(entry.get("learning_rate"))),
                   ("epoch time", _duration(entry.get("seconds"))), ("step", _f(entry.get("step")))]
        sections = [Section("Progress", rows=self._progress_rows(history)), Section("Figures", rows=figures)]
        state = self._state_rows(entry, extra)
        if state:
            sections.append(Section("EMA, curriculum and regularisers", rows=state))
        domains = entry.get("domains") or {}
        if domains:
            sections.append(Section("Per domain", table=(["domain", "loss", "perplexity", "token accuracy"], [
                [d, _f(v.get("loss")), _f(v.get("perplexity"), 2), _f(v.get("token_accuracy"), 3)]
                for d, v in sorted(domains.items())])))
        gpu_secs, gpu_alerts = gpu_sections(self.gpu_probe())
        alerts += gpu_alerts
        of = f"/{total}" if total else ""
        heading = f"Epoch {epoch}{of}: validation loss {_f(entry.get('val_loss'))}"
        plain, html_text = render(heading, alerts, sections + gpu_secs)
        flag = f" [{len(alerts)} alert{'s' if len(alerts) != 1 else ''}]" if alerts else ""
        return self._message(f"{SUBJECT_PREFIX} epoch {epoch}{of}: val loss {_f(entry.get('val_loss'))}, perplexity "
                             f"{_f(entry.get('val_perplexity'), 2)}{flag} - {self.run_name}", plain, html_text)

    def _build_status(self, last: dict, history: list[dict], extra: dict) -> EmailMessage:
        info = self.gpu_probe()
        gpu_secs, alerts = gpu_sections(info)
        sections = [Section("Progress", rows=self._progress_rows(history))]
        if last:
            sections.append(Section("Latest epoch", rows=[
                ("validation loss", _f(last.get("val_loss"))), ("perplexity", _f(last.get("val_perplexity"), 2)),
                ("token accuracy", _f(last.get("val_token_accuracy"), 3)),
                ("learning rate", _f(last.get("learning_rate"), 6))]))
            alerts = metric_alerts(last, history[:-1], self._total_epochs(), self._initial_lr(history), extra) + alerts
        state = self._state_rows({}, extra)
        if state:
            sections.append(Section("EMA, curriculum and regularisers", rows=state))
        best = gpu_info.pick_best_gpu(info.get("gpus") or [])
        where = f"GPU {_f(best.get('temperature_c'), 0, ' C')}" if best else "CPU"
        epoch = f"epoch {last.get('epoch')}" + (f"/{self._total_epochs()}" if self._total_epochs() else "") \
            if last else "before the first epoch"
        plain, html_text = render(f"Status: {self.run_name}", alerts, sections + gpu_secs)
        return self._message(f"{SUBJECT_PREFIX} status: {epoch}, {where} - {self.run_name}", plain, html_text)

    def _build_completed(self, summary: dict) -> EmailMessage:
        rows = [(k.replace("_", " "), _f(summary[k]) if k != "seconds" else _duration(summary[k]))
                for k in ("status", "epochs_run", "best_epoch", "best_val_loss", "global_step", "seconds",
                          "final_model") if k in summary]
        sections = [Section("Run", rows=[("run", self.run_name)] + rows)]
        alerts: list[tuple[str, str]] = []
        status = summary.get("status", "completed")
        if status not in ("completed", "done", "ok"):
            alerts.append(("warning", f"status: {status}"))
        evaluation_path = self.stats_dir / f"evaluation_{self.run_name}.json"
        evaluation = None
        if evaluation_path.is_file():
            try:
                evaluation = json.loads(evaluation_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                alerts.append(("warning", f"could not read {evaluation_path.name}: {err}"))
        if isinstance(evaluation, dict):
            sections.append(Section("Test set (evaluation)", rows=[
                ("records", _f(evaluation.get("test_records"))), ("perplexity", _f(evaluation.get("perplexity"), 2)),
                ("token accuracy", _f(evaluation.get("token_accuracy"), 3)),
                ("loss", _f(evaluation.get("loss")))] + [
                (k.replace("_", " "), _f(v, 3)) for k, v in evaluation.items()
                if k in ("exact_match", "f1", "bleu", "rouge_l", "chrf") and isinstance(v, (int, float))]))
            per_domain = evaluation.get("per_domain") or {}
            if per_domain:
                sections.append(Section("Test set per domain", table=(["domain", "perplexity", "token accuracy"], [
                    [d, _f(v.get("perplexity"), 2), _f(v.get("token_accuracy"), 3)]
                    for d, v in sorted(per_domain.items())])))
            samples = [s for s in (evaluation.get("samples") or []) if isinstance(s, dict)][:3]
            if samples:
                text = "\n\n".join(
                    f"Q: {s.get('question', '')}\nA: {s.get('prediction', s.get('generated', ''))}\n"
                    f"reference: {s.get('reference', s.get('answer', ''))}" for s in samples)
                sections.append(Section("Sample answers", pre=text))
        else:
            alerts.append(("warning", f"no evaluation summary ({evaluation_path.name} not found)"))
        with self._lock:
            history = list(self.history)
        if not history and self.run_dir and (self.run_dir / "loss_history.json").is_file():
            try:
                history = json.loads((self.run_dir / "loss_history.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                history = []
        if history:
            sections.append(Section("Loss history", table=(["epoch", "train loss", "val loss", "perplexity",
                                                            "token accuracy"], [
                [str(h.get("epoch")), _f(h.get("train_loss")), _f(h.get("val_loss")), _f(h.get("val_perplexity"), 2),
                 _f(h.get("val_token_accuracy"), 3)] for h in history])))
        if self.log_file:
            sections.append(Section("Files", rows=[("log", str(self.log_file))]))
        plain, html_text = render(f"Training completed: {self.run_name}", alerts, sections)
        best = summary.get("best_val_loss")
        subject = (f"{SUBJECT_PREFIX} completed: {self.run_name}, best val loss {_f(best)} "
                   f"(epoch {summary.get('best_epoch', '?')})")
        if isinstance(evaluation, dict) and isinstance(evaluation.get("perplexity"), (int, float)):
            subject += f", test perplexity {_f(evaluation['perplexity'], 2)}"
        msg = self._message(subject, plain, html_text)
        curve = self.stats_dir / self.run_name / "loss_curve.png"
        png = curve.read_bytes() if curve.is_file() else _draw_loss_curve(history)
        if png:
            msg.add_attachment(png, maintype="image", subtype="png", filename="loss_curve.png")
        if evaluation_path.is_file():
            msg.add_attachment(self._redact(evaluation_path.read_text(encoding="utf-8")).encode("utf-8"),
                               maintype="application", subtype="json", filename=evaluation_path.name)
        return msg

    def _build_failed(self, error: str, step: str | None, log_file: Path | None) -> EmailMessage:
        log = Path(log_file) if log_file else self.log_file
        rows = [("run", self.run_name), ("step", step or "training"), ("when", f"{datetime.now():%Y-%m-%d %H:%M:%S}"),
                ("host", socket.gethostname())]
        if log:
            rows.append(("log", str(log)))
        rows.append(("what now", "fix the cause, then run the same command again: the run resumes"))
        sections = [Section("Run", rows=rows), Section("Error", pre=error.strip() or "(no message)")]
        tail = _tail(log, LOG_TAIL_LINES) if log else ""
        if tail:
            sections.append(Section(f"Last {LOG_TAIL_LINES} lines of the log", pre=tail))
        plain, html_text = render(f"Training FAILED: {self.run_name}", [("critical", f"failed at step {step or 'training'}")],
                                  sections)
        first = (error.strip().splitlines() or ["unknown error"])[-1][:120]
        return self._message(f"{SUBJECT_PREFIX} FAILED: {self.run_name} at {step or 'training'}: {first}", plain,
                             html_text)


def _tail(path: Path, lines: int) -> str:
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


def _draw_loss_curve(history: list[dict]) -> bytes | None:
    """A loss-curve PNG drawn in memory from the history, for runs whose report has none; None when impossible."""
    points = [(h.get("epoch"), h.get("train_loss"), h.get("val_loss")) for h in history]
    points = [p for p in points if all(isinstance(v, (int, float)) and math.isfinite(v) for v in p)]
    if not points:
        return None
    try:
        import io

        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6, 3.5), dpi=100)
        ax = fig.add_subplot()
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label="train")
        ax.plot([p[0] for p in points], [p[2] for p in points], "s-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
        return buf.getvalue()
    except Exception as err:
        logger.debug("loss curve not drawn: %s", err)
        return None


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Theta email notifications: check the configuration, send a test.")
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
    if not args.test:
        if not args.show_config:
            p.print_help()
        return 0
    ok, problem = TrainingEmailNotifier(config, run_name="test").send_test_email()
    if ok:
        print(f"test email sent to {', '.join(config.recipients)}")
        return 0
    print(f"test email FAILED ({problem})", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
