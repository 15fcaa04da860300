"""Greedy chat answers from an exported model with plain transformers (no xecomla import).

python examples/generate.py runs/demo/export-r64 "What is the capital of France?" ["another prompt" ...]

Each argument after the model directory is one user message; each answer is printed on stderr.
"""

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

path, prompts = sys.argv[1], sys.argv[2:] or ["Tell me a short story."]
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
print(f"{type(model).__name__} ({model.config.model_type}), greedy:", file=sys.stderr)
for prompt in prompts:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    # an explicit all-ones mask: one inferred from the pad token would hide the prompt's own special tokens
    # (this tokenizer's EOS is <|im_start|>, and the pad may be <|im_end|>), and the chat headers with them
    mask = torch.ones_like(ids)
    pad = tokenizer.eos_token_id
    out = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=pad)
    reply = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    print(f"  {prompt!r} -> {reply!r}", file=sys.stderr)
