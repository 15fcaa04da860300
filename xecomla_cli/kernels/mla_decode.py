"""Triton kernel for absorbed multi-head latent attention (MLA) decode: one new query token per sequence.

After absorbing the K up-projection into the query (``q_lat = q_nope · W_uk``) and the V
up-projection into the output, every head attends over the same cached rows ``[c, k_rope]``:
one shared "KV head" of width r + p whose latent part is also the value.

    score[b, h, j] = sm_scale * (q_lat[b, h] · kv[b, j] + q_rope[b, h] · k_rope[b, j])
    out[b, h]      = softmax_j(score[b, h, visible j]) @ kv[b, visible j]

API (the model reaches it through the dispatcher ``xecomla_cli.kernels.mla_decode_auto``)::

    mla_decode(q_lat, q_rope, kv, k_rope, seq_lens, sm_scale, *,
               mask=None, block_table=None, num_splits=None, return_lse=False) -> out | (out, lse)

    q_lat  [B, H, r], q_rope [B, H, p]        fp16 / bf16 / fp32 (any strides; last dim ideally contiguous)
    kv     [B, L_max, r], k_rope [B, L_max, p]                  contiguous rows (batch stride free: views
                                               of a preallocated cache, or halves of one [B, L_max, r + p]
                                               buffer), or
    kv     [num_blocks, block_size, r], k_rope [num_blocks, block_size, p] with
    block_table [B, max_blocks] int32          paged cache: position j of sequence b lives in
                                               page block_table[b, j // block_size], row j % block_size
    seq_lens [B] int32 or None                 attend to positions 0 .. seq_lens[b]-1 (None: all L_max);
                                               seq_lens[b] <= capacity is the caller's promise (no sync)
    mask   [B, >= L_max] bool or None          True where a position may be attended (padding); any strides
    out [B, H, r] in q's dtype; lse [B, H] fp32 (natural log-sum-exp of the scores; -inf if nothing is visible)

How it runs: stage 1 grids over (batch, head block, KV split). A program loads BLOCK_H query
heads, walks its slice of the sequence BLOCK_N rows at a time, loads each latent tile once for
all its heads and uses it for both products (q·kᵀ and p·v, with tl.dot and fp32 accumulation),
and keeps an online softmax. Stage 2 merges the splits by their log-sum-exp. With one split,
stage 1 writes the output directly. r, p and H need not be powers of two (masked).

num_splits heuristic (``default_num_splits``): aim for about ``2 x num_SMs`` programs, i.e.
``ceil(2 * SMs / (B * head_blocks))`` splits, but keep at least ``MIN_TOKENS_PER_SPLIT`` rows
per split (so the merge and the per-program setup stay small against the rows read) and at most
``MAX_SPLITS``. It uses the cache capacity (L_max, or max_blocks * block_size), not seq_lens, so
it never synchronises with the GPU: a decode step through it can be captured in a CUDA graph.
Under ``torch.compile`` the launch is the opaque custom op ``xecomla::mla_decode``.

CPU tensors run through the Triton interpreter (``interpreter.py``; slow, for tests).
``compile_check.py`` compiles the kernel for an NVIDIA GPU on a machine without one;
``reference.py`` holds the exact PyTorch reference with the same signature.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

MIN_TOKENS_PER_SPLIT = 128
MAX_SPLITS = 64


@triton.jit
def _mla_decode_split_kernel(
    Q_lat,  # [B, H, R]
    Q_rope,  # [B, H, P]
    KV,  # [B, L, R], or paged [blocks, PAGE_SIZE, R]
    K_rope,  # [B, L, P], or paged [blocks, PAGE_SIZE, P]
    Block_table,  # [B, max_blocks] int32 (PAGED only)
    Seq_lens,  # [B] int32
    Mask,  # [B, >= L] uint8, nonzero = may attend (HAS_MASK only)
    O_part,  # [B, H, S, R] fp32 (the final out when S == 1)
    Lse_part,  # [B, H, S] fp32 (the final lse when S == 1)
    sm_scale,
    stride_qb,
    stride_qh,
    stride_qrb,
    stride_qrh,
    stride_kvb,  # batch (or page) stride of the latent cache
    stride_kvn,  # row stride of the latent cache
    stride_krb,
    stride_krn,
    stride_btb,
    stride_mb,
    stride_mn,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    stride_ls,
    H,
    NUM_SPLITS,
    R: tl.constexpr,
    P: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
    PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Stage 1: attention of BLOCK_H heads of sequence pid_b over KV split pid_s (online softmax)."""
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_s = tl.program_id(2)

    # this program's slice of the sequence: [start, end), a multiple of BLOCK_N long
    seq_len = tl.load(Seq_lens + pid_b)
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = pid_s * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, BLOCK_R)
    offs_p = tl.arange(0, BLOCK_P)
    mask_h = offs_h < H
    mask_r = offs_r < R
    mask_p = offs_p < P

    # queries of BLOCK_H heads (padded heads are zero rows and never stored)
    q_lat = tl.load(
        Q_lat + pid_b * stride_qb + offs_h[:, None] * stride_qh + offs_r[None, :],
        mask=mask_h[:, None] & mask_r[None, :],
        other=0.0,
    )  # [BLOCK_H, BLOCK_R]
    q_rope = tl.load(
        Q_rope + pid_b * stride_qrb + offs_h[:, None] * stride_qrh + offs_p[None, :],
        mask=mask_h[:, None] & mask_p[None, :],
        other=0.0,
    )  # [BLOCK_H, BLOCK_P]

    qk_scale = sm_scale * 1.4426950408889634  # softmax in base 2: exp(x) = exp2(x * log2(e))
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], dtype=tl.float32)

    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        if HAS_MASK:  # padding: positions the mask hides count as past the end
            allowed = tl.load(Mask + pid_b.to(tl.int64) * stride_mb + offs_n * stride_mn, mask=mask_n, other=0)
            mask_n = mask_n & (allowed != 0)
        if PAGED:
            page = tl.load(Block_table + pid_b * stride_btb + offs_n // PAGE_SIZE, mask=mask_n, other=0).to(tl.int64)
            row = offs_n % PAGE_SIZE
            kv_rows = page * stride_kvb + row * stride_kvn
            kr_rows = page * stride_krb + row * stride_krn
        else:
            kv_rows = pid_b.to(tl.int64) * stride_kvb + offs_n * stride_kvn
            kr_rows = pid_b.to(tl.int64) * stride_krb + offs_n * stride_krn
        kv = tl.load(
            KV + kv_rows[:, None] + offs_r[None, :], mask=mask_n[:, None] & mask_r[None, :], other=0.0
        )  # [BLOCK_N, BLOCK_R]
        k_rope = tl.load(
            K_rope + kr_rows[:, None] + offs_p[None, :], mask=mask_n[:, None] & mask_p[None, :], other=0.0
        )  # [BLOCK_N, BLOCK_P]

        # score = q_lat · kvᵀ + q_rope · k_ropeᵀ                                   [BLOCK_H, BLOCK_N]
        qk = tl.dot(q_lat, tl.trans(kv), input_precision=DOT_PRECISION)
        qk = tl.dot(q_rope, tl.trans(k_rope), qk, input_precision=DOT_PRECISION)
        qk = tl.where(mask_n[None, :], qk * qk_scale, float("-inf"))

        # online softmax: rescale what we have by exp(m_old - m_new), add this tile
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible yet: no -inf - -inf
        alpha = tl.math.exp2(m_i - m_ref)
        probs = tl.math.exp2(qk - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(probs, 1)
        # out += probs · kv  (the same latent tile is the value)                   [BLOCK_H, BLOCK_R]
        acc = tl.dot(probs.to(kv.dtype), kv, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    # an empty split (short sequence) leaves l_i == 0: write zeros and lse = -inf
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)

    o_ptrs = O_part + pid_b * stride_ob + offs_h[:, None] * stride_oh + pid_s * stride_os + offs_r[None, :]
    tl.store(o_ptrs, out.to(O_part.dtype.element_ty), mask=mask_h[:, None] & mask_r[None, :])
    tl.store(Lse_part + pid_b * stride_lb + offs_h * stride_lh + pid_s * stride_ls, lse, mask=mask_h)


@triton.jit
def _mla_decode_merge_kernel(
    O_part,  # [B, H, S, R] fp32
    Lse_part,  # [B, H, S] fp32
    Out,  # [B, H, R] (q dtype)
    Lse,  # [B, H] fp32
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lpb,
    stride_lph,
    stride_ob,
    stride_oh,
    stride_lb,
    stride_lh,
    NUM_SPLITS,
    R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Stage 2: combine the NUM_SPLITS partial outputs of head pid_h of sequence pid_b by their lse."""
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_r = tl.arange(0, BLOCK_R)
    mask_s = offs_s < NUM_SPLITS
    mask_r = offs_r < R

    # out = Σ_s exp(lse_s - lse) · out_s,  lse = log Σ_s exp(lse_s)
    lse_s = tl.load(Lse_part + pid_b * stride_lpb + pid_h * stride_lph + offs_s, mask=mask_s, other=float("-inf"))
    lse_max = tl.max(lse_s, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    w = tl.exp(lse_s - lse_max)  # [BLOCK_S]
    w_sum = tl.sum(w, 0)
    o_s = tl.load(
        O_part + pid_b * stride_pb + pid_h * stride_ph + offs_s[:, None] * stride_ps + offs_r[None, :],
        mask=mask_s[:, None] & mask_r[None, :],
        other=0.0,
    )  # [BLOCK_S, BLOCK_R]
    out = tl.sum(o_s * w[:, None], 0) / tl.where(w_sum == 0.0, 1.0, w_sum)  # [BLOCK_R]
    lse = tl.where(w_sum == 0.0, float("-inf"), lse_max + tl.log(w_sum))

    tl.store(Out + pid_b * stride_ob + pid_h * stride_oh + offs_r, out.to(Out.dtype.element_ty), mask=mask_r)
    tl.store(Lse + pid_b * stride_lb + pid_h * stride_lh, lse)


@functools.cache
def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (132 on an H100 SXM); 132 on CPU for the heuristic."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def _block_h(H: int, r: int = 128) -> int:
    """Heads per program: all heads up to 64 (32 for r > 128), padded to at least 16 rows for tl.dot."""
    return min(max(16, triton.next_power_of_2(H)), 64 if r <= 128 else 32)


def default_num_splits(B: int, H: int, L: int, num_sms: int = 132, r: int = 128) -> int:
    """KV splits per sequence: ~2 programs per SM, >= MIN_TOKENS_PER_SPLIT rows each, <= MAX_SPLITS."""
    programs = B * triton.cdiv(H, _block_h(H, r))
    splits = triton.cdiv(2 * num_sms, programs)
    return max(1, min(splits, triton.cdiv(L, MIN_TOKENS_PER_SPLIT), MAX_SPLITS))


def default_config(r: int, p: int, dtype: torch.dtype) -> dict:
    """Tile and launch parameters: BLOCK_N rows per step, warps, software-pipelining stages.

    Chosen so that nothing spills on sm_80/sm_90 (see compile_check.py): r <= 128 keeps a
    [BLOCK_H, r] fp32 accumulator in 4 warps; wider latents take 8. Not tuned on a GPU yet:
    `python bench/decode_kernel.py --sweep` times the alternatives.
    """
    block_n = 32 if dtype == torch.float32 else 64
    return dict(BLOCK_N=block_n, num_warps=4 if triton.next_power_of_2(r) <= 128 else 8, num_stages=2)


def _require(ok: bool, message: str):
    """Raise ValueError(message) unless ok."""
    if not ok:
        raise ValueError(message)


def _check(q_lat, q_rope, kv, k_rope, seq_lens, mask, block_table):
    """Validate shapes, dtypes and devices (never values: no sync); return (B, H, r, p, capacity)."""
    _require(q_lat.dim() == 3 and q_rope.dim() == 3, "q_lat and q_rope must be [B, H, r] and [B, H, p]")
    B, H, r = q_lat.shape
    p = q_rope.shape[-1]
    _require(q_rope.shape == (B, H, p), f"q_rope {tuple(q_rope.shape)} != {(B, H, p)}")
    _require(
        kv.dim() == 3 and k_rope.dim() == 3 and kv.shape[-1] == r and k_rope.shape[-1] == p,
        f"kv {tuple(kv.shape)} / k_rope {tuple(k_rope.shape)} must be [*, *, {r}] / [*, *, {p}]",
    )
    _require(kv.shape[:2] == k_rope.shape[:2], "kv and k_rope must have the same leading dims")
    _require(q_lat.dtype == q_rope.dtype == kv.dtype == k_rope.dtype, "q_lat, q_rope, kv, k_rope must share a dtype")
    _require(q_lat.dtype in (torch.float16, torch.bfloat16, torch.float32), f"unsupported dtype {q_lat.dtype}")
    _require(seq_lens is None or seq_lens.shape == (B,), f"seq_lens must be [B] = [{B}]")
    tensors = [t for t in (q_rope, kv, k_rope, seq_lens, mask, block_table) if t is not None]
    _require(all(t.device == q_lat.device for t in tensors), "all inputs must be on q_lat's device")
    if block_table is None:
        _require(kv.shape[0] == B, f"contiguous cache has batch {kv.shape[0]}, queries {B}")
        capacity = kv.shape[1]
    else:
        _require(block_table.dim() == 2 and block_table.shape[0] == B, "block_table must be [B, max_blocks]")
        capacity = block_table.shape[1] * kv.shape[1]
    _require(
        mask is None
        or (mask.dtype == torch.bool and mask.dim() == 2 and mask.shape[0] == B and mask.shape[1] >= capacity),
        f"mask must be bool [B, >= {capacity}]",
    )
    return B, H, r, p, capacity


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The tensor itself if its last dim has stride 1, else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](...) on a GPU; on CPU tensors through the Triton interpreter."""
    if args[0].device.type == "cpu":
        from .interpreter import launch_on_cpu

        launch_on_cpu(kernel, grid, *args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def _mla_decode(q_lat, q_rope, kv, k_rope, seq_lens, sm_scale, mask, block_table, num_splits, **tile):
    """Launch stage 1 (and stage 2 when num_splits > 1) with tile parameters BLOCK_N, num_warps,
    num_stages (and optionally BLOCK_H): (out, lse)."""
    B, H, r, p, capacity = _check(q_lat, q_rope, kv, k_rope, seq_lens, mask, block_table)
    q_lat, q_rope, kv, k_rope = (_last_dim_contiguous(t) for t in (q_lat, q_rope, kv, k_rope))
    device = q_lat.device
    if seq_lens is None:  # every row of the cache is a position (a filled view of a growing cache)
        seq_lens = torch.full((B,), capacity, dtype=torch.int32, device=device)
    seq_lens = seq_lens.to(torch.int32)
    paged = block_table is not None
    bt = block_table.to(torch.int32) if paged else seq_lens  # any int32 tensor when not paged (unused)
    m = mask.view(torch.uint8) if mask is not None else seq_lens  # likewise without a mask
    block_h = tile.pop("BLOCK_H", None) or _block_h(H, r)
    S = num_splits or default_num_splits(B, H, capacity, _num_sms(device), r)

    out = torch.empty(B, H, r, device=device, dtype=q_lat.dtype)
    lse = torch.empty(B, H, device=device, dtype=torch.float32)
    if S == 1:  # no merge: stage 1 writes the result
        o_part, lse_part = out.unsqueeze(2), lse.unsqueeze(2)  # [B, H, 1, r], [B, H, 1]
    else:
        o_part = torch.empty(B, H, S, r, device=device, dtype=torch.float32)
        lse_part = torch.empty(B, H, S, device=device, dtype=torch.float32)

    strides = q_lat.stride()[:2] + q_rope.stride()[:2] + kv.stride()[:2] + k_rope.stride()[:2]
    strides += (bt.stride(0), m.stride(0), m.stride(-1)) + o_part.stride()[:3] + lse_part.stride()[:3]
    meta = dict(R=r, P=p, BLOCK_H=block_h, BLOCK_R=max(16, triton.next_power_of_2(r)))
    meta.update(BLOCK_P=max(16, triton.next_power_of_2(p)), PAGED=paged, PAGE_SIZE=kv.shape[1] if paged else 1)
    meta.update(HAS_MASK=mask is not None, DOT_PRECISION="ieee" if q_lat.dtype == torch.float32 else "tf32")
    tensors = (q_lat, q_rope, kv, k_rope, bt, seq_lens, m, o_part, lse_part)
    _launch(
        _mla_decode_split_kernel, (B, triton.cdiv(H, block_h), S), *tensors, sm_scale, *strides, H, S, **meta, **tile
    )
    if S > 1:
        strides = o_part.stride()[:3] + lse_part.stride()[:2] + out.stride()[:2] + lse.stride()[:2]
        meta = dict(
            R=r, BLOCK_S=triton.next_power_of_2(S), BLOCK_R=triton.next_power_of_2(r), num_warps=4 if r > 64 else 2
        )
        _launch(_mla_decode_merge_kernel, (B, H), o_part, lse_part, out, lse, *strides, S, **meta)
    return out, lse


def _mla_decode_default(q_lat, q_rope, kv, k_rope, seq_lens, mask, block_table, sm_scale, num_splits):
    """The launch with the default tile parameters (num_splits 0: the heuristic): (out, lse)."""
    cfg = default_config(q_lat.shape[-1], q_rope.shape[-1], q_lat.dtype)
    return _mla_decode(q_lat, q_rope, kv, k_rope, seq_lens, sm_scale, mask, block_table, num_splits or None, **cfg)


@torch.library.custom_op("xecomla::mla_decode", mutates_args=())
def _mla_decode_op(
    q_lat: torch.Tensor,
    q_rope: torch.Tensor,
    kv: torch.Tensor,
    k_rope: torch.Tensor,
    seq_lens: torch.Tensor | None,
    mask: torch.Tensor | None,
    block_table: torch.Tensor | None,
    sm_scale: float,
    num_splits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The launch as one opaque op, for torch.compile."""
    return _mla_decode_default(q_lat, q_rope, kv, k_rope, seq_lens, mask, block_table, sm_scale, num_splits)


@_mla_decode_op.register_fake
def _(q_lat, q_rope, kv, k_rope, seq_lens, mask, block_table, sm_scale, num_splits):
    B, H, r = q_lat.shape
    return q_lat.new_empty(B, H, r), q_lat.new_empty(B, H, dtype=torch.float32)


def mla_decode(
    q_lat: torch.Tensor,
    q_rope: torch.Tensor,
    kv: torch.Tensor,
    k_rope: torch.Tensor,
    seq_lens: torch.Tensor | None,
    sm_scale: float,
    *,
    mask: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    num_splits: int | None = None,
    return_lse: bool = False,
):
    """Absorbed MLA decode with the Triton split-KV kernel: out [B, H, r] (and lse [B, H] fp32)."""
    args = (q_lat, q_rope, kv, k_rope, seq_lens, mask, block_table, float(sm_scale), num_splits or 0)
    # traced: one opaque op, no Python launcher in the graph; eager: launch directly (no op dispatch cost)
    launch = _mla_decode_op if torch.compiler.is_compiling() else _mla_decode_default
    out, lse = launch(*args)
    return (out, lse) if return_lse else out
