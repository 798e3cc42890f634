#!/usr/bin/env bash
# Theta overnight run: prepare the data, train, evaluate and optimise, in one unattended command.
#
#   ./train_overnight_enhanced.sh --profile quick          # theta-tiny, CPU, the whole pipeline in minutes
#   ./train_overnight_enhanced.sh                          # rtx3060 on a CUDA GPU, quick otherwise
#   ./train_overnight_enhanced.sh --gpus 2 --tensorboard -- --epochs 10 --learning_rate 5e-5
#
# Expected time: quick about 4-5 minutes on 2 CPU cores (measured 4 min 24 s); rtx3060 (gpt2-medium) most of a night on an RTX 3060.
# Disk: the venv about 1.6 GB (CPU torch); a quick run about 100 MB; a gpt2-medium run about 6 GB with checkpoints.
# Re-running the same command after a crash or a kill resumes the unfinished run (the newest models/<run>/
# without a DONE marker). train_overnight_enhanced.bat runs the same steps with the same flags in the same order.
# Email (start, every epoch, status, completion, failure): set EMAIL_* in .env, see documentation/EMAIL_NOTIFICATIONS.md.
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

usage() {
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
  echo "Options: --profile quick|rtx3060  --gpus N  --tensorboard  --  <flags for train_enhanced.py>"
}

PROFILE=""
GPUS=1
TENSORBOARD=0
TRAIN_EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) PROFILE="${2:?--profile needs a value: quick or rtx3060}"; shift 2 ;;
    --profile=*) PROFILE="${1#*=}"; shift ;;
    --gpus) GPUS="${2:?--gpus needs a number}"; shift 2 ;;
    --gpus=*) GPUS="${1#*=}"; shift ;;
    --tensorboard) TENSORBOARD=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; TRAIN_EXTRA=("$@"); break ;;
    *) echo "error: unknown option '$1' (flags for the trainer go after --)" >&2; usage >&2; exit 2 ;;
  esac
done
case "$PROFILE" in
  ""|quick|rtx3060) ;;
  *) echo "error: --profile must be quick or rtx3060, not '$PROFILE'" >&2; exit 2 ;;
esac
case "$GPUS" in
  ''|*[!0-9]*|0) echo "error: --gpus must be a whole number of at least 1, not '$GPUS'" >&2; exit 2 ;;
esac

