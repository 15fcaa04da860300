"""Verification before the export is renamed into place: stock transformers must reproduce our model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import XecomlaError
from ..loaded import parse_dtype
from .records import ExportPlan

# Logit agreement the written model must reach before the directory is renamed into place,
# relative to the largest |logit|, computed in fp32 (bf16: against our weights rounded to bf16);
# `verify_export` widens it to the model's own numerical noise. Mapping errors show up as O(1)
# differences; rounding alone gives ~1e-6 on tiny models and ~1e-4 on the 30-layer demo.
VERIFY_RTOL = {"float32": 1e-3, "bfloat16": 2e-3}
# The verification holds the checkpoint's model and the export's whole, in fp32 (plus a copy for a bf16 export):
# about 12 bytes per parameter. Above this many parameters the export is written unverified, with a note saying so.
VERIFY_MAX_PARAMETERS = 500_000_000
VERIFY_TEXT = (
    "The quick brown fox jumps over the lazy dog. Shall I compare thee to a summer's day? "
    "Multi-head latent attention caches one small vector per token."
)


def verify_inputs(tokenizer, vocab_size: int, length: int = 48) -> torch.Tensor:
    ids = tokenizer(VERIFY_TEXT, return_tensors="pt")["input_ids"][:, :length]
    if ids.shape[1] < 8:
        ids = torch.randint(0, vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    return ids


def not_verified_note(parameters: int) -> str:
    """The plan's note when a model is too large for ``verify_export``."""
    return (
        f"not verified: {parameters / 1e9:.2f}B parameters, above the verification's "
        f"{VERIFY_MAX_PARAMETERS / 1e9:.1f}B "
        "(it holds the checkpoint's model and the export's whole, in fp32); --no-verify silences this note"
    )


@torch.no_grad()
def verify_export(directory: Path, loaded, plan: ExportPlan) -> dict[str, Any]:
    """Load the written directory with stock transformers (no remote code) and compare logits and
    a short greedy continuation with xecomla's model of the checkpoint (fp32 compute).

    The allowed difference is the larger of a fixed relative tolerance and the model's own
    numerical noise: twice our model's SDPA-vs-eager difference, and for a bf16 export half of
    what computing our model in bf16 changes (an ill-conditioned model, e.g. an untrained paper
    init, amplifies ulp-level differences a thousandfold).
    """
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, trust_remote_code=False).eval()
    ours = loaded.model
    dtype = parse_dtype(plan.dtype)
    restore = {k: v.clone() for k, v in ours.state_dict().items()} if plan.dtype != "float32" else None
    if restore is not None:  # compare against our model with weights rounded the same way
        for k, t in ours.state_dict().items():
            if t.is_floating_point() and not k.endswith("rope_inv_freq"):  # kept in fp32 by design
                t.copy_(t.to(dtype).float())
    impl = ours.config._attn_implementation
    try:
        ids = verify_inputs(loaded.tokenizer, loaded.config.vocab_size).to(next(ours.parameters()).device)
        a = ours(ids).logits.float()
        b = exported(ids.to(exported.device)).logits.float()
        gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=loaded.tokenizer.pad_token_id or 0)
        prompt = ids[:, :16]
        out_ours = ours.generate(prompt, **gen)[0, prompt.shape[1] :].tolist()
        out_exp = exported.generate(prompt.to(exported.device), **gen)[0, prompt.shape[1] :].tolist()
        ours.config._attn_implementation = "eager"
        noise = (ours(ids).logits.float() - a).abs().max().item()
        ours.config._attn_implementation = impl
        noise_dtype = 0.0
        if restore is not None:
            ours.to(dtype)
            noise_dtype = (ours(ids).logits.float() - a).abs().max().item()
    finally:
        ours.config._attn_implementation = impl
        if restore is not None:
            ours.float()
            ours.load_state_dict(restore)
    scale = a.abs().max().item()
    diff = (a - b).abs().max().item()
    allowed = max(VERIFY_RTOL[plan.dtype] * scale, 2 * noise, 0.5 * noise_dtype)
    report = {
        "max_abs_logit_diff": diff,
        "max_abs_logit": scale,
        "relative": diff / max(scale, 1e-30),
        "allowed": allowed,
        "noise_sdpa_vs_eager": noise,
        "greedy_tokens_equal": out_ours == out_exp,
        "tokens": len(ids[0]),
    }
    if restore is not None:
        report[f"noise_{plan.dtype}_compute"] = noise_dtype
    if diff > allowed:
        raise XecomlaError(
            f"the exported model's logits differ from xecomla's by {diff:.3g} (max |logit| {scale:.3g}, allowed "
            f"{allowed:.3g}): nothing was written; report this with the checkpoint's xecomla.json"
        )
    return report
