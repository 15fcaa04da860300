"""Compile the decode kernel for an NVIDIA GPU on a machine without one, and report what the compiler made of it.

    compile_for_gpu(arch=90, dtype=torch.bfloat16, r=128, p=32, H=32, *, paged=False, masked=False)
        -> {"tensor_cores": "wgmma" | "mma" | None, "cp_async": bool, "registers": int,
            "local_bytes": int, "shared_bytes": int, ...}

Checks on a CPU-only machine what the interpreter cannot: that stage 1 lowers to tensor-core
code with cp.async pipelining, fits in registers (no local-memory spills) and in shared memory.
Needs a process where Triton was imported without TRITON_INTERPRET=1.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton

from .mla_decode import _block_h, _mla_decode_split_kernel, default_config

TL_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _source(kernel, dtype: torch.dtype, r: int, p: int, H: int, paged: bool, masked: bool, cfg: dict):
    """The kernel specialised as the launcher specialises it at run time (16-byte aligned pointers and strides)."""
    from triton.compiler import ASTSource

    tl_dtype = TL_DTYPES[dtype]
    constexprs = dict(
        R=r,
        P=p,
        BLOCK_H=_block_h(H, r),
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_R=max(16, triton.next_power_of_2(r)),
        BLOCK_P=max(16, triton.next_power_of_2(p)),
        PAGED=paged,
        PAGE_SIZE=64 if paged else 1,
        HAS_MASK=masked,
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
    )
    pointers = dict(Q_lat=tl_dtype, Q_rope=tl_dtype, KV=tl_dtype, K_rope=tl_dtype, Block_table="i32")
    pointers.update(Seq_lens="i32", Mask="u8", O_part="fp32", Lse_part="fp32")
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = f"*{pointers[name]}"
        else:
            signature[name] = "fp32" if name == "sm_scale" else "i32"
    # the mask's position stride is 1 (a row of a [B, L] bool tensor): not divisible by 16
    aligned = [n for n in kernel.arg_names if n in pointers or (n.startswith("stride") and n != "stride_mn")]
    return ASTSource(
        fn=kernel,
        signature=signature,
        constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()},
        attrs={(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned},
    )


def _resource_usage(cubin: bytes) -> dict:
    """Registers per thread and bytes spilled to local memory, from cuobjdump (when Triton ships it)."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+).*?LOCAL:(\d+)", usage)
    return dict(registers=int(found.group(1)), local_bytes=int(found.group(2))) if found else {}


def compile_for_gpu(
    arch: int = 90,
    dtype: torch.dtype = torch.bfloat16,
    r: int = 128,
    p: int = 32,
    H: int = 32,
    *,
    paged: bool = False,
    masked: bool = False,
    config: dict | None = None,
) -> dict:
    """Compile stage 1 for sm_`arch` without a GPU; report tensor cores, cp.async, registers, spills, shared memory."""
    from triton.backends.compiler import GPUTarget

    cfg = config or default_config(r, p, dtype)
    source = _source(_mla_decode_split_kernel, dtype, r, p, H, paged, masked, cfg)
    options = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = compiled.asm["ptx"]
    report = dict(arch=f"sm_{arch}", dtype=TL_DTYPES[dtype], r=r, p=p, H=H, paged=paged, masked=masked, **cfg)
    report.update(
        shared_bytes=compiled.metadata.shared,
        tensor_cores="wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else None,
        cp_async="cp.async" in ptx,
    )
    report.update(_resource_usage(compiled.asm["cubin"]))
    return report
