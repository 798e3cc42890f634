"""The morning report: matplotlib plots and one self-contained HTML page for an evaluated run.

``evaluate_model.py`` calls :func:`write_report` as part of its normal run; it can also rebuild a report from a
results file that is already there:

    python -m src.training.report --results stats/evaluation_<run>.json --run_dir models/<run>

Files in ``stats/<run>/`` (each plot only when its data exists):
- ``loss_curve.png``      train and validation loss per epoch (``loss_history.json``); the completion email
                          attaches this file, so its name is a contract (without it, the same plot drawn in
                          memory by :func:`loss_curve_png`)
- ``learning_rate.png``   learning rate per optimizer step (``metrics.jsonl``)
- ``token_accuracy.png``  validation token accuracy per epoch, with the test-set value as a line
- ``domains.png``         test metrics per domain
- ``baseline_deltas.png`` model minus baseline, per metric (only with ``--baseline_model``)
- ``report.html``         every table and plot; images are embedded as base64 data URIs and every piece of dataset
                          text is HTML-escaped, so the one file can be mailed or opened anywhere. It opens with the
                          verdict in plain words (:func:`verdict`: what was trained on what, for how long, the
                          held-out perplexity against the untrained base, and for the quick profile what the run is
                          for), then the data summary (the prepared data's enhanced_data_stats.json) and the run's
                          settings (training_config.json)

Honest by construction: every figure is shown next to what it was computed on (records evaluated, skipped and
truncated, the answer tokens perplexity covers, answers generated); numbers are in fixed notation; dataset text
in plot labels is drawn as plain text (never parsed as matplotlib maths, so a "$" cannot break a plot); files get
the user's umask like any other file they create.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `src` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from src.utils.common import FlagParser, UserError, atomic_write_text, read_json, run_entry_point, setup_logging

logger = logging.getLogger(__name__)

LOSS_CURVE = "loss_curve.png"
METRIC_LABELS = {"perplexity": "perplexity", "loss": "loss", "token_accuracy": "token accuracy",
                 "exact_match": "exact match", "f1": "token F1", "bleu_1": "BLEU-1", "bleu_2": "BLEU-2",
                 "bleu_3": "BLEU-3", "bleu_4": "BLEU-4", "rouge_l": "ROUGE-L"}
# Scores in [0, 1], higher is better: plotted together per domain and in the delta chart.
SCORES = ("token_accuracy", "exact_match", "f1", "bleu_4", "rouge_l")


# ---------------------------------------------------------------------------------------------------------------
# Run-folder data
# ---------------------------------------------------------------------------------------------------------------

def load_history(run_dir: Path | None) -> list[dict]:
    """``loss_history.json`` of the run (a list of per-epoch entries), or [] when there is none."""
    path = run_dir / "loss_history.json" if run_dir else None
    if path is None or not path.is_file():
        return []
    try:
        data = read_json(path, "loss history")
    except UserError as err:
        logger.warning("%s; no loss plots", err)
        return []
    return [e for e in data if isinstance(e, dict) and "epoch" in e] if isinstance(data, list) else []


def load_step_metrics(run_dir: Path | None) -> list[dict]:
    """Lines of ``metrics.jsonl``; a half-written last line (the run was killed mid-write) is skipped."""
    path = run_dir / "metrics.jsonl" if run_dir else None
    if path is None or not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row and "lr" in row:
            rows.append(row)
    return rows


def _read_dict(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def recorded_path(path_text: str | None) -> Path | None:
    """A path a run recorded (e.g. training_config.json's ``args.data_path``), where it exists now: as it is when
    absolute, else relative to the current folder or to the project root (where the overnight scripts run)."""
    if not path_text:
        return None
    path = Path(path_text)
    from src.utils.common import PROJECT_ROOT
    for candidate in ([path] if path.is_absolute() else [Path.cwd() / path, PROJECT_ROOT / path]):
        if candidate.exists():
            return candidate
    return None


def load_run_facts(run_dir: Path | None) -> dict:
    """What the report says about the run besides the test figures: ``config`` (training_config.json: the
    resolved flags, the device, the final summary) and ``data`` (the prepared data's stats file,
    enhanced_data_stats.json next to the prepared file the run trained on: records read, kept, dropped by reason,
    domains). Missing files give empty dicts."""
    from src.utils.data_layout import STATS_NAME
    config = _read_dict(run_dir / "training_config.json") if run_dir else {}
    data_path = recorded_path((config.get("args") or {}).get("data_path"))
    data = _read_dict(data_path.parent / STATS_NAME) if data_path else {}
    return {"config": config, "data": data}


def _duration(seconds: float | None) -> str:
    if seconds is None or not _finite(seconds):
        return "an unknown time"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h} h {rem // 60:02d} min" if h else (f"{rem // 60} min {rem % 60:02d} s" if rem >= 60 else f"{rem} s")


def _perplexity_words(model: float, base: float) -> str:
    """How a perplexity compares with the base's, in words (lower is better)."""
    if not (_finite(model) and _finite(base)) or base <= 0 or model <= 0:
        return "not comparable"
    factor = max(model, base) / min(model, base)
    if factor < 1.05:
        return "about the same: training changed little"
    return f"{fixed(factor, 2)} times {'lower (better)' if model < base else 'higher (worse)'}"


def verdict(result: dict, facts: dict) -> list[str]:
    """The report's opening, in plain words: what was trained on what, for how long, the held-out figures against
    the untrained base, and (quick profile) what the run is for. One sentence per item, plain text."""
    config, data = facts.get("config") or {}, facts.get("data") or {}
    args, summary, env = config.get("args") or {}, config.get("summary") or {}, config.get("environment") or {}
    profile = args.get("profile")
    domains = sorted((data.get("per_domain") or {}).keys())
    lines = []
    what = f"{args.get('model_name', 'The model')} was fine-tuned" + (f" with the {profile} profile" if profile
                                                                       else "")
    if data:
        what += (f" on {_fmt(data.get('train_records'))} training records ({_fmt(data.get('validation_records'))} "
                 f"held for validation) in {_plural(len(domains), 'domain')}"
                 + (f" ({', '.join(domains[:8])}{', ...' if len(domains) > 8 else ''})" if domains else ""))
    lines.append(what + ".")
    sources = (data.get("data") or {}).get("sources", "").removeprefix("data: ").rstrip(".")
    if sources:  # where the records came from: the user's files, or the sample and why
        lines.append(sources[0].upper() + sources[1:] + ".")
    if summary:
        took = summary.get("training_seconds", summary.get("seconds"))
        estimate = summary.get("preflight_estimate_s")
        lines.append(f"Training ran {_plural(summary.get('epochs_run'), 'epoch')} "
                     f"({_plural(summary.get('global_step'), 'optimizer step')}) "
                     f"in {_duration(took)} on {env.get('device', 'an unknown device')}"
                     + (f" (the pre-flight estimated {_duration(estimate)})" if estimate is not None else "")
                     + f"; status {summary.get('status', 'unknown')}.")
    base = result.get("base") or {}
    n = result.get("test_records")
    if base.get("perplexity") is not None and base.get("same_tokenizer", True):
        lines.append(f"On the {_plural(n, 'held-out record')}, its perplexity is {fixed(result.get('perplexity'), 2)} "
                     f"against {fixed(base['perplexity'], 2)} for the untrained {base.get('model')}: "
                     f"{_perplexity_words(result.get('perplexity'), base['perplexity'])}; token accuracy "
                     f"{fixed(result.get('token_accuracy'), 3)} against {fixed(base.get('token_accuracy'), 3)}. "
                     f"Its generated answers reach token F1 {fixed(result.get('f1'), 3)} against the references.")
    else:
        why = (base.get("error") and f"the untrained {base.get('model')} could not be evaluated") or (
            base and "the untrained base has another tokenizer") or "no untrained base was evaluated"
        lines.append(f"On the {_plural(n, 'held-out record')}, its perplexity is {fixed(result.get('perplexity'), 2)} "
                     f"and token F1 {fixed(result.get('f1'), 3)} ({why}, so there is nothing to compare with).")
    if profile == "quick":
        lines.append("The quick profile demonstrates the pipeline end to end: a tiny model (theta-tiny, about 3.6M "
                     "parameters) trained from scratch for minutes. Its answers are not expected to be useful, "
                     "whatever the figures above; for a useful assistant run the rtx3060 profile (gpt2-medium) on a "
                     "GPU overnight.")
    return lines


def data_summary_rows(data: dict) -> list[tuple[str, str]]:
    """The prepared data in a few rows: records read, kept, dropped by reason, set aside, domains, problems."""
    if not data:
        return []
    dropped = {reason: (v.get("count") if isinstance(v, dict) else v) for reason, v in
               (data.get("dropped") or {}).items()}
    per_domain = data.get("per_domain") or {}
    rows = [("read from", (data.get("data") or {}).get("sources", "").removeprefix("data: ") or "–"),
            ("records read", _fmt(data.get("input_records"))),
            ("records kept", f"{_fmt(data.get('real_records'))} real"
                             + (f" + {_fmt(data.get('synthetic_records'))} synthetic" if data.get("synthetic_records")
                                else "")
                             + f": {_fmt(data.get('train_records'))} train, {_fmt(data.get('validation_records'))} "
                               f"validation; {_fmt(data.get('test_records'))} in the held-out set"),
            ("dropped", f"{_fmt(data.get('dropped_total', sum(v or 0 for v in dropped.values())))}"
                        + (": " + ", ".join(f"{r} {_fmt(n)}" for r, n in
                                            sorted(dropped.items(), key=lambda rn: -(rn[1] or 0))) if dropped else ""))]
    if data.get("set_aside"):
        rows.append(("set aside", ", ".join(f"{r} {_fmt(n)}" for r, n in data["set_aside"].items())))
    rows.append(("domains", ", ".join(f"{d} {_fmt(v.get('real'))}" for d, v in sorted(per_domain.items()))
                 or "–"))
    problems = data.get("problems") or []
    if problems:
        rows.append(("problems", "; ".join(f"{p.get('file') or 'the data folder'}: {p.get('message')}"
                                           for p in problems[:6]) + (" ..." if len(problems) > 6 else "")))
    return rows


SETTINGS_SHOWN = ("profile", "model_name", "epochs", "batch_size", "gradient_accumulation_steps", "learning_rate",
                  "scheduler_type", "warmup_proportion", "weight_decay", "max_length", "seed", "loss_on")


def settings_rows(config: dict) -> list[tuple[str, str]]:
    """The run's main settings and the techniques that were on (training_config.json's resolved flags)."""
    args = config.get("args") or {}
    if not args:
        return []
    rows = [(k, _fmt(args[k])) for k in SETTINGS_SHOWN if k in args]
    on = sorted(k.removeprefix("use_") for k, v in args.items() if k.startswith("use_") and v is True)
    rows.append(("techniques on", ", ".join(on) or "none"))
    env = config.get("environment") or {}
    if env.get("device"):
        rows.append(("device", f"{env['device']} ({env.get('precision', '?')}, {env.get('world_size', 1)} "
                               "process(es))"))
    return rows


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def fixed(value: float, digits: int = 4) -> str:
    """``value`` in fixed notation with about ``digits`` significant digits and never an exponent:
    3,350 / 86.04 / 0.4123 / 0.0000 (a BLEU of 1.981e-07 is effectively 0, and reads so). NaN and inf spelt out."""
    if not math.isfinite(value):
        return str(value)
    whole = len(str(int(abs(value)))) if abs(value) >= 1 else 0
    text = f"{value:,.{max(0, digits - whole)}f}"
    return text.lstrip("-") if set(text) <= set("-0.,") else text  # no "-0.0000"


# ---------------------------------------------------------------------------------------------------------------
# Plots (each returns the file it wrote, or None when it had no data)
# ---------------------------------------------------------------------------------------------------------------

def _pyplot():
    """matplotlib's pyplot on the Agg backend (no display on servers and in CI), imported on first use: the
    metrics side of evaluation (fixed, coverage) needs no plotting library."""
    import matplotlib

    matplotlib.use("Agg")  # must come before pyplot
    import matplotlib.pyplot as plt

    return plt


def _integer_ticks(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))

