#!/usr/bin/env bash
# The engine-exact RoPE construction's analogue on the demo (issue #35): the slowest frequency pairs
# without RoPE (init-svd --rope-span 16: TransMLA's fold over the 16 fastest of 32 pairs) against
# today's default (the fold over every pair), through make demo's first steps: the init, then the
# 16k-token local step (student inputs, teacher text); LAMBADA after each, and the per-layer
# attention error against the original on held-out Shakespeare (bench/engine_rope.py demo).
#
#   bash bench/engine_rope_demo.sh runs/engine-rope     # writes OUT/{default,span16}{,-local}, *.eval.json, layers.json
set -euo pipefail
OUT=${1:-runs/engine-rope}
mkdir -p "$OUT"
lambada() { [ -s "$1.eval.json" ] || xecomla eval "$1" --no-kv --json >"$1.eval.json"; }
for name in default span16; do
  flags=""; [ "$name" = span16 ] && flags="--rope-span 16"
  [ -d "$OUT/$name" ] || xecomla -q init-svd demo --kv-rank 64 $flags -o "$OUT/$name" >/dev/null
  lambada "$OUT/$name"
  [ -d "$OUT/$name-local" ] || xecomla -q distill "$OUT/$name" --local --data teacher --tokens 16k \
    --local-inputs student -o "$OUT/$name-local" >/dev/null
  lambada "$OUT/$name-local"
done
[ -s "$OUT/layers.json" ] || python "$(dirname "$0")/engine_rope.py" demo --eval-len 512 \
  --ckpt "$OUT/default" --ckpt "$OUT/span16" --ckpt "$OUT/default-local" --ckpt "$OUT/span16-local" >"$OUT/layers.json"
