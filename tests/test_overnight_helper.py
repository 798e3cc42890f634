"""src/utils/overnight.py: the overnight scripts' decisions (arguments, fingerprint, resume choice, log rotation,
batch-file quoting), tested in-process against hand-written expectations.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_overnight_helper.py -q
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from pathlib import Path

import pytest

from src.utils import overnight as ov
from src.utils.common import UserError

NOW = 1_800_000_000.0  # a fixed clock: run ids are predictable


@pytest.fixture
def root(tmp_path) -> Path:
    """A project root with a Datasets/ folder holding inputs, prepared outputs and derived files."""
    d = tmp_path / "proj"
    (d / "Datasets" / "knowledge").mkdir(parents=True)
    (d / "Datasets" / "knowledge_base").mkdir()
    (d / "Datasets" / "a.json").write_text('[{"question": "q", "answer": "a"}]')
    (d / "Datasets" / "b.jsonl").write_text('{"question": "q2", "answer": "a2"}\n')
    (d / "Datasets" / "knowledge" / "dns.md").write_text("DNS maps names to addresses.")
    (d / "Datasets" / "knowledge_base" / "chunks.json").write_text("[]")   # derived: not an input
    (d / "Datasets" / "enhanced_training_data.json").write_text("{}")       # output: not an input
    (d / "Datasets" / "enhanced_data_stats.json").write_text("{}")
    (d / "Datasets" / "README.md").write_text("notes")                      # not read by preparation
    (d / "Datasets" / ".hidden.json").write_text("[]")
    (d / "models").mkdir()
    return d


def test_datasets_fingerprint_hashes_inputs_only(root):
    fp = ov.datasets_fingerprint(root / "Datasets")
    assert sorted(fp) == ["a.json", "b.jsonl", "knowledge/dns.md"]
    assert fp["a.json"] == hashlib.sha256((root / "Datasets" / "a.json").read_bytes()).hexdigest()


def test_fingerprint_changes_say_what_changed():
    old = {"profile": "quick", "prepare_flags": ["--profile", "quick"], "trainer_flags": [],
           "datasets": {"a.json": "1", "b.jsonl": "2", "c.json": "3"}}
    assert ov.fingerprint_changes(old, json.loads(json.dumps(old))) == []
    new = {**old, "profile": "rtx3060", "trainer_flags": ["--epochs", "3"],
           "datasets": {"a.json": "9", "c.json": "3", "d.json": "4"}}
    assert ov.fingerprint_changes(old, new) == [
        "Datasets/ changed (a.json changed; d.json added; b.jsonl removed)",
        "the profile changed (quick, now rtx3060)", "the trainer flags changed (none, now --epochs 3)"]


@pytest.fixture(autouse=True)
def _no_output_handlers_left():
    """The lifecycle commands add console and log handlers to the root logger (one-shot processes); a test run
    in-process removes them again."""
    yield
    for handler in ov._output_handlers:
        logging.getLogger().removeHandler(handler)
        handler.close()
    ov._output_handlers.clear()


def make_run(models: Path, run_id: str, fingerprint: dict | None, events: list | None = None, done=False) -> Path:
    d = models / run_id
    d.mkdir()
    if fingerprint is not None:
        ov.write_state(d, {"run_id": run_id, "fingerprint": fingerprint, "events": events or []})
    if done:
        (d / "DONE").write_text("x")
    return d


def test_choose_run_rules(root):
    models = root / "models"
    fp = ov.make_fingerprint(root, "quick", ["--profile", "quick"], [])
    assert ov.choose_run(models, fp, now=NOW) == ov.RunChoice(ov.new_run_id(NOW), False,
                                                             "new run (no unfinished run to resume)")
    make_run(models, "theta_enhanced_20200101_000000", fp)                       # older, matching
    make_run(models, "theta_enhanced_20200102_000000", fp, done=True)            # finished: never resumed
    choice = ov.choose_run(models, fp, now=NOW)
    assert choice.resuming and choice.run_id == "theta_enhanced_20200101_000000"
    # A newer unfinished run from other data wins the comparison: a new run, with the reason.
    other = {**fp, "datasets": {**fp["datasets"], "a.json": "0" * 64}}
    make_run(models, "theta_enhanced_20200103_000000", other)
    choice = ov.choose_run(models, fp, now=NOW)
    assert not choice.resuming and choice.run_id == ov.new_run_id(NOW)
    assert choice.why == ("Datasets/ changed (a.json changed) since run theta_enhanced_20200103_000000 was started: "
                          "starting a new run; `--resume theta_enhanced_20200103_000000` continues the old one")
    # A run that ended with a user error is skipped, with a note; the next one is considered.
    make_run(models, "theta_enhanced_20200104_000000", fp, events=[{"event": "failed", "step": "train",
                                                                    "exit_code": 2}])
    choice = ov.choose_run(models, fp, now=NOW)
    assert choice.notes == ["run theta_enhanced_20200104_000000 ended with a user error at step 'train' (exit 2): "
                            "not resumed (`--resume theta_enhanced_20200104_000000` retries it)"]
    assert not choice.resuming and "theta_enhanced_20200103_000000 was started" in choice.why
    # An interrupted run (exit 3) is resumed; a run from an older script (no fingerprint) is not.
    make_run(models, "theta_enhanced_20200105_000000", fp, events=[{"event": "failed", "step": "train",
                                                                    "exit_code": 3}])
    assert ov.choose_run(models, fp, now=NOW).run_id == "theta_enhanced_20200105_000000"
    make_run(models, "theta_enhanced_20200106_000000", None)
    choice = ov.choose_run(models, fp, now=NOW)
    assert not choice.resuming and "has no fingerprint (started by an older script)" in choice.why
    # --fresh, --resume
    assert not ov.choose_run(models, fp, fresh=True, now=NOW).resuming
    picked = ov.choose_run(models, fp, resume_id="theta_enhanced_20200103_000000", now=NOW)
    assert picked.resuming and picked.notes == ["resuming theta_enhanced_20200103_000000 as asked although "
                                                "Datasets/ changed (a.json changed) since it was started"]
    with pytest.raises(UserError, match="that run is finished"):
        ov.choose_run(models, fp, resume_id="theta_enhanced_20200102_000000")
    with pytest.raises(UserError, match="no such run folder"):
        ov.choose_run(models, fp, resume_id="theta_enhanced_20990101_000000")


def test_new_run_id_never_reuses_a_folder(root):
    (root / "models" / ov.new_run_id(NOW)).mkdir()
    assert ov.choose_run(root / "models", {}, fresh=True, now=NOW).run_id == ov.new_run_id(NOW + 1)


def test_make_plan_records_the_fingerprint_and_resumes_only_when_it_matches(root):
    plan = ov.make_plan(["--profile", "quick", "--", "--epochs", "2"], root, now=NOW)
    run_dir = root / plan["RUN_DIR"]
    state = ov.read_state(run_dir)
    assert plan["RESUMING"] == "0" and plan["PREPARE"] == "1" and plan["TRAIN_EXTRA"] == ["--epochs", "2"]
    assert state["fingerprint"] == ov.make_fingerprint(root, "quick", ["--profile", "quick"], ["--epochs", "2"])
    # After the prepare step the run records its prepared file (and a created test set as an input).
    (root / "Datasets" / "test_set.json").write_text("[]")
    ov.cmd_prepared(run_dir, root)
    state = ov.read_state(run_dir)
    assert state["prepared_sha256"] == ov.sha256_file(root / "Datasets" / "enhanced_training_data.json")
    assert "test_set.json" in state["fingerprint"]["datasets"]
    again = ov.make_plan(["--profile", "quick", "--", "--epochs", "2"], root, now=NOW + 60)
    assert again["RUN_ID"] == plan["RUN_ID"] and again["RESUMING"] == "1" and again["PREPARE"] == "0"
    assert again["PREPARE_WHY"] == "skipped: resuming, the run keeps the data it started with"
    # Another run overwrote the prepared file: same inputs, so prepare again (it is deterministic).
    (root / "Datasets" / "enhanced_training_data.json").write_text('{"other": 1}')
    third = ov.make_plan(["--profile", "quick", "--", "--epochs", "2"], root, now=NOW + 120)
    assert third["RESUMING"] == "1" and third["PREPARE"] == "1" and "another run wrote it" in third["PREPARE_WHY"]
    # A changed dataset file: a new run.
    (root / "Datasets" / "b.jsonl").write_text('{"question": "q2", "answer": "changed"}\n')
    fourth = ov.make_plan(["--profile", "quick", "--", "--epochs", "2"], root, now=NOW + 180)
    assert fourth["RESUMING"] == "0" and fourth["RUN_ID"] != plan["RUN_ID"]
    assert "b.jsonl changed" in ov.read_state(root / fourth["RUN_DIR"])["plan"]["resume_why"]


def test_preflight_plan_creates_no_run(root):
    plan = ov.make_plan(["--preflight", "--profile", "quick"], root, now=NOW)
    assert plan["ACTION"] == "preflight" and plan["RUN_ID"] == "" and list((root / "models").iterdir()) == []
    assert plan["PREFLIGHT_FLAGS"] == ["--email_test"]  # a prepared file exists: it is checked too


@pytest.mark.parametrize("argv, message", [
    (["--profile", "huge"], "invalid choice: 'huge'"),
    (["--gpus", "0"], "--gpus must be a whole number of at least 1"),
    (["--fresh", "--resume", "theta_enhanced_20200101_000000"], "--fresh and --resume exclude each other"),
    (["--resume", "yesterday"], "a run id looks like theta_enhanced_"),
    (["--epochs", "3"], "unknown option '--epochs' (flags for the trainer go after --)"),
])
def test_bad_script_arguments_name_the_flag(argv, message):
    with pytest.raises(UserError, match=__import__("re").escape(message)):
        ov.parse_script_args(argv)


def test_rotate_logs_keeps_the_newest_and_this_runs_own(tmp_path):
    names = [f"training_enhanced_theta_enhanced_2020010{i}_000000.log" for i in range(1, 8)]
    for n in names:
        (tmp_path / n).write_text("x")
    own = names[0]  # the oldest name, but this run's own: never deleted
    deleted = ov.rotate_logs(tmp_path, own, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([own, names[5], names[6]])
    assert len(deleted) == 4


def test_sh_plan_round_trips_through_bash(root):
    plan = {"ACTION": "run", "WHY": "it's (odd) & $HOME `x`", "TRAIN_EXTRA": ["a b", "it's", "$x", ""]}
    script = ov.format_plan(plan, "sh") + 'printf "%s\\n" "$WHY" "${#TRAIN_EXTRA[@]}" "${TRAIN_EXTRA[@]}"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:6] == ["it's (odd) & $HOME `x`", "4", "a b", "it's", "$x", ""]


def test_cmd_set_line_escapes_what_cmd_would_read():
    # Hand-written expectations of cmd's rules: inside the quotes nothing but %; outside them ^ & | < > ( ).
    assert ov.cmd_set_line("A", "plain") == 'set "A=plain"'
    assert ov.cmd_set_line("A", "50% & more") == 'set "A=50%% & more"'
    # In the set line the quotes of the value shift cmd's quote state: a quoted argument's text is outside
    # quotes there (its & needs a caret), and the text between two arguments is inside them.
    assert ov.cmd_set_line("X", '"--note" "a&b"') == 'set "X="--note" "a^&b""'
    assert ov.cmd_set_line("X", '"a" & "b"') == 'set "X="a" & "b""'
    assert ov.cmd_quote("models\\run\\") == '"models\\run\\\\"'
    with pytest.raises(UserError, match="double quote"):
        ov.cmd_quote('say "hi"')
    text = ov.format_plan({"RUN_DIR": "models/x", "TRAIN_EXTRA": ["--a", "b c"], "EMPTY": []}, "cmd")
    assert text.split("\r\n")[1:4] == ['set "RUN_DIR=models\\x"', 'set "TRAIN_EXTRA="--a" "b c""', 'set "EMPTY="']


def test_step_flags_name_the_profile_and_auto_optimisation():
    # The profiles' values live in the tools themselves; the scripts restate none of them.
    assert ov.prepare_flags("rtx3060") == ["--profile", "rtx3060"]
    assert ov.optimise_flags() == ["--quantize", "auto"]


def test_banner_says_what_and_why(root):
    plan = ov.make_plan(["--profile", "quick", "--gpus", "2", "--tensorboard"], root, now=NOW)
    run_dir = root / plan["RUN_DIR"]
    (run_dir / ov.PREFLIGHT_FILE).write_text(json.dumps({"seconds": 3.14, "fatal": [], "estimate": "4 min",
                                                         "warnings": ["data: 2 answers truncated"]}))
    lines = ov.banner_lines(run_dir, python="/venv/python", device="CPU only", email="email: off")
    text = "\n".join(lines)
    assert f" Theta overnight run {plan['RUN_ID']}\n" in text + "\n"
    assert " run         new run (no unfinished run to resume)" in lines
    assert " pre-flight  ok in 3.1 s, 1 warning; whole run about 4 min" in lines
    assert " WARNING     data: 2 answers truncated" in lines
    assert f" tensorboard http://127.0.0.1:{plan['TB_PORT']}/" in lines
    assert any(line.startswith(" gpus        2 (torchrun") and "TRAINING_PIPELINE.md" in line for line in lines)


def no_email(monkeypatch) -> None:
    for k in [k for k in __import__("os").environ if k.startswith("EMAIL_")]:
        monkeypatch.delenv(k)
    monkeypatch.setattr("src.utils.email_notifier.PROJECT_ROOT", Path("/nonexistent"))  # no .env either


def test_a_failed_preflight_does_not_end_a_run(root, capsys, monkeypatch):
    """Regression: a resumed run stopped by the pre-flight (say, a full disk) must stay resumable; a new run
    stopped there leaves no folder behind."""
    no_email(monkeypatch)
    models = root / "models"
    fp = ov.make_fingerprint(root, "quick", ["--profile", "quick"], [])
    old = make_run(models, "theta_enhanced_20200101_000000", fp,
                   events=[{"event": "start"}, {"event": "failed", "step": "train", "exit_code": 3},
                           {"event": "resume"}])
    ov.main(["failed", "--run_dir", str(old), "--step", "pre-flight", "--exit_code", "2"])
    assert old.is_dir() and ov.choose_run(models, fp, now=NOW).run_id == old.name
    new = make_run(models, "theta_enhanced_20200102_000000", {**fp, "profile": "rtx3060"},
                   events=[{"event": "start"}])
    ov.main(["failed", "--run_dir", str(new), "--step", "pre-flight", "--exit_code", "2"])
    assert not new.exists()
    out = capsys.readouterr().out
    assert "FAILED at step 'pre-flight' (exit 2)" in out and "removed (nothing had run yet)" in out


def test_an_interruption_is_reported_once_and_resumed(root, capsys, monkeypatch):
    """The step runner reports the signal it saw; the script's `failed` after it adds nothing; the run is
    recorded as interrupted (not a user error), so the same command resumes it."""
    no_email(monkeypatch)
    models = root / "models"
    fp = ov.make_fingerprint(root, "quick", ["--profile", "quick"], [])
    run = make_run(models, "theta_enhanced_20200101_000000", fp, events=[{"event": "start"}])
    ov.setup_run_output(None)
    ov.report_failure(run, "evaluate", 143, "SIGTERM")  # as the step runner does
    ov.main(["failed", "--run_dir", str(run), "--step", "evaluate", "--exit_code", "143", "--signal", "TERM"])
    out = capsys.readouterr().out
    assert out.count("FAILED at step 'evaluate' (interrupted by SIGTERM, exit 143)") == 1
    assert "run the same command again to resume; finished steps are skipped" in out
    events = ov.read_state(run)["events"]
    assert [e["event"] for e in events] == ["start", "interrupted"] and events[1]["signal"] == "SIGTERM"
    assert ov.choose_run(models, fp, now=NOW).run_id == run.name


def plan_run(root: Path) -> Path:
    plan = ov.make_plan(["--profile", "quick"], root, now=NOW)
    return root / plan["RUN_DIR"]


def test_a_finished_step_is_skipped_while_its_output_is_as_recorded(root, capsys):
    """`step` runs a step, records it when its output is there, and skips it on a rerun while that output is
    unchanged; rewriting the output, or running an earlier step, runs it again."""
    import sys

    run = plan_run(root)
    rel = f"stats/evaluation_{run.name}.json"
    writes = [sys.executable, "-c", f"open({str(root / rel)!r}, 'w').write('{{}}'); print('evaluated')"]
    step = ["step", "--run_dir", str(run), "--step", "evaluate", "--number", "4/5", "--output", rel, "--"]
    assert ov.main(step + writes) == 0
    assert "[4/5] evaluate  (" in capsys.readouterr().out
    assert [r["step"] for r in ov.read_state(run)["finished_steps"]] == ["evaluate"]
    fails = [sys.executable, "-c", "raise SystemExit(7)"]
    assert ov.main(step + fails) == 0  # skipped: the failing command never ran
    assert "[4/5] evaluate: skipped: finished at " in capsys.readouterr().out
    log = (root / f"logs/training_enhanced_{run.name}.log").read_text()
    assert "evaluated" in log and "[4/5] evaluate: skipped" in log  # the step's output and the lines, in the log
    (root / rel).write_text('{"other": 1}')
    assert ov.main(step + fails) == 7  # the output changed since: it runs again
    assert ov.read_state(run)["finished_steps"] == []
    assert ov.main(step + writes) == 0
    ov.forget_from(run, "train")  # training runs again: what came after it is stale
    assert ov.read_state(run)["finished_steps"] == []


def test_training_counts_as_finished_only_when_the_trainer_says_completed(root):
    run = plan_run(root)
    assert ov.training_finished(run) == "theta_final/ is missing"
    (run / "theta_final").mkdir()
    (run / "training_config.json").write_text(json.dumps({"status": "interrupted", "summary": {"exit_code": 3}}))
    assert ov.training_finished(run) == "training_config.json says status 'interrupted'"
    (run / "training_config.json").write_text(json.dumps({"status": "completed", "summary": {"exit_code": 0}}))
    assert ov.training_finished(run) is None


def test_the_chains_emails_say_what_the_run_did(root):
    from src.utils.email_notifier import render

    run = plan_run(root)
    (run / ov.PREFLIGHT_FILE).write_text(json.dumps({"estimate": "4 min", "warnings": ["data: 2 answers cut"]}))
    start = ov.chain_start_email(run, gpu={"gpus": [], "system": {}})
    plain = render(start.heading, start.alerts, start.sections)[0]
    assert start.subject == f"[Theta] started: {run.name} (quick profile)"
    assert "pre-flight estimate  training about 4 min" in plain and "[WARNING] pre-flight: data: 2 answers cut" in plain
    (run / "training_config.json").write_text(json.dumps({"status": "completed", "summary": {
        "status": "completed", "best_val_loss": 2.25, "best_epoch": 1, "epochs_run": 1, "exit_code": 0}}))
    (run / "loss_history.json").write_text(json.dumps([{"epoch": 1, "train_loss": 2.5, "val_loss": 2.25}]))
    (root / "stats" / run.name).mkdir(parents=True)
    (root / "stats" / run.name / "loss_curve.png").write_bytes(b"\x89PNG report")
    (root / "stats" / f"evaluation_{run.name}.json").write_text(json.dumps({
        "test_records": 8, "perplexity": 12.3456, "token_accuracy": 0.4321, "bleu_4": 0.05,
        "samples": [{"question": "What is DNS?", "generated": "a name service", "reference": "It maps names."}]}))
    done = ov.chain_completion_email(run)
    plain = render(done.heading, done.alerts, done.sections)[0]
    assert done.subject == f"[Theta] completed: {run.name}, best val loss 2.2500 (epoch 1), test perplexity 12.35"
    assert "A: a name service\n" in plain and "reference: It maps names." in plain and "BLEU-4" in plain
    assert f"inference model  {run / 'theta_inference'}" in plain
    assert {a.filename: a.data for a in done.attachments}["loss_curve.png"] == b"\x89PNG report"
    assert sorted(a.filename for a in done.attachments) == [f"evaluation_{run.name}.json", "loss_curve.png"]
    failed = ov.chain_failure_email(run, "evaluate", 143, "SIGTERM", ["loading the model"], None)
    assert failed.subject == f"[Theta] FAILED: {run.name} at evaluate: loading the model"
    assert "was interrupted by SIGTERM (exit code 143)" in render(failed.heading, [], failed.sections)[0]