# Labels hold dataset text (domain names): "cost $\\frac$" must be drawn as typed, not parsed as maths (which
# raises on it). Applied around every plot, not globally, so other matplotlib users in the process are unaffected.
PLAIN_TEXT = {"text.parse_math": False, "text.usetex": False}


def _save(fig, path: Path) -> Path:
    """Write the PNG through a temporary name, so a reader (the email) never attaches half a file."""
    plt = _pyplot()
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    tmp.replace(path)  # savefig's plain open() already honours the umask
    return path


def plot_loss_curve(history: list[dict], out_dir: Path) -> Path | None:
    fig = _loss_figure(history)
    return _save(fig, out_dir / LOSS_CURVE) if fig is not None else None


def loss_curve_png(history: list[dict]) -> bytes | None:
    """The loss-curve plot as PNG bytes, drawn in memory (the completion email attaches it when the report has
    no file yet); None without a finite loss to draw."""
    if not any(_finite(e.get(k)) for e in history for k in ("train_loss", "val_loss")):
        return None
    import io

    fig = _loss_figure(history)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, dpi=110, format="png")
    finally:
        _pyplot().close(fig)
    return buf.getvalue()


def _loss_figure(history: list[dict]):
    """Train and validation loss per epoch, the best epoch marked; None for an empty history."""
    plt = _pyplot()
    if not history:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    epochs = [e["epoch"] for e in history]
    for key, label, style in (("train_loss", "train", "o-"), ("val_loss", "validation", "s-")):
        pts = [(x, e[key]) for x, e in zip(epochs, history) if _finite(e.get(key))]
        if pts:
            ax.plot(*zip(*pts), style, label=label)
    best = min((e for e in history if _finite(e.get("val_loss"))), key=lambda e: e["val_loss"], default=None)
    if best:
        ax.axvline(best["epoch"], color="grey", ls=":", label=f"best epoch {best['epoch']}")
    ax.set(xlabel="epoch", ylabel="loss (answer tokens)", title="Train and validation loss")
    _integer_ticks(ax.xaxis)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_learning_rate(steps: list[dict], out_dir: Path) -> Path | None:
    plt = _pyplot()
    pts = [(r["step"], r["lr"]) for r in steps if _finite(r.get("lr"))]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.5), layout="constrained")
    ax.plot(*zip(*pts), "-")
    ax.set(xlabel="optimizer step", ylabel="learning rate", title="Learning rate schedule")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.grid(alpha=0.3)
    return _save(fig, out_dir / "learning_rate.png")


