#!/usr/bin/env bash
# The experiment grid: one CLI call per run into log/<group>/<run>/.
#
#   bash train.sh                      every group under grid/ (the seed's grid and the studies)
#   GRID_GROUPS="all-200ep final-200ep" bash train.sh   (or: env GROUPS="..." bash train.sh)
#   GPUS="0 1 2 3" bash train.sh       one job per GPU in parallel
#   DRY_RUN=1 bash train.sh            print the commands only
#   EPOCHS=5 DATASET=fashion bash train.sh   override every run's epochs / dataset
#   EXTRA="--train-subset 5000" bash train.sh  extra flags appended to every run
#
# Each line of grid/<group>.txt is "<run-name> <command> <args...>". Finished runs (summary.json
# with "finished": true) are skipped; runs with a run directory are resumed (--resume).
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
LOG=${LOG:-log}
GRID_DIR=${GRID_DIR:-grid}
# GROUPS is a special variable in bash (the user's group ids): bash drops `GROUPS=x` typed at
# its prompt and shadows an inherited one, so read GRID_GROUPS, else GROUPS from the environment
# this process was started with (`env GROUPS=... bash train.sh`, or from zsh/sh).
SELECTED=${GRID_GROUPS:-$(tr '\0' '\n' < /proc/$$/environ 2>/dev/null | sed -n 's/^GROUPS=//p')}
if [ -z "$SELECTED" ]; then
  SELECTED=$(for f in "$GRID_DIR"/*.txt; do basename "$f" .txt; done | tr '\n' ' ')
fi
read -r -a GPU_LIST <<< "${GPUS:-}"

is_finished() {
  [ -f "$1/summary.json" ] && grep -q '"finished": true' "$1/summary.json"
}

commands=()
for group in $SELECTED; do
  file="$GRID_DIR/$group.txt"
  if [ ! -f "$file" ]; then
    echo "error: no grid file $file (groups: $(ls "$GRID_DIR" | sed 's/\.txt$//' | tr '\n' ' '))" >&2
    exit 2
  fi
  while read -r name cmd args; do
    [[ -z "${name:-}" || "$name" == \#* ]] && continue
    dir="$LOG/$group/$name"
    if is_finished "$dir"; then
      echo "skip (finished): $dir" >&2
      continue
    fi
    line="$PYTHON -m cifarlab $cmd $args --run-dir $dir"
    [ -n "${EPOCHS:-}" ] && line+=" --epochs $EPOCHS"
    [ -n "${DATASET:-}" ] && line+=" --dataset $DATASET"
    [ -n "${EXTRA:-}" ] && line+=" $EXTRA"
    [ -f "$dir/config.yaml" ] && line+=" --resume"
    commands+=("$line")
  done < "$file"
done

run_one() {  # $1: GPU id or "", $2: command
  local gpu=$1 cmd=$2 dir
  dir=$(sed -E 's/.*--run-dir ([^ ]+).*/\1/' <<< "$cmd")
  mkdir -p "$dir"
  echo "[$(date +%H:%M:%S)] ${gpu:+GPU $gpu: }$cmd" >&2
  if [ -n "$gpu" ]; then
    CUDA_VISIBLE_DEVICES=$gpu eval "$cmd" >> "$dir/stdout.txt" 2>&1 || echo "failed: $cmd (see $dir/stdout.txt)" >&2
  else
    eval "$cmd" 2>&1 | tee -a "$dir/stdout.txt" || echo "failed: $cmd" >&2
  fi
}

if [ -n "${DRY_RUN:-}" ]; then
  printf '%s\n' "${commands[@]}"
  exit 0
fi

if [ ${#GPU_LIST[@]} -le 1 ]; then
  for c in "${commands[@]}"; do run_one "${GPU_LIST[0]:-}" "$c"; done
else
  # one queue per GPU: job i goes to GPU i mod N; the queues run in parallel
  for i in "${!GPU_LIST[@]}"; do
    (
      for j in "${!commands[@]}"; do
        (( j % ${#GPU_LIST[@]} == i )) && run_one "${GPU_LIST[$i]}" "${commands[$j]}"
      done
    ) &
  done
  wait
fi
