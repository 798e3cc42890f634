#!/usr/bin/env bash
# Theta overnight run: pre-flight, prepare the data, train, evaluate and optimise, in one unattended command.
#
#   ./train_overnight_enhanced.sh --profile quick          # theta-tiny, CPU, the whole pipeline in minutes
#   ./train_overnight_enhanced.sh                          # rtx3060 on a CUDA GPU, quick otherwise
#   ./train_overnight_enhanced.sh --preflight              # the pre-flight checks alone (and a test email)
#   ./train_overnight_enhanced.sh --gpus 2 --tensorboard -- --epochs 10 --learning_rate 5e-5
#
# Expected time: quick: its training took 335 s on a 2-core AMD EPYC (no GPU), plus the other steps (not timed
# as a whole); rtx3060 (gpt2-medium): not measured here (no GPU), most of a night on an RTX 3060 by its plan.
# Disk: the venv about 1.6 GB (CPU torch); a quick run about 100 MB; a gpt2-medium run about 6 GB with checkpoints.
# Re-running the same command resumes the unfinished run when Datasets/, the profile and the flags are unchanged;
# otherwise it starts a new run and says why (--fresh: always new; --resume RUN_ID: that one). README.md, "Resuming".
# Every decision beyond the chain of steps below lives in src/utils/overnight.py (the run's lifecycle: plan, banner,
# start, step, prepared, failed, completed), which train_overnight_enhanced.bat calls the same way: the two run the
# same steps with the same flags in the same order.
# TERM, INT (Ctrl-C) and HUP (the terminal closed) stop the running step cleanly, record it as interrupted, print
# the FAILED line, send the failure email and exit 143 / 130 / 129; running the same command again resumes and
# skips the steps that had finished (documentation/TRAINING_PIPELINE.md, "Signals and interruptions").
# Email (start, every epoch, status, completion, failure): set EMAIL_* in .env, see documentation/EMAIL_NOTIFICATIONS.md.
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

# --- virtual environment (THETA_PYTHON: use that interpreter as it is) -------------------------------------------
if [ -n "${THETA_PYTHON:-}" ]; then
  PY="$THETA_PYTHON"
else
  PY_SYS="$(command -v python3 || command -v python || true)"
  if [ -z "$PY_SYS" ]; then
    echo "error: Python 3.10+ is needed (python3 was not found on PATH)" >&2; exit 2
  fi
  PY="$("$PY_SYS" src/utils/bootstrap_env.py --requirements requirements.txt | tail -n 1)"
fi

# --- one overnight run per project folder ---------------------------------------------------------------------
# Runs share Datasets/ and its prepared files, so a second script here (a double-click, or the same command typed
# again while the night runs) is refused at once, exit 2, naming the running one. The lock is an OS lock on the
# open file descriptor 9: it goes when this script and every step it started have ended, however they end.
# --help and --preflight write nothing and need no lock.
NEEDS_LOCK=1
for arg in "$@"; do
  case "$arg" in --) break ;; -h|--help|--preflight) NEEDS_LOCK=0 ;; esac
done
if [ "$NEEDS_LOCK" = 1 ]; then
  mkdir -p models
  exec 9>>models/.overnight.lock
  "$PY" -m src.utils.run_lock take --fd 9 --lock_file models/.overnight.lock --what "overnight run" \
    --hint "one overnight run per project folder (they share Datasets/ and its prepared files)" || exit $?
fi

# --- the plan: arguments, profile, run id, resume or not (and why), the flags of each step -----------------------
PLAN="$("$PY" -m src.utils.overnight plan --format sh --script "$(basename "$0")" -- "$@")" || exit $?
eval "$PLAN"
case "$ACTION" in
  help) "$PY" -m src.utils.overnight usage --script "$(basename "$0")"; exit 0 ;;
  preflight)
    exec "$PY" -m src.training.preflight --profile "$PROFILE" --gpus "$GPUS" \
      ${PREFLIGHT_FLAGS[@]+"${PREFLIGHT_FLAGS[@]}"} -- ${TRAIN_EXTRA[@]+"${TRAIN_EXTRA[@]}"} ;;
esac
# The scripts send the start/failure/completion emails of the whole chain; the trainer then sends only its epoch
# and status emails (src/training/run_emails.py).
export THETA_NOTIFY_FROM_SCRIPT=1
export PYTHONUNBUFFERED=1

# --- failures and signals -----------------------------------------------------------------------------------------
# Each step runs through `overnight step` (its output to the console, the log and $STEP_OUT) in the background, so
# that this shell can take TERM/INT/HUP while it waits: bash runs a trap only once the foreground command is done.
# The trap passes the signal to the step's runner, which passes it to the step's own process group and waits for
# it; the runner reports the interruption, and fail() then only exits (`overnight failed` reports once).
STEP="pre-flight"
STEP_PID=""
SIGNAL=""
FAILING=0
say() {  # a line on the console and in the log (the console may be gone after a hang-up)
  echo "$*" 2>/dev/null || true
  echo "$*" >>"$LOG" 2>/dev/null || true
}
signal_code() { case "$1" in HUP) echo 129 ;; INT) echo 130 ;; *) echo 143 ;; esac; }
fail() {  # fail CODE: record and report the failure of $STEP (a user error, exit 2, is never resumed), exit CODE
  local code="$1"
  trap - ERR
  FAILING=1
  if [ -n "$SIGNAL" ]; then code="$(signal_code "$SIGNAL")"; fi
  "$PY" -m src.utils.overnight failed --run_dir "$RUN_DIR" --step "$STEP" --exit_code "$code" \
    ${SIGNAL:+--signal "$SIGNAL"} || say "FAILED at step '$STEP' (exit $code)"
  exit "$code"
}
on_signal() {
  SIGNAL="$1"
  WAIT_CUT=1
  if [ -n "$STEP_PID" ]; then
    kill -s "$1" "$STEP_PID" 2>/dev/null || true  # the runner passes it on and waits for the step
  elif [ "$FAILING" = 0 ]; then
    fail "$(signal_code "$1")"                     # between steps: stop here
  fi
}
trap 'fail $?' ERR
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap 'on_signal HUP' HUP