def plot_token_accuracy(history: list[dict], test_accuracy: float | None, out_dir: Path) -> Path | None:
    plt = _pyplot()
    pts = [(e["epoch"], e["val_token_accuracy"]) for e in history if _finite(e.get("val_token_accuracy"))]
    if not pts and not _finite(test_accuracy):
        return None
    fig, ax = plt.subplots(figsize=(7, 3.5), layout="constrained")
    if pts:
        ax.plot(*zip(*pts), "o-", label="validation")
    if _finite(test_accuracy):
        ax.axhline(test_accuracy, color="C3", ls="--", label=f"test set {test_accuracy:.3f}")
    ax.set(xlabel="epoch", ylabel="token accuracy", title="Next-token accuracy on answer tokens")
    _integer_ticks(ax.xaxis)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out_dir / "token_accuracy.png")


def plot_domains(per_domain: dict, out_dir: Path) -> Path | None:
    plt = _pyplot()
    if not per_domain:
        return None
    names = sorted(per_domain)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained",
                                   gridspec_kw={"width_ratios": [3, 1.3]})
    width = 0.8 / len(SCORES)
    for k, key in enumerate(SCORES):
        ax1.bar([i + k * width for i in range(len(names))], [per_domain[d].get(key, 0.0) for d in names],
                width, label=METRIC_LABELS[key])
    ax1.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=20, ha="right")
    ax1.set(ylim=(0, 1), ylabel="score (higher is better)", title="Test metrics per domain")
    ax1.legend(fontsize=8, ncols=3)
    ax2.barh(names, [per_domain[d].get("perplexity", float("nan")) for d in names], color="C4")
    ax2.set(xlabel="perplexity (lower is better)", title="Perplexity")
    ax2.invert_yaxis()
    return _save(fig, out_dir / "domains.png")


