#!/usr/bin/env bash
# The stages chained in one shell pipe: each prints its output directory on stdout, the next
# reads it with '-'. Usage: bash examples/pipeline.sh [SOURCE] [RANK] [TOKENS] [METHOD]
set -euo pipefail
SOURCE=${1:-demo}
RANK=${2:-64}
TOKENS=${3:-50k}
METHOD=${4:-paper}   # or e.g. deepseek: a calibrated init that still exports to the DeepSeek-V3 layout
xecomla init-svd "$SOURCE" --kv-rank "$RANK" --method "$METHOD" --force \
  | xecomla distill - --tokens "$TOKENS" --force \
  | xecomla eval - --teacher "$SOURCE" --limit 100 --tasks arc_easy,piqa \
  | xecomla export - --force