STEPS=5
STEP_NO=0
run_step() {  # run_step NAME [--number N/M] [--output PATH] -- command...
  STEP="$1"; shift
  "$PY" -m src.utils.overnight step --run_dir "$RUN_DIR" --step "$STEP" "$@" &
  STEP_PID=$!
  local code
  while :; do
    WAIT_CUT=0
    wait "$STEP_PID" && code=0 || code=$?
    [ "$WAIT_CUT" = 1 ] || break  # a trapped signal cut the wait short: the step is still ending
  done
  STEP_PID=""
  if [ -n "$SIGNAL" ]; then return "$(signal_code "$SIGNAL")"; fi
  return "$code"
}
next_step() { STEP_NO=$((STEP_NO + 1)); NUMBER="$STEP_NO/$STEPS"; }
skip_step() {
  next_step
  say ""; say "[$NUMBER] $1: $2"
}

# Pre-flight: what would kill the run later stops it now (model, disk, memory, data, tokens, email).
run_step "pre-flight" -- "$PY" -m src.training.preflight --profile "$PROFILE" --gpus "$GPUS" --run_dir "$RUN_DIR" \
  ${PREFLIGHT_FLAGS[@]+"${PREFLIGHT_FLAGS[@]}"} -- ${TRAIN_EXTRA[@]+"${TRAIN_EXTRA[@]}"}
STEP="start"
"$PY" -m src.utils.overnight banner --run_dir "$RUN_DIR" --python "$PY"

if [ "$TENSORBOARD" = 1 ]; then
  "$PY" -m tensorboard.main --logdir models --host 127.0.0.1 --port "$TB_PORT" >/dev/null 2>&1 9>&- &  # not the lock
  TB_PID=$!
  say "tensorboard: http://127.0.0.1:$TB_PORT/ (stops when this run ends)"
  trap 'kill "$TB_PID" 2>/dev/null || true' EXIT
fi

"$PY" -m src.utils.overnight start --run_dir "$RUN_DIR" || true

# The knowledge base runs before preparation: prepare_data_for_training reads its outputs when they exist.
if [ "$KB" = 1 ]; then
  next_step
  run_step "knowledge base" --number "$NUMBER" -- "$PY" -m src.data_processing.knowledge_base_enhancer_main \
    --datasets_dir Datasets
else
  skip_step "knowledge base" "$KB_WHY"
fi

if [ "$PREPARE" = 1 ]; then
  next_step
  run_step "prepare data" --number "$NUMBER" -- "$PY" -m src.data_processing.prepare_data_for_training \
    --datasets_dir Datasets \
    --output Datasets/enhanced_training_data.json \
    ${PREPARE_FLAGS[@]+"${PREPARE_FLAGS[@]}"}
  "$PY" -m src.utils.overnight prepared --run_dir "$RUN_DIR"
  run_step "data check" -- "$PY" -m src.training.preflight --only data --profile "$PROFILE" --gpus "$GPUS" \
    --run_dir "$RUN_DIR" -- ${TRAIN_EXTRA[@]+"${TRAIN_EXTRA[@]}"}
else
  skip_step "prepare data" "$PREPARE_WHY"
fi

# Train, evaluate and optimise record their output when they finish: a rerun skips them while it is unchanged.
if [ "$GPUS" -gt 1 ]; then
  LAUNCH=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$GPUS")
else
  LAUNCH=("$PY")
fi
next_step
run_step "train" --number "$NUMBER" --output "$RUN_DIR/theta_final" -- "${LAUNCH[@]}" -m src.training.train_enhanced \
  --profile "$PROFILE" \
  --data_path Datasets/enhanced_training_data.json \
  --output_dir "$RUN_DIR" \
  --resume auto \
  ${TRAIN_EXTRA[@]+"${TRAIN_EXTRA[@]}"}

next_step
run_step "evaluate" --number "$NUMBER" --output "stats/evaluation_${RUN_ID}.json" -- "$PY" -m src.training.evaluate_model \
  --model_path "$RUN_DIR/theta_final" \
  --output_file "stats/evaluation_${RUN_ID}.json"

next_step
run_step "optimise for inference" --number "$NUMBER" --output "$RUN_DIR/theta_inference" -- \
  "$PY" -m src.training.optimize_for_inference \
  --model_path "$RUN_DIR/theta_final" \
  --output_path "$RUN_DIR/theta_inference" \
  ${OPTIMISE_FLAGS[@]+"${OPTIMISE_FLAGS[@]}"}

STEP="completed"
trap - ERR
"$PY" -m src.utils.overnight completed --run_dir "$RUN_DIR" --python "$PY"
