#!/usr/bin/env bash
# Theta overnight run: prepare the data, train, evaluate and optimise, in one unattended command.
#
#   ./train_overnight_enhanced.sh --profile quick          # theta-tiny, CPU, the whole pipeline in minutes
#   ./train_overnight_enhanced.sh                          # rtx3060 on a CUDA GPU, quick otherwise
#   ./train_overnight_enhanced.sh --gpus 2 --tensorboard -- --epochs 10 --learning_rate 5e-5
#
# Expected time: quick about 2-4 minutes on 2 CPU cores; rtx3060 (gpt2-medium) most of a night on an RTX 3060.
# Disk: the venv about 1.6 GB (CPU torch); a quick run about 100 MB; a gpt2-medium run about 6 GB with checkpoints.
# Re-running the same command after a crash or a kill resumes the unfinished run (the newest models/<run>/
# without a DONE marker). train_overnight_enhanced.bat runs the same steps with the same flags in the same order.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

usage() {
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
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
if [ -z "$RUN_ID" ]; then
  RUN_ID="theta_enhanced_$(date +%Y%m%d_%H%M%S)"; RESUMING=0
fi
RUN_DIR="models/$RUN_ID"
mkdir -p logs "$RUN_DIR" stats
LOG="logs/training_enhanced_${RUN_ID}.log"
OLD_LOGS=(logs/training_enhanced_*.log)
for ((i = 0; i < ${#OLD_LOGS[@]} - 4; i++)); do rm -f -- "${OLD_LOGS[$i]}"; done  # keep the newest 5 with this one
exec > >(tee -a "$LOG") 2>&1

echo "=============================================================================="
echo " Theta overnight run $RUN_ID$( [ $RESUMING = 1 ] && echo ' (resuming)')"
echo " profile     $PROFILE ($PROFILE_WHY)"
echo " gpus        $GPUS"
echo " python      $PY"
echo " run folder  $RUN_DIR"
echo " log         $LOG"
echo " extra flags ${TRAIN_EXTRA[*]:-(none)}"
echo "=============================================================================="

STEP="start"
fail() {
  local code=$?
  echo
  echo "FAILED at step '$STEP' (exit $code). Log: $LOG"
  exit "$code"
}
trap fail ERR

if [ "$TENSORBOARD" = 1 ]; then
  "$PY" -m tensorboard.main --logdir models --host 127.0.0.1 --port 6006 >/dev/null 2>&1 &
  echo "tensorboard: http://127.0.0.1:6006/ (stops when this run ends)"
  trap 'kill %1 2>/dev/null || true' EXIT
fi

STEP="prepare data"
echo; echo "[1/4] $STEP"
if ! "$PY" -m src.data_processing.prepare_data_for_training \
    --datasets_dir Datasets \
    --output Datasets/enhanced_training_data.json \
    --test_set Datasets/test_set.json \
    --seed 42 \
    --validation_fraction 0.1; then
  if [ -f Datasets/enhanced_training_data.json ]; then
    echo "WARNING: data preparation failed; training on the PREVIOUS Datasets/enhanced_training_data.json"
  else
    false
  fi
fi

STEP="train"
echo; echo "[2/4] $STEP"
if [ "$GPUS" -gt 1 ]; then
  LAUNCH=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$GPUS")
else
  LAUNCH=("$PY")
fi
"${LAUNCH[@]}" -m src.training.train_enhanced \
  --profile "$PROFILE" \
  --data_path Datasets/enhanced_training_data.json \
  --output_dir "$RUN_DIR" \
  --resume auto \
  ${TRAIN_EXTRA[@]+"${TRAIN_EXTRA[@]}"}

STEP="evaluate"
echo; echo "[3/4] $STEP"
"$PY" -m src.training.evaluate_model \
  --model_path "$RUN_DIR/theta_final" \
  --test_data Datasets/test_set.json \
  --output_file "stats/evaluation_${RUN_ID}.json"

STEP="optimise for inference"
echo; echo "[4/4] $STEP"
"$PY" -m src.training.optimize_for_inference \
  --model_path "$RUN_DIR/theta_final" \
  --output_path "$RUN_DIR/theta_inference"

date +%Y-%m-%dT%H:%M:%S > "$RUN_DIR/DONE"
trap - ERR
echo
echo "=============================================================================="
echo " Done: $RUN_ID"
echo " model       $RUN_DIR/theta_final"
echo " inference   $RUN_DIR/theta_inference"
echo " evaluation  stats/evaluation_${RUN_ID}.json"
echo " log         $LOG"
echo " try it      $PY -m src.model.theta_model chat --model_path $RUN_DIR/theta_final"
echo "=============================================================================="
