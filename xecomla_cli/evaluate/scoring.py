"""What the evaluations share: the decoder body, the device, the token that starts a document, and
log p(target) from hidden states (the LM head applied only where a target is scored)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import XecomlaError

Progress = Callable[[int], None]  # called with the amount of work just done
ProgressFactory = Callable[[str, int], Progress]  # (description, total) -> advance


def noop(_: int) -> None:
    pass


def body(model):
    """The decoder stack (hidden states out, no LM head)."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def prefix_token_id(tokenizer) -> int:
    """The token put before a document or an empty context: BOS, else EOS (as the harness)."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id):
        if tid is not None:
            return int(tid)
    raise XecomlaError("the tokenizer has no BOS, EOS or pad token to start a document with")


def max_length(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", None) or 2048)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without special tokens."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def token_log_probs(model, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """log p(target | hidden state) = log_softmax(W_head · hidden)[target] for rows of hidden (N, d).

    The LM head runs `chunk` rows at a time, so the (N, V) logits never exist at once."""
    head = model.get_output_embeddings()
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # (N,)
    for s in range(0, hidden.shape[0], chunk):
        logits = head(hidden[s : s + chunk]).float()  # (n, V)
        out[s : s + chunk] = logits.log_softmax(-1).gather(-1, targets[s : s + chunk, None]).squeeze(-1)
    return out


def sync(device: torch.device) -> None:
    """Wait for the GPU (timings)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def new_cache(model):
    """An empty transformers cache for `model`."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)