def plot_deltas(deltas: dict, out_dir: Path) -> Path | None:
    plt = _pyplot()
    keys = [k for k in SCORES if _finite(deltas.get(k))]
    if not keys:
        return None
    values = [deltas[k] for k in keys]
    fig, ax = plt.subplots(figsize=(7, 3.5), layout="constrained")
    ax.bar([METRIC_LABELS[k] for k in keys], values, color=["C2" if v >= 0 else "C3" for v in values])
    ax.axhline(0, color="black", lw=0.8)
    ax.set(ylabel="model - baseline", title="Change against the baseline (above 0 = better)")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, out_dir / "baseline_deltas.png")


# ---------------------------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------------------------

def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _esc(value)
    if isinstance(value, int):
        return f"{value:,}"
    return fixed(value, digits)


def _plural(n, word: str) -> str:
    return f"{_fmt(n)} {word}{'' if n == 1 else 's'}"


def coverage(r: dict) -> tuple[str, str, str]:
    """What the figures were computed on: ``(teacher-forced, generated, warning)``, plain text.

    Teacher-forced figures (perplexity, loss, token accuracy) cover the answer tokens of the records that fit
    ``max_length``: a truncated record counts only the answer tokens before the cut, a skipped one (its prompt
    alone fills max_length) none. The same model reads a very different perplexity at another max_length, so
    the warning says so whenever anything was cut.
    """
    total = r.get("test_records")
    evaluated, truncated, skipped = r.get("evaluated_records"), r.get("truncated"), r.get("skipped")
    tokens, full = r.get("answer_tokens"), r.get("answer_tokens_full")
    forced = []
    if tokens is not None:
        share = f" of {_fmt(full)} ({fixed(100 * tokens / full, 3)}%)" if full else ""
        forced.append(f"{_plural(tokens, 'answer token')}{share}")
    forced.append(f"{_fmt(evaluated)} of {_plural(total, 'record')}" if evaluated is not None
                  else _plural(total, "record"))
    cut = [f"{_fmt(n)} {what}" for n, what in ((truncated, "truncated"), (skipped, "skipped")) if n is not None]
    if cut:
        at = f" at max_length {_fmt(r['max_length'])}" if r.get("max_length") else ""
        forced[-1] += f" ({', '.join(cut)}{at})"
    too_long = (r.get("generation_timing") or {}).get("prompts_too_long")
    generated = _plural(r.get("generated_answers", total), "generated answer")
    if too_long:
        generated += f" ({_fmt(too_long)} prompt{'' if too_long == 1 else 's'} too long for the model: scored 0)"
    warning = ""
    if truncated or skipped:
        warning = (f"Perplexity, loss and token accuracy leave out what max_length cut ({_fmt(truncated or 0)} "
                   f"truncated, {_fmt(skipped or 0)} skipped): compare them only with evaluations at the same "
                   "max_length.")
    return ", ".join(forced), generated, warning


