#!/usr/bin/env bash
# One init recipe on the demo, as the tables in docs/results/2026-12-04-*.md measure it: init-svd with a
# method, a budget and a calibration text, LAMBADA perplexity, the same 8k-token local distillation
# (teacher text, student inputs), LAMBADA again. Each step is skipped when its output exists.
#
#   bash bench/init_recipe.sh METHOD KV_RANK ROPE_DIM CALIB OUT_DIR
#   bash bench/init_recipe.sh transmla 64 32 teacher runs/recipes       # the default at 4x
#   bash bench/init_recipe.sh transmla 32 16 shakespeare runs/recipes   # TransMLA's preset on Shakespeare, 8x
#
# RECIPE=init: the init and its LAMBADA only. RECIPE=demo: make demo's steps 3-4 instead of the 8k
# local step (examples/demo.sh: the 16k local step, then KD on 32k tokens at --lr 5e-5), LAMBADA
# after each; with TASKS=N also the six-task average after KD at N questions per task
# (NAME-demo-kd.tasks.json).
#
# Prints nothing; writes OUT_DIR/NAME{,-local} (RECIPE=demo: NAME{,-demo-local,-demo-kd})
# checkpoints and their .eval.json (NAME = METHOD-rKV_RANK-CALIB). Summarise with:
# python bench/init_recipe_table.py OUT_DIR
set -euo pipefail
M=$1 R=$2 P=$3 CALIB=$4 OUT=$5
N="$OUT/$(echo "$M" | tr '+' '-')-r$R-$CALIB"
mkdir -p "$OUT"
lambada() { [ -s "$1.eval.json" ] || xecomla eval "$1" --no-kv --json >"$1.eval.json"; }
[ -d "$N" ] || xecomla -q init-svd demo --kv-rank "$R" --rope-dim "$P" --method "$M" --calib-data "$CALIB" -o "$N" >/dev/null
lambada "$N"
[ "${RECIPE:-}" = init ] && exit 0  # the init and its LAMBADA only
if [ "${RECIPE:-}" = demo ]; then
  [ -d "$N-demo-local" ] || xecomla -q distill "$N" --local --data teacher --tokens 16k --local-inputs student \
    -o "$N-demo-local" >/dev/null
  lambada "$N-demo-local"
  [ -d "$N-demo-kd" ] || xecomla -q distill "$N-demo-local" --data teacher --tokens 32k --lr 5e-5 -o "$N-demo-kd" >/dev/null
  lambada "$N-demo-kd"
  if [ -n "${TASKS:-}" ] && [ ! -s "$N-demo-kd.tasks.json" ]; then
    xecomla -q eval "$N-demo-kd" --no-kv --json --tasks default --limit "$TASKS" >"$N-demo-kd.tasks.json"
  fi
  exit 0
fi
[ -d "$N-local" ] || xecomla -q distill "$N" --tokens 8k --seq-len 512 --batch-size 4 --local --data teacher \
  --local-inputs student -o "$N-local" >/dev/null
lambada "$N-local"
