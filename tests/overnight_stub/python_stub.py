#!/usr/bin/env python3
"""A stand-in for the venv's Python in the overnight-script tests (THETA_PYTHON points here).

It appends its arguments to $STUB_LOG (one JSON list a line) and exits with the code $STUB_EXIT gives the module
(a JSON object, module -> code; 0 otherwise); a stubbed ``-m src.utils.overnight step ... -- PY -m MODULE ...``
exits with MODULE's code, as the real runner would. Modules named in $STUB_REAL (comma-separated) run for real
with $STUB_REAL_PYTHON; ``-m src.utils.overnight plan`` prints $STUB_PLAN instead when that is set.
A stubbed step that exits 0 writes what the real one would, so that the run records it: data preparation its
--output file, the trainer theta_final/ and a completed training_config.json in its --output_dir, evaluation its
--output_file, optimisation its --output_path folder.
$STUB_HOLD ("module=path") keeps that module's step running until the file exists (60 s at most); while it holds,
its pid is in path + ".pid".
"""
import json
import os
import sys
import time

args = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a", encoding="utf-8") as log:
    log.write(json.dumps(args) + "\n")
module = args[1] if len(args) > 1 and args[0] == "-m" else ""
if module == "src.utils.overnight" and args[2:3] == ["plan"] and os.environ.get("STUB_PLAN"):
    sys.stdout.write(open(os.environ["STUB_PLAN"], encoding="utf-8").read())
    sys.exit(0)
if module in os.environ.get("STUB_REAL", "").split(","):
    real = os.environ["STUB_REAL_PYTHON"]
    os.execv(real, [real, *args])
codes = json.loads(os.environ.get("STUB_EXIT") or "{}")
if module == "src.utils.overnight" and args[2:3] == ["step"] and "--" in args:
    inner = args[args.index("--") + 1:]
    sys.exit(int(codes.get(inner[2] if inner[1:2] == ["-m"] else "", 0)))


def value(flag):
    return args[args.index(flag) + 1] if flag in args else None


hold_module, _, hold_path = os.environ.get("STUB_HOLD", "").partition("=")
if module == hold_module:
    with open(hold_path + ".pid", "w", encoding="utf-8") as fh:
        fh.write(str(os.getpid()))
    deadline = time.time() + 60
    while not os.path.exists(hold_path) and time.time() < deadline:
        time.sleep(0.1)
print(f"stub: {module} {' '.join(args[2:])}")
code = int(codes.get(module, 0))
if code == 0:
    if module == "src.data_processing.prepare_data_for_training" and value("--output"):
        with open(value("--output"), "w", encoding="utf-8") as fh:
            fh.write('{"format_version": 0, "records": []}\n')
    elif module == "src.training.train_enhanced" and value("--output_dir"):
        os.makedirs(os.path.join(value("--output_dir"), "theta_final"), exist_ok=True)
        with open(os.path.join(value("--output_dir"), "theta_final", "config.json"), "w") as fh:
            fh.write("{}\n")
        with open(os.path.join(value("--output_dir"), "training_config.json"), "w") as fh:
            json.dump({"status": "completed", "summary": {"status": "completed", "exit_code": 0}}, fh)
    elif module == "src.training.evaluate_model" and value("--output_file"):
        with open(value("--output_file"), "w", encoding="utf-8") as fh:
            json.dump({"perplexity": 9.5}, fh)
    elif module == "src.training.optimize_for_inference" and value("--output_path"):
        os.makedirs(value("--output_path"), exist_ok=True)
        with open(os.path.join(value("--output_path"), "optimization_metrics.json"), "w") as fh:
            fh.write("{}\n")
sys.exit(code)