def _table(header: list[str], rows: list[list], cls: str = "", caption: str = "") -> str:
    """A table; ``rows`` hold ready HTML, ``header`` and ``caption`` plain text (escaped here)."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    cap = f"<caption>{_esc(caption)}</caption>" if caption else ""
    return f'<table class="{cls}">{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _img(path: Path | None, alt: str) -> str:
    if path is None:
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{_esc(alt)}" src="data:image/png;base64,{data}">'
            f'<figcaption>{_esc(alt)}</figcaption></figure>')


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;color:#222;
padding:0 1em}h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}th,td{border:1px solid #ccc;padding:.3em .6em;
vertical-align:top;text-align:left;overflow-wrap:anywhere;word-break:break-word}th{background:#f3f3f3}
td.num{text-align:right}table.samples{table-layout:fixed;width:100%}table.samples th:first-child{width:8em}
table.samples th:nth-last-child(-n+2){width:5em}table.samples td{white-space:pre-wrap}
caption{caption-side:top;text-align:left;color:#444;padding:.2em 0}table.metrics{min-width:46em}figure{margin:1em 0}img{max-width:100%;
border:1px solid #eee}figcaption{color:#666;font-size:.85em}.note{color:#8a5a00}.pos{color:#1a7f37}
.neg{color:#b42318}"""


