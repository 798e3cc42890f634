"""report.py: plots from the run folder, a self-contained escaped page, and a real render in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from src.training.report import write_report

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
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "&lt;/td&gt;&lt;/table&gt;" in page and "No &amp; never." in page
    assert page.count("<table") == 5  # metrics, domains, deltas, settings, samples


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
    assert seen["tables"] == 5 and seen["rows"] >= 10 and seen["tallest"] > 100, seen

    shot = tmp_path / "shot.png"
    subprocess.run(base + [f"--user-data-dir={tmp_path / 'profile2'}", f"--screenshot={shot}", page_path.as_uri()],
                   capture_output=True, text=True, timeout=90)
    assert shot.is_file() and shot.stat().st_size > 20_000
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)  # (H, W, C) floats
    assert pixels.shape[0] == 2400 and pixels.std() > 0.05  # not a blank page
