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
# with "finished": true) are skipped; runs with a run directory are resumed (--resume). A run
# directory in use by another process is refused (the other runs go on).
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
# One grid runner (cifarlab.train.grid.run_grid): this script only turns its environment into
# the flags of `python -m cifarlab grid`.
args=(--grid-dir "$GRID_DIR" --log "$LOG")
[ -n "${EPOCHS:-}" ] && args+=(--epochs "$EPOCHS")
[ -n "${DATASET:-}" ] && args+=(--dataset "$DATASET")
[ -n "${EXTRA:-}" ] && args+=(--extra "$EXTRA")
[ -n "${GPUS:-}" ] && args+=(--gpus "$GPUS")
[ -n "${DRY_RUN:-}" ] && args+=(--dry-run)
# shellcheck disable=SC2086  # SELECTED is a space-separated list of group names
exec "$PYTHON" -m cifarlab grid $SELECTED "${args[@]}"
