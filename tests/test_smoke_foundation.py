import torch

from xecomla_cli.sources import load_model


def test_tiny_model_loads(tiny_model_dir):
    lm = load_model(str(tiny_model_dir("llama")))
    ids = lm.tokenizer("The quick brown fox", return_tensors="pt")["input_ids"]
    assert lm.model(ids).logits.shape[-1] == 300
    assert lm.family == "llama" and not lm.is_mla
    assert torch.isfinite(lm.model(ids).logits).all()
