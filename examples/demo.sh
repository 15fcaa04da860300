#!/usr/bin/env bash
# Every stage on the embedded demo model (SmolLM2-135M-Instruct), on CPU. The recipe (steps 2-4) was chosen on
# the quality-per-CPU-minute curve of bench/recipe_curve.py (docs/results/2026-12-07-recipe-curve.md).
# Run it with `make demo` (which sets up the environment first). Outputs go to $DEMO_DIR.
set -euo pipefail
DEMO_DIR=${DEMO_DIR:-runs/demo}
LOCAL_TOKENS=${LOCAL_TOKENS:-16k}  # local (layer-wise) distillation
TOKENS=${TOKENS:-32k}              # global distillation
DATA=${DATA:-teacher}              # chat turns sampled from the teacher (cached); 'demo' for Shakespeare
METHOD=${METHOD:-}                 # empty: init-svd's default; 'paper': the X-EcoMLA paper's data-free init
CALIB=${CALIB:-teacher+shakespeare} # calibration text: half the model's own chat text, half the plays (the curve's best)
GREEDY=${GREEDY:-0.5}              # fraction of KD blocks with the teacher's greedy answers (sequence-level KD)
INIT_FLAGS=${INIT_FLAGS:-}         # more init-svd options, e.g. --no-latent-norm (the export then needs biases)
LLAMA_CPP_BIN=${LLAMA_CPP_BIN:-$(dirname "$(command -v xecomla)")/../llama.cpp/bin}  # built by make setup
mkdir -p "$DEMO_DIR"
step() { printf '\n\033[1m== %s\033[0m  (%d:%02d elapsed)\n' "$*" $((SECONDS / 60)) $((SECONDS % 60)) >&2; }
quality() { xecomla eval "$1" --no-kv >/dev/null; }   # LAMBADA perplexity, table on stderr
timed() {  # timed STEP CMD...: CMD's wall, user and sys seconds in $DEMO_DIR/time-STEP.txt (bench/recipe_curve.py --adopt-demo)
  local name=$1; shift
  if [ -x /usr/bin/time ]; then /usr/bin/time -o "$DEMO_DIR/time-$name.txt" -f "%e %U %S" "$@"; else "$@"; fi
}

step "1/7 inspect: architecture, KV cache, latent-rank budget"
xecomla inspect demo --ranks 32,64,128,256

step "2/7 init-svd: SVD initialisation (${METHOD:-the default method}, calibrated on $CALIB text), 4x smaller KV cache (r=64, p=32)"
# shellcheck disable=SC2086 (INIT_FLAGS: several words)
INIT=$(timed init xecomla init-svd demo --kv-rank 64 ${METHOD:+--method "$METHOD"} --calib-data "$CALIB" $INIT_FLAGS \
  -o "$DEMO_DIR/init-r64" --force)
quality "$INIT"

step "3/7 distill --local: each converted layer trained to match the teacher's attention ($LOCAL_TOKENS tokens of $DATA text)"
LOCAL=$(timed local xecomla distill "$INIT" --local --data "$DATA" --tokens "$LOCAL_TOKENS" --local-inputs student \
  -o "$DEMO_DIR/local-r64" --force)
quality "$LOCAL"

step "4/7 distill: KL distillation from the original model ($TOKENS tokens of $DATA text, $GREEDY of it greedy answers)"
# --lr 5e-5, not the default 3e-4: after --local the student is close to the teacher, and at 3e-4
# the latent-norm model diverged (LAMBADA 123 -> 182; 5e-5: 123 -> 109; docs/results/2026-12-04-kd-lr-after-local.md)
DISTILLED=$(timed kd xecomla distill "$LOCAL" --data "$DATA" --tokens "$TOKENS" --lr 5e-5 --greedy-answers "$GREEDY" \
  -o "$DEMO_DIR/distill-r64" --force)

step "5/7 eval: held-out perplexity, zero-shot accuracy and measured KV memory, student vs teacher"
xecomla eval "$DISTILLED" --teacher demo --limit 100 --tasks arc_easy,piqa >/dev/null

step "6/7 export: DeepSeek-V3 layout that stock transformers loads, with a model card"
EXPORTED=$(xecomla export "$DISTILLED" -o "$DEMO_DIR/export-r64" --force)
python examples/generate.py "$EXPORTED" "What is the capital of France?" "Name three primary colors." \
  "Why do we have seasons?"

step "7/7 export --format gguf: one llama.cpp file (deepseek2), checked in llama.cpp before it is written; llama.cpp runs it"
GGUF=$(xecomla export "$DISTILLED" --format gguf --outtype f16 -o "$DEMO_DIR/mla-r64.gguf" --force)
"$LLAMA_CPP_BIN/llama-completion" -m "$GGUF" -p "The capital of France is" -n 24 --temp 0 -no-cnv -fa on -ctk q8_0 -ctv q8_0 >&2 2>/dev/null
echo >&2
printf '\ndone in %d:%02d\n' $((SECONDS / 60)) $((SECONDS % 60)) >&2
echo "$EXPORTED"
