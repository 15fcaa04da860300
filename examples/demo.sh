#!/usr/bin/env bash
# Every stage on the embedded demo model (SmolLM2-135M-Instruct), on CPU, in a few minutes.
# Run it with `make demo` (which sets up the environment first). Outputs go to $DEMO_DIR.
set -euo pipefail
DEMO_DIR=${DEMO_DIR:-runs/demo}
TOKENS=${TOKENS:-50k}
mkdir -p "$DEMO_DIR"
step() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }

step "1/5 inspect: architecture, KV cache, latent-rank budget"
xecomla inspect demo --ranks 32,64,128,256

METHOD=${METHOD:-deepseek}   # 'paper' for the X-EcoMLA paper's data-free init (see README: init methods)
step "2/5 init-svd: SVD initialisation ($METHOD), 4x smaller KV cache (r=64, p=32)"
INIT=$(xecomla init-svd demo --kv-rank 64 --method "$METHOD" -o "$DEMO_DIR/init-r64" --force)

step "3/5 distill: KL distillation from the original model ($TOKENS tokens of public-domain text)"
DISTILLED=$(xecomla distill "$INIT" --tokens "$TOKENS" -o "$DEMO_DIR/distill-r64" --force)

step "4/5 eval: held-out perplexity, zero-shot accuracy and measured KV memory, student vs teacher"
xecomla eval "$INIT" --limit 100 --tasks arc_easy,piqa >/dev/null
xecomla eval "$DISTILLED" --teacher demo --limit 100 --tasks arc_easy,piqa >/dev/null

step "5/5 export: DeepSeek-V3 layout that stock transformers loads, with a model card"
EXPORTED=$(xecomla export "$DISTILLED" -o "$DEMO_DIR/export-r64" --force)
python examples/generate.py "$EXPORTED" "What is the capital of France?"
echo "$EXPORTED"