def render_html(result: dict, images: dict[str, Path | None], run_dir: Path | None) -> str:
    """The report page; every value from the results or the dataset is escaped. It opens with the verdict in
    plain words, then the data summary and the run's settings, then the figures."""
    r = result
    facts = load_run_facts(run_dir)
    parts = [f"<h1>Theta evaluation: {_esc(r.get('run', ''))}</h1>",
             '<h2>Verdict</h2>\n<div class="verdict">' + "".join(f"<p>{_esc(line)}</p>" for line in verdict(r, facts))
             + "</div>"]
    data_rows = data_summary_rows(facts["data"])
    if data_rows:
        parts += ["<h2>Data</h2>", _table(["", ""], [[_esc(k), _esc(v)] for k, v in data_rows], "settings",
                                          caption="The prepared data the run trained on (enhanced_data_stats.json)")]
    run_rows = settings_rows(facts["config"])
    if run_rows:
        parts += ["<h2>Settings</h2>", _table(["flag", "value"], [[_esc(k), _esc(v)] for k, v in run_rows], "settings",
                                              caption="The run's resolved flags (training_config.json)")]
    parts.append(f"<p>Model <code>{_esc(r.get('model_path'))}</code> on <code>{_esc(r.get('test_data'))}</code> "
                 f"({_fmt(r.get('test_records'))} records) on {_esc(r.get('device'))}"
                 f"{', ' + _esc(r['created']) if r.get('created') else ''}.</p>")
    leak = r.get("leakage_check", {})
    parts.append('<p class="note">The test set was checked against the training data: no shared question.</p>'
                 if leak.get("checked") else
                 '<p class="note">The test set could not be checked against the training data (the run folder '
                 'does not name it).</p>')

    # headline metrics, with the baseline beside them when there is one, each table captioned with what its
    # figures were computed on
    forced, generated, warning = coverage(r)
    base = r.get("baseline")
    header = ["metric", "model"] + (["baseline", "delta"] if base else [])

    def metric_rows(keys: tuple[str, ...]) -> list[list[str]]:
        rows = []
        for k in keys:
            row = [_esc(METRIC_LABELS[k]), f'<span class="num">{_fmt(r.get(k))}</span>']
            if base:
                d = r["deltas"].get(k)
                better = d is not None and ((d < 0) if k in ("perplexity", "loss") else (d > 0))
                row += [_fmt(base.get(k)), f'<span class="{"pos" if better else "neg"}">{_fmt(d)}</span>'
                        if _finite(d) and d != 0 else _fmt(d)]
            rows.append(row)
        return rows

    parts += ["<h2>Test-set metrics</h2>",
              f'<p class="note">{_esc(warning)}</p>' if warning else "",
              _table(header, metric_rows(("perplexity", "loss", "token_accuracy")), "metrics",
                     caption=f"Teacher-forced, on {forced}"),
              _table(header, metric_rows(("exact_match", "f1", "bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l")),
                     "metrics", caption=f"Generated answers, on {generated}")]
    if base and base.get("note"):
        parts.append(f'<p class="note">{_esc(base["note"])}</p>')

    # per domain
    dom = r.get("per_domain", {})
    if dom:
        dkeys = ["perplexity", "token_accuracy", "exact_match", "f1", "bleu_4", "rouge_l"]
        rows = [[_esc(d)] + [_fmt(m.get(k)) for k in dkeys] + [_fmt(m.get("records"))] for d, m in sorted(dom.items())]
        parts += ["<h2>Per domain</h2>",
                  _table(["domain"] + [METRIC_LABELS[k] for k in dkeys] + ["records"], rows, "domains")]
        parts.append(_img(images.get("domains"), "Test metrics per domain"))
    if base and r.get("per_domain_deltas"):
        dkeys = ["perplexity", "token_accuracy", "f1", "rouge_l"]
        rows = [[_esc(d)] + [_fmt(m.get(k)) for k in dkeys] for d, m in sorted(r["per_domain_deltas"].items())]
        parts += ["<h2>Change against the baseline</h2>",
                  f"<p>Baseline <code>{_esc(base.get('model'))}</code>, same test set and generation settings.</p>",
                  _table(["domain"] + [f"Δ {METRIC_LABELS[k]}" for k in dkeys], rows, "deltas"),
                  _img(images.get("deltas"), "Model minus baseline per metric")]

    # training curves
    parts.append("<h2>Training</h2>")
    curves = [_img(images.get("loss"), "Train and validation loss per epoch"),
              _img(images.get("lr"), "Learning rate per optimizer step"),
              _img(images.get("accuracy"), "Token accuracy per epoch")]
    parts += [c for c in curves if c] or [f"<p>No training history found in {_esc(run_dir)}.</p>"]

    # generation settings and samples
    gen = dict(r.get("generation", {}))
    if gen.get("decoding") == "greedy":  # greedy decoding samples nothing: its sampling knobs played no part
        for knob in ("temperature", "top_p", "top_k"):
            gen.pop(knob, None)
    timing = r.get("generation_timing", {})
    parts += ["<h2>Generation</h2>",
              _table(["setting", "value"], [[_esc(k), _fmt(v)] for k, v in gen.items()] +
                     [["answers generated", _fmt(r.get("generated_answers", r.get("records")))],
                      ["new tokens", _fmt(timing.get("new_tokens"))],
                      ["tokens per second", _fmt(timing.get("tokens_per_sec"), 3)]], "settings")]
    samples = r.get("samples", [])
    if samples:
        with_base = any("baseline_generated" in s for s in samples)
        header = ["domain", "question", "reference", "generated"] + (["baseline"] if with_base else []) + \
            ["F1", "ROUGE-L"]
        rows = [[_esc(s.get("domain")), _esc(s.get("question")), _esc(s.get("reference")), _esc(s.get("generated"))]
                + ([_esc(s.get("baseline_generated", ""))] if with_base else [])
                + [_fmt(s.get("f1"), 3), _fmt(s.get("rouge_l"), 3)] for s in samples]
        parts += ["<h2>Examples</h2>", _table(header, rows, "samples")]
    body = "\n".join(p for p in parts if p)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>Theta evaluation {_esc(r.get('run', ''))}</title><style>{_CSS}</style></head>\n"
            f"<body>\n{body}\n</body></html>\n")


