#!/usr/bin/env bash
# Theta overnight run: pre-flight, prepare the data, train, evaluate and optimise, in one unattended command.
#
#   ./train_overnight_enhanced.sh --profile quick          # theta-tiny, CPU, the whole pipeline in minutes
#   ./train_overnight_enhanced.sh                          # rtx3060 on a CUDA GPU, quick otherwise
#   ./train_overnight_enhanced.sh --preflight              # the pre-flight checks alone (and a test email)
#   ./train_overnight_enhanced.sh --gpus 2 --tensorboard -- --epochs 10 --learning_rate 5e-5
#
# Expected time: quick about 4-8 minutes on 2 CPU cores; rtx3060 (gpt2-medium) most of a night on an RTX 3060.
# Disk: the venv about 1.6 GB (CPU torch); a quick run about 100 MB; a gpt2-medium run about 6 GB with checkpoints.
# Re-running the same command resumes the unfinished run when Datasets/, the profile and the flags are unchanged;
# otherwise it starts a new run and says why (--fresh: always new; --resume RUN_ID: that one). README.md, "Resuming".
# Every decision beyond the chain of steps below lives in src/utils/overnight.py, which train_overnight_enhanced.bat
# calls the same way: the two run the same steps with the same flags in the same order.
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

# --- the plan: arguments, profile, run id, resume or not (and why), the flags of each step -----------------------
PLAN="$("$PY" -m src.utils.overnight plan --format sh --script "$(basename "$0")" -- "$@")" || exit $?
eval "$PLAN"
case "$ACTION" in
  help) "$PY" -m src.utils.overnight usage --script "$(basename "$0")"; exit 0 ;;
  preflight)
    exec "$PY" -m src.training.preflight --profile "$PROFILE" --gpus "$GPUS" \
      ${PREFLIGHT_FLAGS[@]+"${PREFLIGHT_FLAGS[@]}"} -- ${TRAIN_EXTRA[@]+"${TRAIN_EXTRA[@]}"} ;;
esac
exec > >(tee -a "$LOG") 2>&1

# The scripts send the start/failure/completion emails of the whole chain; the trainer then sends only its epoch
# and status emails (src/training/email_integration.py).
export THETA_NOTIFY_FROM_SCRIPT=1
export PYTHONUNBUFFERED=1

STEP="pre-flight"
fail() {
  local code=$?
  trap - ERR
  echo
  # Records the failure (a user error, exit 2, is never resumed), prints the step, the log and the error, and
  # sends the failure email.
  "$PY" -m src.utils.overnight failed --run_dir "$RUN_DIR" --step "$STEP" --exit_code "$code" --log "$LOG" \
    --step_output "$STEP_OUT" || echo "FAILED at step '$STEP' (exit $code)"
  exit "$code"
}
trap fail ERR

STEPS=5
STEP_NO=0
run_step() {  # run_step "<name>" command...: its output goes to the console, the log and $STEP_OUT
  STEP="$1"; shift
  STEP_NO=$((STEP_NO + 1))
  echo; echo "[$STEP_NO/$STEPS] $STEP  ($(date '+%H:%M:%S'))"
  "$@" 2>&1 | tee "$STEP_OUT"
}
skip_step() {
  STEP_NO=$((STEP_NO + 1))
  echo; echo "[$STEP_NO/$STEPS] $1: $2"
}

# Pre-flight: what would kill the run later stops it now (model, disk, memory, data, tokens, email).
echo "[pre-flight]  ($(date '+%H:%M:%S'))"
"$PY" -m src.training.preflight --profile "$PROFILE" --gpus "$GPUS" --run_dir "$RUN_DIR" \
  ${PREFLIGHT_FLAGS[@]+"${PREFLIGHT_FLAGS[@]}"} -- ${TRAIN_EXTRA[@]+"${TRAIN_EXTRA[@]}"} 2>&1 | tee "$STEP_OUT"
STEP="start"
"$PY" -m src.utils.overnight banner --run_dir "$RUN_DIR" --python "$PY"

if [ "$TENSORBOARD" = 1 ]; then
  "$PY" -m tensorboard.main --logdir models --host 127.0.0.1 --port "$TB_PORT" >/dev/null 2>&1 &
  TB_PID=$!
  echo "tensorboard: http://127.0.0.1:$TB_PORT/ (stops when this run ends)"
  trap 'kill "$TB_PID" 2>/dev/null || true' EXIT
fi

"$PY" -m src.training.email_integration start --run_id "$RUN_ID" --run_dir "$RUN_DIR" --log "$LOG" \
  --profile "$PROFILE" --gpus "$GPUS" --trainer_flags "$TRAIN_FLAGS_TEXT" ${RESUMING_FLAG[@]+"${RESUMING_FLAG[@]}"} || true

# The knowledge base runs before preparation: prepare_data_for_training reads its outputs when they exist.
if [ "$KB" = 1 ]; then
  run_step "knowledge base" "$PY" -m src.data_processing.knowledge_base_enhancer_main --datasets_dir Datasets
else
  skip_step "knowledge base" "$KB_WHY"
fi

if [ "$PREPARE" = 1 ]; then
  run_step "prepare data" "$PY" -m src.data_processing.prepare_data_for_training \
    --datasets_dir Datasets \
    --output Datasets/enhanced_training_data.json \
    ${PREPARE_FLAGS[@]+"${PREPARE_FLAGS[@]}"}
  "$PY" -m src.utils.overnight prepared --run_dir "$RUN_DIR"
  STEP="data check"
  "$PY" -m src.training.preflight --only data --profile "$PROFILE" --gpus "$GPUS" --run_dir "$RUN_DIR" \
    -- ${TRAIN_EXTRA[@]+"${TRAIN_EXTRA[@]}"} 2>&1 | tee "$STEP_OUT"
else
  skip_step "prepare data" "$PREPARE_WHY"
fi

if [ "$GPUS" -gt 1 ]; then
  LAUNCH=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$GPUS")
else
  LAUNCH=("$PY")
fi
run_step "train" "${LAUNCH[@]}" -m src.training.train_enhanced \
  --profile "$PROFILE" \
  --data_path Datasets/enhanced_training_data.json \
  --output_dir "$RUN_DIR" \
  --resume auto \
  ${TRAIN_EXTRA[@]+"${TRAIN_EXTRA[@]}"}

run_step "evaluate" "$PY" -m src.training.evaluate_model \
  --model_path "$RUN_DIR/theta_final" \
  --output_file "stats/evaluation_${RUN_ID}.json"

run_step "optimise for inference" "$PY" -m src.training.optimize_for_inference \
  --model_path "$RUN_DIR/theta_final" \
  --output_path "$RUN_DIR/theta_inference" \
  ${OPTIMISE_FLAGS[@]+"${OPTIMISE_FLAGS[@]}"}

STEP="completed"
trap - ERR
"$PY" -m src.utils.overnight completed --run_dir "$RUN_DIR" --log "$LOG" --step_output "$STEP_OUT" --python "$PY"
