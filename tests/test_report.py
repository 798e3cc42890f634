"""report.py: plots from the run folder, a self-contained escaped page that says what every figure was computed on,
fixed-notation numbers, dataset text never parsed as maths, the user's umask, and a real render in headless
Chromium whose text and layout are checked.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_report.py -q
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from src.training.report import coverage, fixed, write_report

RUN = "theta_enhanced_20260101_000000"


def _result(with_baseline: bool = True) -> dict:
    per_domain = {d: {"perplexity": p, "loss": 1.0, "token_accuracy": 0.3, "exact_match": 0.0, "f1": 0.4,
                      "bleu_1": 0.3, "bleu_2": 0.2, "bleu_3": 0.1, "bleu_4": 0.05, "rouge_l": 0.35, "records": 4}
                  for d, p in (("networking", 12.0), ("programming", 20.0))}
    r = {"run": RUN, "model_path": f"models/{RUN}/theta_final", "test_data": "Datasets/test_set.json",
         "test_records": 8, "device": "cpu", "perplexity": 15.0, "loss": 2.7, "token_accuracy": 0.3,
         "exact_match": 0.0, "f1": 0.4, "bleu_1": 0.3, "bleu_2": 0.2, "bleu_3": 0.1, "bleu_4": 0.05, "rouge_l": 0.35,
         "records": 8, "per_domain": per_domain, "generation": {"decoding": "greedy", "seed": 42},
         "generation_timing": {"new_tokens": 100, "tokens_per_sec": 50.0}, "leakage_check": {"checked": True},
         "samples": [{"domain": "networking", "question": "Is <img src=x onerror=alert(1)> safe?",
                      "reference": "No & never.", "generated": "</td></table>", "f1": 0.0, "rouge_l": 0.0}]}
    if with_baseline:
        r["baseline"] = {"model": "theta-tiny", "perplexity": 30.0, "token_accuracy": 0.1, "f1": 0.1}
        r["deltas"] = {"perplexity": -15.0, "loss": -0.7, "token_accuracy": 0.2, "exact_match": 0.0, "f1": 0.3,
                       "bleu_1": 0.1, "bleu_2": 0.1, "bleu_3": 0.05, "bleu_4": 0.02, "rouge_l": -0.05}
        r["per_domain_deltas"] = {"networking": {"perplexity": -10.0, "token_accuracy": 0.1, "f1": 0.2,
                                                 "rouge_l": 0.1}}
    return r


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "models" / RUN
    run.mkdir(parents=True)
    history = [{"epoch": e, "step": 5 * e, "train_loss": 4.0 / e, "val_loss": 4.2 / e, "val_perplexity": 50.0 / e,
                "val_token_accuracy": 0.1 * e, "domains": {}, "learning_rate": 1e-3, "seconds": 2.0}
               for e in (1, 2, 3, 4)]
    (run / "loss_history.json").write_text(json.dumps(history))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "epoch": 1, "loss": 3.0, "lr": 1e-4 * s,
                                                           "grad_norm": 1.0, "tokens_per_sec": 1.0, "ms": 1.0,
                                                           "skipped": False}) + "\n" for s in range(1, 21)))
    return run


def test_report_is_self_contained_and_escaped(tmp_path, run_dir):
    page_path = write_report(_result(), run_dir, tmp_path / "stats" / RUN)
    assert page_path == tmp_path / "stats" / RUN / "report.html"
    for name in ("loss_curve.png", "learning_rate.png", "token_accuracy.png", "domains.png", "baseline_deltas.png"):
        assert (page_path.parent / name).read_bytes()[:4] == b"\x89PNG", name
    page = page_path.read_text()
    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) == 5 and all(s.startswith("data:image/png;base64,") for s in srcs)  # nothing external
    assert "<script" not in page
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "&lt;/td&gt;&lt;/table&gt;" in page and "No &amp; never." in page
    assert page.count("<table") == 6  # teacher-forced, generated, domains, deltas, settings, samples


def test_report_without_history_or_baseline(tmp_path):
    page_path = write_report(_result(with_baseline=False), None, tmp_path / RUN)
    names = sorted(p.name for p in page_path.parent.iterdir())
    # no loss history: no loss or learning-rate plot (never an empty one); test accuracy and domains still drawn
    assert names == ["domains.png", "report.html", "token_accuracy.png"]
    assert "No training history found" not in page_path.read_text()  # the token-accuracy plot is there


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path, run_dir):
    page_path = write_report(_result(), run_dir, tmp_path / "stats" / RUN)
    # A copy with a probe script: once everything has loaded it writes what the browser rendered into the title,
    # which --dump-dom prints. (The report itself carries no script.)
    probe = tmp_path / "probe.html"
    probe.write_text(page_path.read_text().replace("</body>", """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  document.title = "PROBE " + JSON.stringify({
    images: imgs.length, decoded: imgs.filter(i => i.complete && i.naturalWidth > 100).length,
    tables: document.querySelectorAll("table").length,
    rows: document.querySelectorAll("tbody tr").length,
    tallest: Math.max(...imgs.map(i => i.getBoundingClientRect().height))});
});
</script></body>"""))
    base = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
            "--virtual-time-budget=5000", "--window-size=1200,2400"]
    dom = subprocess.run(base + [f"--user-data-dir={tmp_path / 'profile1'}", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=90)
    found = re.search(r"<title>PROBE (\{.*?\})</title>", dom.stdout)
    assert found, dom.stdout[-2000:] + dom.stderr[-2000:]
    seen = json.loads(found.group(1).replace("&quot;", '"'))
    assert seen["images"] == 5 and seen["decoded"] == 5, seen  # every embedded PNG decoded
    assert seen["tables"] == 6 and seen["rows"] >= 10 and seen["tallest"] > 100, seen

    shot = tmp_path / "shot.png"
    subprocess.run(base + [f"--user-data-dir={tmp_path / 'profile2'}", f"--screenshot={shot}", page_path.as_uri()],
                   capture_output=True, text=True, timeout=90)
    assert shot.is_file() and shot.stat().st_size > 20_000
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)  # (H, W, C) floats
    assert pixels.shape[0] == 2400 and pixels.std() > 0.05  # not a blank page


# ---------------------------------------------------------------------------------------------------------------
# Issue 14, item 5: an honest report
# ---------------------------------------------------------------------------------------------------------------

def _honest_result() -> dict:
    """13 records at max_length 64: 12 evaluated (1 skipped), 3 of them truncated; awkward numbers and text."""
    r = _result(with_baseline=False)
    long_word = "x" * 400
    r.update(test_records=13, evaluated_records=12, truncated=3, skipped=1, answer_tokens=400,
             answer_tokens_full=900, max_length=64, generated_answers=13, perplexity=3349.71, bleu_4=1.981e-07,
             generation_timing={"new_tokens": 100, "tokens_per_sec": 50.0, "prompts_too_long": 1})
    r["per_domain"]["cost $\\frac$"] = {**r["per_domain"]["networking"], "perplexity": 1234.5}
    r["samples"].append({"domain": "cost $\\frac$", "question": "q " + long_word, "reference": long_word,
                         "generated": long_word, "f1": 0.0, "rouge_l": 0.0})
    return r


@pytest.mark.parametrize("value, text", [(3349.71, "3,350"), (86.04, "86.04"), (0.41234, "0.4123"),
                                         (1.981e-07, "0.0000"), (-1e-9, "0.0000"), (-15.0, "-15.00"),
                                         (12345678.9, "12,345,679"), (float("nan"), "nan")])
def test_fixed_notation_by_hand(value, text):
    assert fixed(value) == text


def test_dollar_in_a_domain_name_does_not_crash_the_report(tmp_path):
    """Regression (issue 14): matplotlib parsed "cost $\\frac$" as maths and raised while drawing domains.png."""
    page = write_report(_honest_result(), None, tmp_path / RUN)
    assert (page.parent / "domains.png").read_bytes()[:4] == b"\x89PNG"
    assert "cost $\\frac$" in page.read_text()
    import matplotlib

    assert matplotlib.rcParams["text.parse_math"]  # turned off for our plots only, not for the whole process


def test_report_says_what_every_figure_was_computed_on(tmp_path):
    r = _honest_result()
    forced, generated, warning = coverage(r)
    assert forced == "400 answer tokens of 900 (44.4%), 12 of 13 records (3 truncated, 1 skipped at max_length 64)"
    assert generated == "13 generated answers (1 prompt too long for the model: scored 0)"
    assert "compare them only with evaluations at the same max_length" in warning
    page = write_report(r, None, tmp_path / RUN).read_text()
    assert f"<caption>Teacher-forced, on {forced}</caption>" in page
    assert f"<caption>Generated answers, on {generated}</caption>" in page
    # the caption sits in the same table as the perplexity it qualifies
    table = page[page.index("<caption>Teacher-forced"):]
    assert table.index("perplexity") < table.index("</table>")
    text = re.sub(r'src="data:[^"]*"', "", page)
    assert not re.search(r"\d[eE][+-]?\d", text), re.search(r".{40}\d[eE][+-]?\d.{20}", text)
    assert ">3,350<" in page and ">0.0000<" in page  # perplexity 3349.71, BLEU-4 1.981e-07


def test_a_full_length_evaluation_has_no_warning():
    r = _result(with_baseline=False)
    r.update(evaluated_records=8, truncated=0, skipped=0, answer_tokens=120, answer_tokens_full=120, max_length=512)
    forced, _, warning = coverage(r)
    assert forced == "120 answer tokens of 120 (100%), 8 of 8 records (0 truncated, 0 skipped at max_length 512)"
    assert warning == ""


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_report_files_follow_the_umask(tmp_path, run_dir, umask):
    """Regression (issue 14): report.html was created 0600 whatever the umask (mkstemp)."""
    old = os.umask(umask)
    try:
        page = write_report(_result(), run_dir, tmp_path / RUN)
    finally:
        os.umask(old)
    for path in page.parent.iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium not installed (apt-get install chromium)")
def test_chromium_shows_the_coverage_and_wraps_long_text(tmp_path):
    """What a reader sees: the coverage captions in the rendered text, and a 400-character word wrapped inside
    its cell (no cell wider than its content box, the samples table no wider than the page)."""
    r = _honest_result()
    page_path = write_report(r, None, tmp_path / RUN)
    probe = tmp_path / "probe.html"
    probe.write_text(page_path.read_text().replace("</body>", """<script>
window.addEventListener("load", () => {
  const cells = [...document.querySelectorAll("td")];
  const samples = document.querySelector("table.samples");
  document.title = "PROBE " + JSON.stringify({
    overflowing: cells.filter(c => c.scrollWidth > c.clientWidth + 1).length,
    samples_width: samples.getBoundingClientRect().width,
    body_width: document.body.getBoundingClientRect().width,
    text: document.body.innerText});
});
</script></body>"""))
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--virtual-time-budget=5000",
           "--window-size=1200,2400", f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", probe.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    found = re.search(r"<title>PROBE (\{.*?\})</title>", dom.stdout, re.S)
    assert found, dom.stdout[-2000:] + dom.stderr[-2000:]
    import html as html_lib

    seen = json.loads(html_lib.unescape(found.group(1)))
    assert seen["overflowing"] == 0 and seen["samples_width"] <= seen["body_width"] + 1, seen
    forced, generated, warning = coverage(r)
    text = " ".join(seen["text"].split())
    assert f"Teacher-forced, on {forced}" in text and f"Generated answers, on {generated}" in text
    assert warning in text and "3,350" in text and "cost $\\frac$" in text
