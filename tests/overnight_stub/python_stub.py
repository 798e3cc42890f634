#!/usr/bin/env python3
"""A stand-in for the venv's Python in the overnight-script tests (THETA_PYTHON points here).

It appends its arguments to $STUB_LOG (one JSON list a line) and exits with the code $STUB_EXIT gives the module
(a JSON object, module -> code; 0 otherwise). Modules named in $STUB_REAL (comma-separated) run for real with
$STUB_REAL_PYTHON; ``-m src.utils.overnight plan`` prints $STUB_PLAN instead when that is set. A stubbed data
preparation writes its --output file, so that the run records a prepared file as the real step would.
$STUB_HOLD ("module=path") keeps that module's step running until the file exists (60 s at most).
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
if module == "src.data_processing.prepare_data_for_training" and "--output" in args:
    with open(args[args.index("--output") + 1], "w", encoding="utf-8") as fh:
        fh.write('{"format_version": 0, "records": []}\n')
hold_module, _, hold_path = os.environ.get("STUB_HOLD", "").partition("=")
if module == hold_module:
    deadline = time.time() + 60
    while not os.path.exists(hold_path) and time.time() < deadline:
        time.sleep(0.1)
print(f"stub: {module} {' '.join(args[2:])}")
sys.exit(int(json.loads(os.environ.get("STUB_EXIT") or "{}").get(module, 0)))
