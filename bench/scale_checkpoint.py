"""Random-weight models of a real model's shape, written one decoder layer at a time (memory: one layer), for
measuring the streamed stages at scale: an original Hugging Face directory and an MLA stage checkpoint of it.

    python bench/scale_checkpoint.py DIR --shape llama-3.2-1b [--layers 4] [--rope llama3]

writes DIR/hf (LlamaForCausalLM, bf16, the demo's tokenizer) and DIR/ckpt (an init-svd-like checkpoint: every
layer MLA at r=128, p=32, latent norm, default RoPE at the source's theta; random weights of the right scale).
Weights are random (seeded): sizes, dtypes and file layout are what matter here, not the values.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import real_configs  # noqa: E402

SHAPES = {
    # Llama-3.2-1B's config (tied embeddings) and Llama-3.1-8B's (untied).
    "llama-3.2-1b": dict(
        hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64, inter=8192, vocab=128256, tied=True
    ),
    "llama-3.1-8b": dict(
        hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, inter=14336, vocab=128256, tied=False
    ),
}


def demo_tokenizer_dir() -> Path:
    from xecomla_cli.cache_dir import cache_root

    found = sorted((cache_root() / "gguf").glob("SmolLM2-135M-Instruct*/tokenizer.json"))
    if not found:
        raise SystemExit("the demo's de-quantized directory is not cached: run `xecomla inspect demo` once")
    return found[0].parent


def llama_config(s: dict, rope: str) -> dict:
    params = dict(real_configs.LLAMA3_ROPE) if rope == "llama3" else dict(real_configs.DEFAULT_ROPE_500K)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "head_dim": s["head_dim"],
        "hidden_act": "silu",
        "hidden_size": s["hidden"],
        "initializer_range": 0.02,
        "intermediate_size": s["inter"],
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "num_attention_heads": s["heads"],
        "num_hidden_layers": s["layers"],
        "num_key_value_heads": s["kv_heads"],
        "rms_norm_eps": 1e-5,
        "rope_parameters": params,
        "tie_word_embeddings": s["tied"],
        "dtype": "bfloat16",
        "vocab_size": s["vocab"],
    }


def rand(g: torch.Generator, *shape: int) -> torch.Tensor:
    fan_in = shape[-1]
    return (torch.randn(*shape, generator=g) / fan_in**0.5).to(torch.bfloat16)


class ShardWriter:
    """Tensors appended group by group, a shard written whenever it passes ``limit`` bytes; index at the end."""

    def __init__(self, directory: Path, limit: int = 2 * 1024**3):
        self.directory, self.limit = directory, limit
        self.pending: dict[str, torch.Tensor] = {}
        self.files: list[list[str]] = []

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        self.pending.update(tensors)
        if sum(t.numel() * t.element_size() for t in self.pending.values()) >= self.limit:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if self.pending:
            save_file(self.pending, self.directory / f"part-{len(self.files)}.safetensors", metadata={"format": "pt"})
            self.files.append(list(self.pending))
            self.pending = {}

    def close(self) -> None:
        self._flush()
        n = len(self.files)
        weight_map = {}
        for k, names in enumerate(self.files):
            name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            (self.directory / f"part-{k}.safetensors").rename(self.directory / name)
            weight_map.update(dict.fromkeys(names, name))
        index = {"metadata": {}, "weight_map": weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def build(out: Path, shape: str, layers: int | None, rope: str, kv_rank: int = 128, rope_dim: int = 32) -> None:
    from xecomla_cli.mla.rope import default_inv_freq
    from xecomla_cli.mla.spec import MLASpec

    s = dict(SHAPES[shape])
    if layers:
        s["layers"] = layers
    cfg = llama_config(s, rope)
    d, H, G, h, L = s["hidden"], s["heads"], s["kv_heads"], s["head_dim"], s["layers"]
    hf, ckpt = out / "hf", out / "ckpt"
    for directory in (hf, ckpt):
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        for f in demo_tokenizer_dir().iterdir():
            if f.name.startswith(("tokenizer", "chat_template")):
                shutil.copy2(f, directory / f.name)
        (directory / "config.json").write_text(json.dumps(cfg, indent=2))
        (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    g = torch.Generator().manual_seed(0)
    writers = {"hf": ShardWriter(hf), "ckpt": ShardWriter(ckpt)}
    embed = rand(g, s["vocab"], d)
    common = {"model.embed_tokens.weight": embed, "model.norm.weight": torch.ones(d, dtype=torch.bfloat16)}
    if not s["tied"]:
        common["lm_head.weight"] = rand(g, s["vocab"], d)
    for w in writers.values():
        w.add(common)
    del embed, common
    theta = float(cfg["rope_parameters"]["rope_theta"])
    for i in range(L):
        pre = f"model.layers.{i}."
        shared = {
            pre + "input_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
            pre + "post_attention_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
            pre + "mlp.gate_proj.weight": rand(g, s["inter"], d),
            pre + "mlp.up_proj.weight": rand(g, s["inter"], d),
            pre + "mlp.down_proj.weight": rand(g, d, s["inter"]),
        }
        a = pre + "self_attn."
        writers["hf"].add(
            {
                **shared,
                a + "q_proj.weight": rand(g, H * h, d),
                a + "k_proj.weight": rand(g, G * h, d),
                a + "v_proj.weight": rand(g, G * h, d),
                a + "o_proj.weight": rand(g, d, H * h),
            }
        )
        writers["ckpt"].add(
            {
                **shared,
                a + "q_proj.weight": rand(g, H * h, d),
                a + "kv_a_proj_with_mqa.weight": rand(g, kv_rank + rope_dim, d),
                a + "kv_a_layernorm.weight": torch.ones(kv_rank, dtype=torch.bfloat16),
                a + "kv_b_proj.weight": rand(g, H * (h - rope_dim + h), kv_rank),
                a + "o_proj.weight": rand(g, d, H * h),
                a + "rope_inv_freq": default_inv_freq(theta, rope_dim).float(),
            }
        )
    for w in writers.values():
        w.close()
    spec = MLASpec(
        num_layers=L,
        hidden_size=d,
        num_heads=H,
        num_kv_heads=G,
        head_dim=h,
        rope_dim=rope_dim,
        kv_ranks=[kv_rank] * L,
        latent_norm=True,
        method="paper",
        rope_frequencies="default",
    )
    meta = {
        "format_version": 1,
        "stage": "init-svd",
        "xecomla_version": "bench",
        "created": "2026-12-07T00:00:00+00:00",
        "source": str(hf.resolve()),
        "parent": None,
        "command": "bench/scale_checkpoint.py (random weights)",
        "dtype": "bfloat16",
        "mla": spec.to_dict(),
        "metrics": {},
    }
    (ckpt / "xecomla.json").write_text(json.dumps(meta, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    ap.add_argument("--layers", type=int, default=None, help="fewer (or more) layers at the same width")
    ap.add_argument("--rope", choices=("default", "llama3"), default="default")
    args = ap.parse_args()
    build(args.out, args.shape, args.layers, args.rope)
    print(json.dumps({"hf": str(args.out / "hf"), "ckpt": str(args.out / "ckpt")}))


if __name__ == "__main__":
    main()
