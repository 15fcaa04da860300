#!/usr/bin/env bash
# One init recipe on the demo, as the methods tables in docs/methods.md measure it: init-svd with a
# method, a budget and a calibration text, LAMBADA perplexity, the same 8k-token local distillation
# (teacher text, student inputs), LAMBADA again. Each step is skipped when its output exists.
#
#   bash bench/init_recipe.sh METHOD KV_RANK ROPE_DIM CALIB OUT_DIR
#   bash bench/init_recipe.sh transmla 64 32 teacher runs/recipes       # the default at 4x
#   bash bench/init_recipe.sh transmla 32 16 shakespeare runs/recipes   # TransMLA's preset on Shakespeare, 8x
#
# Prints nothing; writes OUT_DIR/NAME{,-local} checkpoints and OUT_DIR/NAME{,-local}.eval.json
# (NAME = METHOD-rKV_RANK-CALIB). Summarise with: python bench/init_recipe_table.py OUT_DIR
set -euo pipefail
M=$1 R=$2 P=$3 CALIB=$4 OUT=$5
N="$OUT/$(echo "$M" | tr '+' '-')-r$R-$CALIB"
mkdir -p "$OUT"
[ -d "$N" ] || xecomla -q init-svd demo --kv-rank "$R" --rope-dim "$P" --method "$M" --calib-data "$CALIB" -o "$N" >/dev/null
[ -s "$N.eval.json" ] || xecomla eval "$N" --no-kv --json >"$N.eval.json"
[ -d "$N-local" ] || xecomla -q distill "$N" --tokens 8k --seq-len 512 --batch-size 4 --local --data teacher \
  --local-inputs student -o "$N-local" >/dev/null
[ -s "$N-local.eval.json" ] || xecomla eval "$N-local" --no-kv --json >"$N-local.eval.json"