# --- profile: rtx3060 where a CUDA GPU answers, quick otherwise -------------------------------------------------
PROFILE_WHY="chosen with --profile"
if [ -z "$PROFILE" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    PROFILE="rtx3060"; PROFILE_WHY="a CUDA GPU was found (nvidia-smi)"
  else
    PROFILE="quick"; PROFILE_WHY="no CUDA GPU was found"
  fi
fi
# The quick profile keeps the prepared data small: no raising of small domains to the default minimum count.
# Data preparation per profile (documentation/DATA_PROCESSING.md): quick keeps the data small (about 600 records
# from the sample data), the overnight profile balances every domain up to 300 records.
if [ "$PROFILE" = quick ]; then
  PREPARE_PROFILE_FLAGS=(--max_domain_fraction 0.3 --min_domain_count 100 --synthetic_ratio 0.1 --near_dup_threshold 0.8)
else
  PREPARE_PROFILE_FLAGS=(--max_domain_fraction 0.2 --min_domain_count 300 --synthetic_ratio 0.1 --near_dup_threshold 0.8)
fi

# --- virtual environment -----------------------------------------------------------------------------------------
PY_SYS="$(command -v python3 || command -v python || true)"
if [ -z "$PY_SYS" ]; then
  echo "error: Python 3.10+ is needed (python3 was not found on PATH)" >&2; exit 2
fi
PY="$("$PY_SYS" src/utils/bootstrap_env.py --requirements requirements.txt | tail -n 1)"

# --- run id: fixed once; an unfinished run is resumed ------------------------------------------------------------
shopt -s nullglob
RUN_ID=""
for dir in models/theta_enhanced_*; do  # globs sort by name, and names sort by time: the last match is newest
  if [ -d "$dir" ] && [ ! -f "$dir/DONE" ]; then RUN_ID="$(basename "$dir")"; fi
done
RESUMING=1
RESUMING_FLAG=(--resuming)
if [ -z "$RUN_ID" ]; then
  RESUMING_FLAG=()
  RUN_ID="$("$PY" -c 'from src.utils.common import new_run_id; print(new_run_id())')"; RESUMING=0
fi
RUN_DIR="models/$RUN_ID"
mkdir -p logs "$RUN_DIR" stats
LOG="logs/training_enhanced_${RUN_ID}.log"
STEP_OUT="logs/.step_output_${RUN_ID}.txt"  # the running step's output, for the failure message and email
OLD_LOGS=(logs/training_enhanced_*.log)
for ((i = 0; i < ${#OLD_LOGS[@]} - 4; i++)); do  # keep the newest 5 with this one (never this run's own)
  [ "${OLD_LOGS[$i]}" = "$LOG" ] || rm -f -- "${OLD_LOGS[$i]}"
done
exec > >(tee -a "$LOG") 2>&1

# The scripts send the start/failure/completion emails of the whole chain; the trainer then sends only its epoch
# and status emails (src/training/email_integration.py).
export THETA_NOTIFY_FROM_SCRIPT=1
export PYTHONUNBUFFERED=1

KB_MODULE="src/data_processing/knowledge_base_enhancer_main.py"
if [ -f "$KB_MODULE" ] && [ -d Datasets/knowledge ]; then KB_WHY="on (Datasets/knowledge/ found)"
elif [ -f "$KB_MODULE" ]; then KB_WHY="skipped (no Datasets/knowledge/ folder)"
else KB_WHY="skipped (knowledge_base_enhancer_main.py not installed)"
fi
if [ "$RESUMING" = 1 ] && [ -f Datasets/enhanced_training_data.json ]; then
  PREPARE_WHY="skipped: resuming, the run keeps the data it started with"
else
  PREPARE_WHY="Datasets/ to Datasets/enhanced_training_data.json ${PREPARE_PROFILE_FLAGS[*]:-}"
fi

echo "=============================================================================="
echo " Theta overnight run $RUN_ID$( [ $RESUMING = 1 ] && echo ' (resuming)')"
echo " started     $(date '+%Y-%m-%d %H:%M:%S')"
echo " profile     $PROFILE ($PROFILE_WHY)"
echo " device      $("$PY" -m src.utils.gpu_info --summary 2>/dev/null || echo unknown)"
echo " gpus        $GPUS$( [ "$GPUS" -gt 1 ] && echo ' (torchrun, one machine)')"
echo " python      $PY"
echo " run folder  $RUN_DIR"
echo " log         $LOG"
echo " data        $PREPARE_WHY"
echo " knowledge   $KB_WHY"
echo " trainer     --profile $PROFILE --resume auto ${TRAIN_EXTRA[*]:-}"
echo " tensorboard $( [ "$TENSORBOARD" = 1 ] && echo 'http://127.0.0.1:6006/' || echo off)"
echo " $("$PY" -m src.utils.email_notifier --show-config 2>&1 | tail -n 1)"
echo "=============================================================================="

STEP="start"
fail() {
  local code=$?
  trap - ERR
  echo
  # Prints the step, the log and the error, then sends the failure email (when email is configured).
  "$PY" -m src.training.email_integration failed --run_id "$RUN_ID" --run_dir "$RUN_DIR" --log "$LOG" \
    --step "$STEP" --exit_code "$code" --error_file "$STEP_OUT" --show || echo "FAILED at step '$STEP' (exit $code)"
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

if [ "$TENSORBOARD" = 1 ]; then
  "$PY" -m tensorboard.main --logdir models --host 127.0.0.1 --port 6006 >/dev/null 2>&1 &
  TB_PID=$!
  echo "tensorboard: http://127.0.0.1:6006/ (stops when this run ends)"
  trap 'kill "$TB_PID" 2>/dev/null || true' EXIT
fi

"$PY" -m src.training.email_integration start --run_id "$RUN_ID" --run_dir "$RUN_DIR" --log "$LOG" \
  --profile "$PROFILE" --gpus "$GPUS" --trainer_flags "${TRAIN_EXTRA[*]:-}" ${RESUMING_FLAG[@]+"${RESUMING_FLAG[@]}"} || true

# The knowledge base runs before preparation: prepare_data_for_training reads its outputs when they exist.
if [ "$KB_WHY" = "on (Datasets/knowledge/ found)" ] && [ "$RESUMING" = 0 ]; then
  run_step "knowledge base" "$PY" -m src.data_processing.knowledge_base_enhancer_main --datasets_dir Datasets
else
  skip_step "knowledge base" "$( [ "$RESUMING" = 1 ] && echo 'skipped: resuming' || echo "$KB_WHY")"
fi

if [ "$RESUMING" = 1 ] && [ -f Datasets/enhanced_training_data.json ]; then
  skip_step "prepare data" "$PREPARE_WHY"
elif ! run_step "prepare data" "$PY" -m src.data_processing.prepare_data_for_training \
    --datasets_dir Datasets \
    --output Datasets/enhanced_training_data.json \
    --test_set Datasets/test_set.json \
    --seed 42 \
    --validation_fraction 0.1 \
    ${PREPARE_PROFILE_FLAGS[@]+"${PREPARE_PROFILE_FLAGS[@]}"}; then
  if [ -f Datasets/enhanced_training_data.json ]; then
    echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
    echo "WARNING: data preparation FAILED; training on the PREVIOUS Datasets/enhanced_training_data.json"
    echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
  else
    false
  fi
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
  --test_data Datasets/test_set.json \
  --output_file "stats/evaluation_${RUN_ID}.json"

run_step "optimise for inference" "$PY" -m src.training.optimize_for_inference \
  --model_path "$RUN_DIR/theta_final" \
  --output_path "$RUN_DIR/theta_inference"

date +%Y-%m-%dT%H:%M:%S > "$RUN_DIR/DONE"
trap - ERR
rm -f -- "$STEP_OUT"
"$PY" -m src.training.email_integration completed --run_id "$RUN_ID" --run_dir "$RUN_DIR" --log "$LOG" || true
echo
echo "=============================================================================="
echo " Done: $RUN_ID  ($(date '+%Y-%m-%d %H:%M:%S'))"
echo " model       $RUN_DIR/theta_final"
echo " inference   $RUN_DIR/theta_inference"
echo " evaluation  stats/evaluation_${RUN_ID}.json"
echo " report      stats/$RUN_ID/"
echo " log         $LOG"
echo " try it      $PY -m src.model.theta_model chat --model_path $RUN_DIR/theta_final"
echo "=============================================================================="
