"""Shared fixtures: tiny random Llama / Qwen2 / Mistral / MHA models saved as HF directories.

Everything runs offline on 2 CPU cores: the tokenizer is a tiny byte-level BPE trained here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory) -> Path:
    """Every cache the code (or a CLI subprocess) writes goes under this session's tmp dir, never
    into the user's ~/.cache (cache_dir.CACHE_ENV)."""
    root = tmp_path_factory.mktemp("xecomla-cache")
    os.environ["XECOMLA_CACHE"] = str(root)
    return root


TEXT = (
    "The quick brown fox jumps over the lazy dog. A latent vector holds keys and values. "
    "Multi-head latent attention caches one small vector per token instead of per-head keys. "
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate. "
    "0 1 2 3 4 5 6 7 8 9 question answer: yes no maybe."
)

# Small but not trivial: GQA with 4 query heads over 2 KV heads, head dim 16.
BASE = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)


def make_tokenizer():
    """A byte-level BPE tokenizer (vocab 300) with a chat template, trained on TEXT."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT] * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return fast


def make_model(family: str = "llama", seed: int = 0, **overrides):
    """A tiny random causal LM of the given family (llama, qwen2, mistral, mha)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    torch.manual_seed(seed)
    cfg = {**BASE, **overrides}
    if family == "mha":
        cfg["num_key_value_heads"] = cfg["num_attention_heads"]
        config = LlamaConfig(**cfg)
    elif family == "llama":
        config = LlamaConfig(**cfg)
    elif family == "qwen2":
        config = Qwen2Config(**cfg)
    elif family == "mistral":
        config = MistralConfig(**cfg)
    else:
        raise ValueError(family)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Larger-than-default weights so attention is far from uniform and errors show up.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj" in name and p.dim() == 2:
                p.normal_(0, 0.08)
            elif name.endswith("bias"):
                p.normal_(0, 0.05)
    return model.eval()


# Llama 3.1/3.2 RoPE scaling at a tiny original context (exports must carry or refuse its factors)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def calib_ids(batch: int = 2, seq: int = 32, seed: int = 0) -> torch.Tensor:
    """(batch, seq) random token ids: calibration text for a tiny model (the latent norm's channel
    and the data-aware methods are fitted on it)."""
    return torch.randint(0, 300, (batch, seq), generator=torch.Generator().manual_seed(seed))


def save_model(model, directory: Path) -> Path:
    model.save_pretrained(directory)
    make_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: tiny_model_dir('qwen2') -> a saved HF directory (cached per session)."""
    cache: dict[tuple, Path] = {}

    def get(family: str = "llama", **overrides) -> Path:
        key = (family, tuple(sorted(overrides.items())))
        if key not in cache:
            d = tmp_path_factory.mktemp(f"tiny-{family}")
            cache[key] = save_model(make_model(family, **overrides), d)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def demo_available() -> bool:
    import importlib.util

    from xecomla_cli.text.bundled import DEMO_MODEL_PACKAGE

    return importlib.util.find_spec(DEMO_MODEL_PACKAGE) is not None
