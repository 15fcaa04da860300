"""A random-weight model of a real model's shape, written to disk shard by shard (never whole in memory),
for the memory and time measurements of the streamed stages (``bench/results/scale_init_*.json``).

    python bench/scale_model.py llama-3.2-1b OUT [--layers N]   # Llama-3.2-1B's config, bf16, random weights

The tokenizer is the demo's (SmolLM2, 49,152 tokens: every id is inside the 128,256-token vocabulary)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import real_configs  # noqa: E402

SHAPES = ("llama-3.2-1b", "llama-3.1-8b")  # bench/real_configs.py
SHARD_BYTES = 2 << 30


def tensor_shapes(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    d, h, H, G, f = (
        c["hidden_size"],
        c["head_dim"],
        c["num_attention_heads"],
        c["num_key_value_heads"],
        c["intermediate_size"],
    )
    out = [("model.embed_tokens.weight", (c["vocab_size"], d))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (d,)),
            (p + "self_attn.q_proj.weight", (H * h, d)),
            (p + "self_attn.k_proj.weight", (G * h, d)),
            (p + "self_attn.v_proj.weight", (G * h, d)),
            (p + "self_attn.o_proj.weight", (d, H * h)),
            (p + "post_attention_layernorm.weight", (d,)),
            (p + "mlp.gate_proj.weight", (f, d)),
            (p + "mlp.up_proj.weight", (f, d)),
            (p + "mlp.down_proj.weight", (d, f)),
        ]
    out.append(("model.norm.weight", (d,)))
    if not c["tie_word_embeddings"]:
        out.append(("lm_head.weight", (c["vocab_size"], d)))
    return out


def random_tensor(name: str, shape, gen: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)


def main() -> None:
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--tokenizer", type=Path, default=None, help="a directory with tokenizer files (default: demo's)")
    args = ap.parse_args()
    c = real_configs.fields(args.shape, **({"num_hidden_layers": args.layers} if args.layers else {}))
    config = LlamaConfig(
        **c,
        rms_norm_eps=1e-5,
        dtype="bfloat16",
        bos_token_id=1,
        eos_token_id=2,
    )
    config.architectures = ["LlamaForCausalLM"]
    args.out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(args.out)
    gen = torch.Generator().manual_seed(0)
    shapes = tensor_shapes(c)
    shards: list[list[tuple[str, tuple]]] = [[]]
    size = 0
    for name, shape in shapes:
        n = 2 * int(torch.tensor(shape).prod())
        if shards[-1] and size + n > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        file = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: random_tensor(name, shape, gen) for name, shape in shard}
        total += sum(t.numel() * 2 for t in tensors.values())
        save_file(tensors, args.out / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in tensors})
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (args.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    tok = args.tokenizer or next(Path.home().glob(".cache/xecomla/gguf/SmolLM2-135M-Instruct*"))
    for f in tok.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")) or f.name == "chat_template.jinja":
            shutil.copy(f, args.out / f.name)
    print(f"{args.out}: {len(shapes)} tensors, {total / 1e9:.2f} GB in {len(shards)} file(s)")


if __name__ == "__main__":
    main()
