"""Evaluation of an original or MLA model, offline, one idea per module:

perplexity       rolling-window perplexity of held-out documents
multiple_choice  zero-shot multiple choice as lm-evaluation-harness scores it (packed rows)
kv_memory        the KV cache measured from its tensors, against the original's
speed            prefill and greedy decode speed, attention time per step
tasks            the benchmark data (harness prompt formats), LAMBADA, --ppl-data text
options          what an eval measures (`EvalOptions`), checked before any model loads
run              `run_eval`: the model and its teacher or original, every metric asked for
record           the results merged into a checkpoint's xecomla.json
report           the comparison table the command prints
common           what they share: decoder body, device, prefix token, target log-probs
"""