def write_report(result: dict, run_dir: Path | None, out_dir: Path) -> Path:
    """Write the plots and ``report.html`` into ``out_dir`` (``stats/<run>/``); returns the HTML path."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    history, steps = load_history(run_dir), load_step_metrics(run_dir)
    if not history:
        logger.warning("no loss_history.json in %s: the report has no loss curve", run_dir)
    with plt.rc_context(PLAIN_TEXT):
        images = {"loss": plot_loss_curve(history, out_dir), "lr": plot_learning_rate(steps, out_dir),
                  "accuracy": plot_token_accuracy(history, result.get("token_accuracy"), out_dir),
                  "domains": plot_domains(result.get("per_domain", {}), out_dir),
                  "deltas": plot_deltas(result.get("deltas", {}), out_dir) if result.get("deltas") else None}
    path = atomic_write_text(out_dir / "report.html", render_html(result, images, run_dir))
    logger.info("report: %s (%s)", path, ", ".join(p.name for p in images.values() if p))
    return path


def main(argv: list[str] | None = None) -> int:
    p = FlagParser(description="Rebuild the HTML report and plots from an evaluation results file.")
    p.add_argument("--results", type=Path, required=True, help="stats/evaluation_<run>.json")
    p.add_argument("--run_dir", type=Path, default=None, help="models/<run> (loss history and step metrics)")
    p.add_argument("--output_dir", type=Path, default=None, help="default: stats/<run>/ next to the results file")
    args = p.parse_args(argv)
    setup_logging()
    result = read_json(args.results, "results file (--results)")
    if not isinstance(result, dict) or "run" not in result:
        raise UserError(f"--results {args.results} is not an evaluate_model.py results file")
    write_report(result, args.run_dir, args.output_dir or args.results.parent / result["run"])
    return 0


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
