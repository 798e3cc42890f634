"""What the trainer's emails say (start, every epoch, a periodic status, completion, failure), and the factory
that gives the trainer its notifier.

    from src.training.run_emails import create_notifier
    notifier = create_notifier(Path("models/theta_enhanced_20260101_230000"))   # a NullNotifier when email is off
    notifier.start(args)
    notifier.epoch(1, entry)                 # the epoch's loss_history.json entry
    notifier.completed(summary)              # or notifier.failed(error, step="train")
    notifier.close()

Each email is made from data the trainer owns: ``start`` from its arguments, ``epoch`` from the epoch's entry in
``loss_history.json`` (losses, perplexity, token accuracy, domains, learning rate, time, and the fields the
techniques add: ``ema``, ``train_kl``, ``contrastive_loss``, ``curriculum_fraction``, ``difficult_ratio``...),
``completed`` from the run summary and the loss history. Sending is ``src/utils/email_notifier.py``'s job; the
overnight chain builds its own start, failure and completion emails (``src/utils/overnight.py``) with the
layouts and GPU sections of this module.

Who sends which email (so nobody gets two of the same): under an overnight script (``THETA_NOTIFY_FROM_SCRIPT=1``)
the trainer's notifier sends only epoch and status emails and the script sends start, failure and completion of
the whole chain; run alone, the trainer sends all of them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Mapping

from src.training.report import LOSS_CURVE, load_history, loss_curve_png
from src.utils import gpu_info
from src.utils.email_notifier import (SUBJECT_PREFIX, Attachment, Email, EmailSender, NullNotifier, Section,
                                      fmt_duration, fmt_number, load_email_config, never_raises, read_tail,
                                      resolve_email_config)

logger = logging.getLogger(__name__)

NOTIFY_FROM_SCRIPT_ENV = "THETA_NOTIFY_FROM_SCRIPT"
LOG_TAIL_LINES = 40
_SECRET_WORDS = ("password", "secret", "token", "api_key")

# Alert thresholds (documented in documentation/EMAIL_NOTIFICATIONS.md). "warning" is amber, "critical" red.
ALERT_THRESHOLDS: dict[str, float] = {
    "perplexity_warning": 50.0,        # validation perplexity above this
    "perplexity_critical": 500.0,
    "token_accuracy_warning": 0.30,    # validation token accuracy below this
    "token_accuracy_critical": 0.10,
    "kl_warning": 0.5,                 # R-Drop's KL divergence between two dropout passes (train_kl) above this
    "kl_critical": 2.0,
    "difficult_ratio_warning": 0.6,    # share of difficult examples the dynamic curriculum sees, above this
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

# The fields every epoch entry has (the trainer's epoch_entry); any other field is a technique's (epoch_fields).
ENTRY_FIELDS = {"epoch", "step", "train_loss", "val_loss", "val_perplexity", "val_token_accuracy", "domains",
                "learning_rate", "seconds", "domain_eval"}


# ---------------------------------------------------------------------------------------------------------------
# The trainer's notifier, and its factory
# ---------------------------------------------------------------------------------------------------------------

def notify_from_script() -> bool:
    """True when an overnight script owns the start/failure/completion emails."""
    return os.environ.get(NOTIFY_FROM_SCRIPT_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def create_notifier(run_dir: Path, args: Any = None) -> "TrainingEmailNotifier | NullNotifier":
    """The trainer's notifier for ``run_dir``; a NullNotifier when email is off (decided in milliseconds, no
    threads), so the trainer calls the same methods either way. Never raises.

    Only rank 0 of a distributed run gets one. Under ``THETA_NOTIFY_FROM_SCRIPT=1`` it sends epoch and status
    emails only (see the module docstring). ``args`` is accepted for symmetry with the trainer; the settings
    reach the notifier through ``start(args)``.
    """
    try:
        if int(os.environ.get("RANK", "0") or 0) != 0:
            return NullNotifier()
        # Under an overnight script the banner already said why email is off; alone, the trainer logs it once.
        config = resolve_email_config()[0] if notify_from_script() else load_email_config()
        if config is None:
            return NullNotifier()
        run_dir = Path(run_dir)
        return TrainingEmailNotifier(EmailSender(config, run_name=run_dir.name), run_dir=run_dir,
                                     log_file=run_dir / "train.log", lifecycle_emails=not notify_from_script())
    except Exception as err:  # email must never stop training
        logger.warning("email notifications off: %s", err)
        return NullNotifier()


class TrainingEmailNotifier:
    """The notifier ``train()`` calls: ``start``, ``epoch``, ``status``, ``completed``, ``failed``, ``close``.

    Each method snapshots its data and hands the sender a function that builds the email, so it returns at once
    and never raises (``never_raises``); a status thread calls ``status()`` every ``EMAIL_STATUS_INTERVAL_MIN``.
    ``lifecycle_emails=False`` keeps start/completion/failure quiet (the overnight script sends those for the
    whole chain) while epoch and status emails still go out. No ``__getattr__``: a misspelt method name is an
    AttributeError, not a silent no-op.
    """

    def __init__(self, sender: EmailSender, run_dir: Path | None = None, log_file: Path | None = None,
                 lifecycle_emails: bool = True, gpu_probe: Callable[[], dict] | None = None):
        self.sender = sender
        self.run_name = sender.run_name
        self.run_dir = Path(run_dir) if run_dir else None
        self.log_file = Path(log_file) if log_file else None
        self.lifecycle_emails = lifecycle_emails
        self.gpu_probe = gpu_probe or (lambda: gpu_info.get_gpu_info())
        self.run_info: dict[str, Any] = {}
        self.history: list[dict] = []
        self.started_at = time.time()
        self._lock = threading.Lock()
        self._status_stop = threading.Event()
        self._status_thread: threading.Thread | None = None

    @property
    def counts(self):
        return self.sender.counts

    def redact(self, text: str) -> str:
        return self.sender.redact(text)

    @never_raises
    def start(self, args: Any = None) -> None:
        """Record the run settings, send the start email and start the periodic status thread."""
        info = vars(args) if hasattr(args, "__dict__") else dict(args or {})
        with self._lock:
            self.run_info = {k: (str(v) if isinstance(v, Path) else v) for k, v in info.items()
                             if not any(w in k.lower() for w in _SECRET_WORDS)}
            self.started_at = time.time()
            info, started = dict(self.run_info), self.started_at
        if self.lifecycle_emails:
            self.sender.send("start", lambda: start_email(self.run_name, info, started, self.gpu_probe()))
        self.start_status_thread()

    @never_raises
    def epoch(self, epoch: int, entry: Mapping[str, Any]) -> None:
        """One email per epoch: progress, ETA, losses, perplexity, accuracy, learning rate, techniques' figures,
        domains, GPU, alerts."""
        entry = json.loads(json.dumps(dict(entry), default=str))  # a snapshot the training loop cannot mutate
        entry.setdefault("epoch", epoch)
        with self._lock:
            previous = list(self.history)
            self.history.append(entry)
        total, lr, started = self._total_epochs(), self._initial_lr(), self.started_at
        self.sender.send("epoch", lambda: epoch_email(self.run_name, entry, previous, total, lr, started,
                                                      self.gpu_probe()))

    @never_raises
    def status(self) -> None:
        """A status email: latest figures, GPU table, CPU and RAM, alerts. The status thread calls it."""
        with self._lock:
            history = list(self.history)
        total, lr, started = self._total_epochs(), self._initial_lr(), self.started_at
        self.sender.send("status", lambda: status_email(self.run_name, history, total, lr, started,
                                                        self.gpu_probe()))

    @never_raises
    def completed(self, summary: Mapping[str, Any]) -> None:
        """The completion email: the summary, the loss history and its curve (attached)."""
        self.stop_status_thread()
        summary = json.loads(json.dumps(dict(summary), default=str))
        with self._lock:
            seen = list(self.history)
        if self.lifecycle_emails:
            # A resumed run saw only its own epochs; loss_history.json holds them all.
            self.sender.send("completed", lambda: completion_email(
                self.run_name, summary, load_history(self.run_dir) or seen, self.log_file), priority=True)

    @never_raises
    def failed(self, error: str, step: str | None = None, log_file: Path | None = None) -> None:
        """The failure email: the step, the error and the last lines of the log."""
        self.stop_status_thread()
        log = Path(log_file) if log_file else self.log_file
        if self.lifecycle_emails:
            self.sender.send("failed", lambda: failure_email(self.run_name, step or "training", str(error), log),
                             priority=True)

    def close(self, timeout: float | None = None) -> bool:
        """Stop the status thread and wait at most ``timeout`` seconds for queued emails (see EmailSender)."""
        self.stop_status_thread()
        return bool(self.sender.close(timeout))

    # --- status thread -----------------------------------------------------------------------------------------
    def start_status_thread(self) -> None:
        interval = self.sender.config.status_interval_min * 60
        if interval <= 0 or self._status_thread is not None:
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

    def _total_epochs(self) -> int | None:
        epochs = self.run_info.get("epochs")
        return epochs if isinstance(epochs, int) and epochs > 0 else None

    def _initial_lr(self) -> float | None:
        lr = self.run_info.get("learning_rate")
        return float(lr) if isinstance(lr, (int, float)) else None


# ---------------------------------------------------------------------------------------------------------------
# The emails
# ---------------------------------------------------------------------------------------------------------------

def start_email(run_name: str, info: Mapping[str, Any], started_at: float, gpu: dict) -> Email:
    """Training started: when, where, the main settings and the techniques on, the GPU."""
    tricks = sorted(k[4:] for k, v in info.items() if k.startswith("use_") and v is True)
    rows = [("started", f"{datetime.fromtimestamp(started_at):%Y-%m-%d %H:%M:%S}"), ("host", socket.gethostname())]
    rows += [(label, fmt_number(info[key], 6) if isinstance(info[key], float) else str(info[key]))
             for label, key in [("profile", "profile"), ("model", "model_name"), ("epochs", "epochs"),
                                ("batch size", "batch_size"), ("accumulation", "gradient_accumulation_steps"),
                                ("learning rate", "learning_rate"), ("schedule", "scheduler_type"),
                                ("data", "data_path"), ("output", "output_dir")] if info.get(key) is not None]
    rows.append(("techniques on", ", ".join(tricks) or "none"))
    sections, alerts = gpu_sections(gpu)
    epochs = f", {info['epochs']} epochs" if info.get("epochs") else ""
    return Email(f"{SUBJECT_PREFIX} started: {run_name} ({info.get('model_name') or 'theta'}{epochs})",
                 f"Training started: {run_name}", alerts, [Section("Run", rows=rows)] + sections)


def epoch_email(run_name: str, entry: dict, previous: list[dict], total: int | None, initial_lr: float | None,
                started_at: float, gpu: dict) -> Email:
    history = previous + [entry]
    epoch = entry.get("epoch")
    alerts = metric_alerts(entry, previous, total, initial_lr)
    prev = previous[-1] if previous else {}

    def delta(key: str) -> str:
        a, b = entry.get(key), prev.get(key)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isfinite(a) and math.isfinite(b):
            return f" ({a - b:+.4f})"
        return ""

    lr = entry.get("learning_rate")
    figures = [("train loss", fmt_number(entry.get("train_loss")) + delta("train_loss")),
               ("validation loss", fmt_number(entry.get("val_loss")) + delta("val_loss")),
               ("perplexity", fmt_number(entry.get("val_perplexity"), 2)),
               ("token accuracy", fmt_number(entry.get("val_token_accuracy"), 3) + delta("val_token_accuracy")),
               ("learning rate", f"{lr:.2e}" if isinstance(lr, float) else fmt_number(lr)),
               ("epoch time", fmt_duration(entry.get("seconds"))), ("step", fmt_number(entry.get("step")))]
    sections = [Section("Progress", rows=progress_rows(run_name, history, total, started_at)),
                Section("Figures", rows=figures)]
    techniques = technique_rows(entry)
    if techniques:
        sections.append(Section("Techniques", rows=techniques))
    domains = entry.get("domains") or {}
    if domains:
        sections.append(Section("Per domain", table=(["domain", "loss", "perplexity", "token accuracy"], [
            [d, fmt_number(v.get("loss")), fmt_number(v.get("perplexity"), 2), fmt_number(v.get("token_accuracy"), 3)]
            for d, v in sorted(domains.items())])))
    gpu_secs, gpu_alerts = gpu_sections(gpu)
    alerts += gpu_alerts
    of = f"/{total}" if total else ""
    val, ppl = fmt_number(entry.get("val_loss")), fmt_number(entry.get("val_perplexity"), 2)
    flag = f" [{len(alerts)} alert{'s' if len(alerts) != 1 else ''}]" if alerts else ""
    return Email(f"{SUBJECT_PREFIX} epoch {epoch}{of}: val loss {val}, perplexity {ppl}{flag} - {run_name}",
                 f"Epoch {epoch}{of}: validation loss {val}", alerts, sections + gpu_secs)


def status_email(run_name: str, history: list[dict], total: int | None, initial_lr: float | None,
                 started_at: float, gpu: dict) -> Email:
    last = history[-1] if history else {}
    gpu_secs, alerts = gpu_sections(gpu)
    sections = [Section("Progress", rows=progress_rows(run_name, history, total, started_at))]
    if last:
        sections.append(Section("Latest epoch", rows=[
            ("validation loss", fmt_number(last.get("val_loss"))),
            ("perplexity", fmt_number(last.get("val_perplexity"), 2)),
            ("token accuracy", fmt_number(last.get("val_token_accuracy"), 3)),
            ("learning rate", fmt_number(last.get("learning_rate"), 6))] + technique_rows(last)))
        alerts = metric_alerts(last, history[:-1], total, initial_lr) + alerts
    best = gpu_info.pick_best_gpu(gpu.get("gpus") or [])
    where = f"GPU {fmt_number(best.get('temperature_c'), 0, ' C')}" if best else "CPU"
    epoch = f"epoch {last.get('epoch')}" + (f"/{total}" if total else "") if last else "before the first epoch"
    return Email(f"{SUBJECT_PREFIX} status: {epoch}, {where} - {run_name}", f"Status: {run_name}", alerts,
                 sections + gpu_secs)


def completion_email(run_name: str, summary: Mapping[str, Any], history: list[dict], log_file: Path | None = None,
                     evaluation_file: Path | None = None, curve_file: Path | None = None,
                     extra_rows: list[tuple[str, str]] = ()) -> Email:
    """Training completed: the summary, the test-set figures when ``evaluation_file`` is given (the overnight
    chain evaluates), the loss history; attached the loss curve (``curve_file``, else drawn from the history
    with the report's plot) and the evaluation file."""
    rows = [(k.replace("_", " "), fmt_duration(summary[k]) if k == "seconds" else fmt_number(summary[k]))
            for k in ("status", "epochs_run", "best_epoch", "best_val_loss", "global_step", "seconds",
                      "final_model") if k in summary]
    if summary.get("training_seconds") is not None:  # measured, beside the pre-flight's estimate
        estimate = summary.get("preflight_estimate_s")
        rows.append(("training time", fmt_duration(summary["training_seconds"]) + (
            f" (pre-flight estimate {fmt_duration(estimate)})" if estimate is not None else
            " (no pre-flight estimate)")))
    sections = [Section("Run", rows=[("run", run_name)] + rows + list(extra_rows))]
    alerts: list[tuple[str, str]] = []
    if summary.get("status") != "completed":
        alerts.append(("warning", f"status: {summary.get('status')}"))
    evaluation, evaluation_text = None, None
    if evaluation_file is not None:
        try:
            evaluation_text = Path(evaluation_file).read_text(encoding="utf-8")
            evaluation = json.loads(evaluation_text)
        except FileNotFoundError:
            alerts.append(("warning", f"no evaluation summary ({Path(evaluation_file).name} not found)"))
        except (OSError, ValueError) as err:
            alerts.append(("warning", f"could not read {Path(evaluation_file).name}: {err}"))
    if isinstance(evaluation, dict):
        if evaluation.get("verdict"):  # the report's opening, in plain words
            sections.insert(0, Section("Verdict", pre="\n".join(evaluation["verdict"])))
        sections += evaluation_sections(evaluation)
    if history:
        sections.append(Section("Loss history", table=(
            ["epoch", "train loss", "val loss", "perplexity", "token accuracy"],
            [[str(h.get("epoch")), fmt_number(h.get("train_loss")), fmt_number(h.get("val_loss")),
              fmt_number(h.get("val_perplexity"), 2), fmt_number(h.get("val_token_accuracy"), 3)] for h in history])))
    if log_file:
        sections.append(Section("Files", rows=[("log", str(log_file))]))
    subject = (f"{SUBJECT_PREFIX} completed: {run_name}, best val loss {fmt_number(summary.get('best_val_loss'))} "
               f"(epoch {summary.get('best_epoch', '?')})")
    if isinstance(evaluation, dict) and isinstance(evaluation.get("perplexity"), (int, float)):
        subject += f", test perplexity {fmt_number(evaluation['perplexity'], 2)}"
    email = Email(subject, f"Training completed: {run_name}", alerts, sections)
    curve = curve_file.read_bytes() if curve_file is not None and curve_file.is_file() else _drawn_curve(history)
    if curve:
        email.attachments.append(Attachment(LOSS_CURVE, curve, "image", "png"))
    if evaluation_text is not None:
        email.attachments.append(Attachment(Path(evaluation_file).name, evaluation_text.encode("utf-8"),
                                            "application", "json", text=True))
    return email


def evaluation_sections(evaluation: Mapping[str, Any]) -> list[Section]:
    """The test-set figures of ``stats/evaluation_<run>.json`` (evaluate_model.py), per domain, three samples."""
    rows = [("records", fmt_number(evaluation.get("test_records"))),
            ("perplexity", fmt_number(evaluation.get("perplexity"), 2)),
            ("token accuracy", fmt_number(evaluation.get("token_accuracy"), 3)),
            ("loss", fmt_number(evaluation.get("loss")))]
    rows += [(label, fmt_number(evaluation[k], 3)) for k, label in (("exact_match", "exact match"), ("f1", "F1"),
                                                                    ("bleu_4", "BLEU-4"), ("rouge_l", "ROUGE-L"))
             if isinstance(evaluation.get(k), (int, float))]
    sections = [Section("Test set (evaluation)", rows=rows)]
    per_domain = evaluation.get("per_domain") or {}
    if per_domain:
        sections.append(Section("Test set per domain", table=(["domain", "perplexity", "token accuracy"], [
            [d, fmt_number(v.get("perplexity"), 2), fmt_number(v.get("token_accuracy"), 3)]
            for d, v in sorted(per_domain.items())])))
    samples = [s for s in (evaluation.get("samples") or []) if isinstance(s, dict)][:3]
    if samples:
        sections.append(Section("Sample answers", pre="\n\n".join(
            f"Q: {s.get('question', '')}\nA: {s.get('generated', '')}\nreference: {s.get('reference', '')}"
            for s in samples)))
    return sections


def failure_email(run_name: str, step: str, error: str, log_file: Path | None = None) -> Email:
    """A step failed: which, when, where, the error, the last lines of the log, and what to do."""
    rows = [("run", run_name), ("step", step), ("when", f"{datetime.now():%Y-%m-%d %H:%M:%S}"),
            ("host", socket.gethostname())]
    if log_file:
        rows.append(("log", str(log_file)))
    rows.append(("what now", "fix the cause, then run the same command again: the run resumes"))
    sections = [Section("Run", rows=rows), Section("Error", pre=error.strip() or "(no message)")]
    tail = read_tail(Path(log_file), LOG_TAIL_LINES) if log_file else ""
    if tail:
        sections.append(Section(f"Last {LOG_TAIL_LINES} lines of the log", pre=tail))
    first = (error.strip().splitlines() or ["unknown error"])[-1][:120]
    return Email(f"{SUBJECT_PREFIX} FAILED: {run_name} at {step}: {first}", f"Training FAILED: {run_name}",
                 [("critical", f"failed at step {step}")], sections)


def _drawn_curve(history: list[dict]) -> bytes | None:
    try:
        return loss_curve_png(history)
    except Exception as err:  # no matplotlib, a broken backend: the email goes without the picture
        logger.debug("loss curve not drawn: %s", err)
        return None


# ---------------------------------------------------------------------------------------------------------------
# Sections and alerts
# ---------------------------------------------------------------------------------------------------------------

def progress_rows(run_name: str, history: list[dict], total: int | None, started_at: float) -> list[tuple[str, str]]:
    done = history[-1].get("epoch", len(history)) if history else 0
    rows = [("run", run_name), ("elapsed", fmt_duration(time.time() - started_at))]
    if total:
        rows.insert(1, ("progress", f"epoch {done}/{total} ({100 * done / total:.0f}%)"))
        secs = [h["seconds"] for h in history if isinstance(h.get("seconds"), (int, float))]
        if secs and done < total:
            left = sum(secs) / len(secs) * (total - done)
            eta = datetime.now() + timedelta(seconds=left)
            rows.append(("ETA", f"{eta:%a %H:%M} (about {fmt_duration(left)} left, if every epoch runs)"))
    return rows


def technique_rows(entry: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The techniques' fields of an epoch entry (EMA, KL, curriculum, ...): every field beyond the standard
    ones, a dict field one row per key ("ema decay")."""
    rows = []
    for key in sorted(set(entry) - ENTRY_FIELDS):
        value = entry[key]
        if isinstance(value, dict):
            rows += [(f"{key} {k}".replace("_", " "), fmt_number(v)) for k, v in sorted(value.items())]
        else:
            rows.append((key.replace("_", " "), fmt_number(value)))
    return rows


def gpu_sections(info: dict) -> tuple[list[Section], list[tuple[str, str]]]:
    """The GPU table (or the CPU-only line), the CPU/RAM rows, and their alerts (``gpu_info.get_gpu_info()``)."""
    alerts: list[tuple[str, str]] = []
    t = ALERT_THRESHOLDS
    sections = []
    gpus = info.get("gpus") or []
    if gpus:
        rows = []
        for g in gpus:
            used, total = g.get("memory_used_mb"), g.get("memory_total_mb")
            rows.append([str(g.get("index")), str(g.get("name")), fmt_number(g.get("temperature_c"), 0, " C"),
                         f"{fmt_number(used, 0)} / {fmt_number(total, 0)} MiB",
                         fmt_number(g.get("utilization_pct"), 0, "%"),
                         f"{fmt_number(g.get('power_w'), 0)} / {fmt_number(g.get('power_limit_w'), 0)} W"])
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
        ("CPU", f"{fmt_number(system.get('cpu_percent'), 0, '%')} of {fmt_number(system.get('cpu_count'))} cores"),
        ("RAM", f"{fmt_number(ram_used and ram_used / 1024, 1)} / {fmt_number(ram_total and ram_total / 1024, 1)} GB "
                f"({fmt_number(system.get('ram_percent'), 0, '%')})")]))
    if system.get("ram_percent") is not None and system["ram_percent"] / 100 >= t["ram_warning"]:
        alerts.append(("warning", f"system RAM {system['ram_percent']:.0f}% used"))
    return sections, alerts


def metric_alerts(entry: Mapping[str, Any], history: list[Mapping[str, Any]], total_epochs: int | None,
                  initial_lr: float | None) -> list[tuple[str, str]]:
    """Alerts for one epoch entry (see ALERT_THRESHOLDS); ``history`` holds the epochs before it."""
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
    kl = entry.get("train_kl")  # R-Drop's (RDropTechnique.epoch_fields)
    if isinstance(kl, (int, float)):
        if kl > t["kl_critical"]:
            alerts.append(("critical", f"R-Drop KL divergence {kl:.3f} > {t['kl_critical']:g}"))
        elif kl > t["kl_warning"]:
            alerts.append(("warning", f"R-Drop KL divergence {kl:.3f} > {t['kl_warning']:g}"))
    ratio = entry.get("difficult_ratio")  # the dynamic curriculum's (DynamicCurriculumTechnique.epoch_fields)
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
