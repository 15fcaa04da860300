"""The configs of the models people convert, as their config.json files on the Hub give them (the
fields that set the shapes, RoPE and biases). The benchmarks build random-weight models of these
shapes: nothing is downloaded, and the cost of a stage depends on the shapes, not on the weights.

    config("llama-3.2-1b")                       # a transformers config (LlamaConfig / Qwen2Config)
    config("llama-3.1-8b", num_hidden_layers=4)  # the same width at another depth
"""

from __future__ import annotations

LLAMA3_ROPE = {  # Llama 3.1 / 3.2: rope_type llama3 (factor 8 for 3.1, 32 for 3.2)
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

REAL = {
    # name: (family, config fields)
    "smollm2-135m": (
        "llama",
        dict(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
            max_position_embeddings=8192,
        ),
    ),
    "llama-3.2-1b": (
        "llama",
        dict(
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            tie_word_embeddings=True,
            rope_parameters=LLAMA3_ROPE,
            max_position_embeddings=131072,
        ),
    ),
    "llama-3.2-3b": (
        "llama",
        dict(
            vocab_size=128256,
            hidden_size=3072,
            intermediate_size=8192,
            num_hidden_layers=28,
            num_attention_heads=24,
            num_key_value_heads=8,
            head_dim=128,
            tie_word_embeddings=True,
            rope_parameters=LLAMA3_ROPE,
            max_position_embeddings=131072,
        ),
    ),
    "llama-3.1-8b": (
        "llama",
        dict(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            tie_word_embeddings=False,
            rope_parameters=LLAMA3_ROPE | {"factor": 8.0},
            max_position_embeddings=131072,
        ),
    ),
    "qwen2.5-0.5b": (
        "qwen2",
        dict(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            head_dim=64,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
        ),
    ),
    "qwen2.5-7b": (
        "qwen2",
        dict(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            head_dim=128,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            max_position_embeddings=131072,
            rms_norm_eps=1e-6,
        ),
    ),
}


def fields(name: str, **overrides) -> dict:
    """The config fields of a real model, with overrides (num_hidden_layers=4, vocab_size=..., ...)."""
    return REAL[name][1] | overrides


def family(name: str) -> str:
    return REAL[name][0]


def config(name: str, **overrides):
    """A transformers config of a real model's shape (LlamaConfig or Qwen2Config)."""
    from transformers import LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family(name)]
    return cls(**fields(name, **overrides))


DEFAULT_ROPE_500K = {"rope_type": "default", "rope_theta": 500000.0}  # Llama 3's θ without the llama3 scaling
