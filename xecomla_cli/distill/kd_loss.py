"""Distillation loss: KL(teacher ‖ student) on next-token distributions, chunked along the sequence.

For N token positions with student hidden states h_s (N, d_s) and teacher hidden states h_t (N, d_t)
(after each model's final norm), vocabulary V, temperature T and optional cross-entropy weight w:

    z_s = h_s · W_sᵀ,  z_t = h_t · W_tᵀ                      (N, V) logits (never all in memory)
    p_s = softmax(z_s / T),  p_t = softmax(z_t / T)
    loss = T² · mean_i KL(p_t,i ‖ p_s,i)  +  w · mean_{i labelled} CE(z_s,i, label_i)

The full-vocabulary logits of a long batch are large (8192 tokens x 128k vocab x 4 bytes = 4 GB per
model), so the loss walks the positions in chunks: per chunk it forms both models' logits,
computes the loss and, right away, the gradient with respect to the student logits,

    dloss/dz_s = T · (p_s − p_t) / N  +  w · (softmax(z_s) − onehot(label)) / N_labelled

and from it the gradients of h_s and W_s (the trick of Liger-Kernel's fused linear losses). Only
one chunk's logits exist at a time; the backward pass just scales the stored gradients.

`kd_loss_reference` is the plain full-logit version (autograd does the rest): the tests compare the
two, and it is the "naive" baseline of bench/distill_throughput.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 26  # logits per chunk (N_chunk x V): 256 MB per fp32 buffer


@dataclass
class KDStats:
    """Detached per-call statistics (sums, so that callers can pool them over batches)."""

    kl_sum: torch.Tensor  # Σ_i KL(p_t ‖ p_s) at the training temperature
    ce_sum: torch.Tensor  # Σ_labelled CE of the student (T = 1)
    teacher_ce_sum: torch.Tensor  # Σ_labelled CE of the teacher (T = 1), when asked for
    tokens: int
    labelled: int


def _mm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a @ b with the result in `out_dtype`; on CUDA a bf16 GEMM writes fp32 directly (``out_dtype``)."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and out_dtype == torch.float32:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # torch < 2.8: no out_dtype
            pass
    return (a @ b).to(out_dtype)


def project(h: torch.Tensor, w: torch.Tensor, matmul_dtype: torch.dtype) -> torch.Tensor:
    """fp32 logits h · wᵀ computed in `matmul_dtype` (bf16 tensor cores on GPU).

    On CUDA the GEMM writes fp32 directly, so the logits are not rounded to bf16 before the
    softmax: the KL of two close distributions is a small difference of large numbers.
    """
    return _mm(h.to(matmul_dtype), w.to(matmul_dtype).t(), torch.float32)


def _add_grad_weight(grad_w: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
    """grad_w (V, d) fp32 += gᵀ · h without a (V, d) temporary where the GEMM can accumulate in fp32."""
    if grad_w.is_cuda and g.dtype in (torch.bfloat16, torch.float16):
        try:
            torch.addmm(grad_w, g.t(), h, out_dtype=torch.float32, out=grad_w)
            return
        except (TypeError, RuntimeError):
            pass
    grad_w += (g.t() @ h).float()


def chunk_size_for(vocab: int, n_tokens: int, max_chunk: int | None = None) -> int:
    """Equal chunks of at most `max_chunk` (default: CHUNK_ELEMENTS // vocab) positions."""
    limit = max_chunk or max(8, CHUNK_ELEMENTS // max(vocab, 1))
    n_chunks = -(-n_tokens // limit)
    return -(-n_tokens // n_chunks)


def kd_chunk_math(zs, zt, labels, temperature: float, kl_grad_scale: float, ce_grad_scale: float, teacher_ce: bool):
    """Loss sums and dloss/dz_s for one chunk of fp32 logits zs, zt (n, V); labels (n,) or None.

    Returns (grad (n, V) fp32, kl_sum, ce_sum, teacher_ce_sum). Written as plain tensor code so
    that `torch.compile` can fuse it into a few passes over the chunk on GPU.
    """
    inv_t = 1.0 / temperature
    log_ps = torch.log_softmax(zs * inv_t, dim=-1)  # (n, V)
    log_pt = torch.log_softmax(zt * inv_t, dim=-1)
    pt = log_pt.exp()
    kl_rows = (pt * (log_pt - log_ps)).sum(-1)  # (n,)
    grad = (log_ps.exp() - pt) * (temperature * kl_grad_scale)
    zero = zs.new_zeros(())
    ce_sum, t_ce_sum = zero, zero
    if labels is not None:
        valid = labels != IGNORE_INDEX
        safe = torch.where(valid, labels, 0).unsqueeze(-1)  # (n, 1)
        if temperature == 1.0:
            log_p1 = log_ps
        else:
            log_p1 = torch.log_softmax(zs, dim=-1)
        ce_rows = -log_p1.gather(-1, safe).squeeze(-1)
        ce_sum = torch.where(valid, ce_rows, 0.0).sum()
        if ce_grad_scale != 0.0:
            scale = valid.to(zs.dtype).unsqueeze(-1) * ce_grad_scale  # (n, 1)
            onehot = torch.zeros_like(zs).scatter_(-1, safe, 1.0)
            grad = grad + (log_p1.exp() - onehot) * scale
        if teacher_ce:
            log_pt1 = log_pt if temperature == 1.0 else torch.log_softmax(zt, dim=-1)
            t_rows = -log_pt1.gather(-1, safe).squeeze(-1)
            t_ce_sum = torch.where(valid, t_rows, 0.0).sum()
    return grad, kl_rows.sum(), ce_sum, t_ce_sum


_compiled: dict[str, object] = {}


def _chunk_fn(compile: bool):
    if not compile:
        return kd_chunk_math
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(kd_chunk_math, dynamic=False)
    return _compiled["fn"]


class _ChunkedKD(torch.autograd.Function):
    """Forward computes the loss and, chunk by chunk, the gradients of h_s and W_s."""

    @staticmethod
    def forward(
        ctx, hs, ws, ht, wt, labels, temperature, ce_weight, chunk, matmul_dtype, compile, teacher_ce, want_grad
    ):
        n = hs.shape[0]
        n_lab = int((labels != IGNORE_INDEX).sum()) if labels is not None else 0
        kl_scale = 1.0 / n
        ce_scale = ce_weight / n_lab if (ce_weight and n_lab) else 0.0
        # (needs_input_grad stays True under no_grad: the caller says whether gradients are wanted)
        need_h, need_w = want_grad and ctx.needs_input_grad[0], want_grad and ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hs) if need_h else None
        grad_w = torch.zeros(ws.shape, dtype=torch.float32, device=ws.device) if need_w else None
        ws_m, wt_m = ws.to(matmul_dtype), wt.to(matmul_dtype)
        fn = _chunk_fn(compile)
        kl = hs.new_zeros((), dtype=torch.float32)
        ce, t_ce = kl.clone(), kl.clone()
        with torch.autocast(hs.device.type, enabled=False):
            for start in range(0, n, chunk):
                end = min(start + chunk, n)
                h = hs[start:end].to(matmul_dtype)
                zs = project(h, ws_m, matmul_dtype)  # (c, V) fp32
                zt = project(ht[start:end], wt_m, matmul_dtype)
                lab = labels[start:end] if labels is not None else None
                g, kl_c, ce_c, t_ce_c = fn(zs, zt, lab, temperature, kl_scale, ce_scale, teacher_ce)
                kl += kl_c
                ce += ce_c
                t_ce += t_ce_c
                del zs, zt
                if need_h or need_w:
                    g = g.to(matmul_dtype)
                    if need_h:
                        grad_h[start:end] = _mm(g, ws_m, hs.dtype)  # (c, d)
                    if need_w:
                        _add_grad_weight(grad_w, g, h)  # (V, d)
        loss = (temperature**2) * kl / n + (ce_weight * ce / n_lab if (ce_weight and n_lab) else 0.0)
        ctx.grads = (grad_h, None if grad_w is None else grad_w.to(ws.dtype))
        ctx.mark_non_differentiable(kl, ce, t_ce)
        return loss, kl, ce, t_ce

    @staticmethod
    def backward(ctx, grad_loss, *_):
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        if grad_h is not None:
            grad_h = grad_h * grad_loss.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = grad_w * grad_loss.to(grad_w.dtype)
        return grad_h, grad_w, *([None] * 11)


def kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    chunk_size: int | None = None,
    matmul_dtype: torch.dtype | None = None,
    compile: bool = False,
    teacher_ce: bool = False,
) -> tuple[torch.Tensor, KDStats]:
    """Chunked KL(teacher ‖ student) (+ CE) loss over all positions; returns (loss, stats).

    student_hidden (..., d_s), teacher_hidden (..., d_t): final-norm hidden states; the weights are
    the lm_head matrices (V, d). labels (...) hold the next token of each position (IGNORE_INDEX
    where there is none). The vocabularies are cut to the shorter of the two heads.
    """
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
    vocab = min(student_weight.shape[0], teacher_weight.shape[0])
    ws = student_weight[:vocab] if student_weight.shape[0] != vocab else student_weight
    wt = teacher_weight[:vocab].detach()
    lab = labels.reshape(-1) if labels is not None else None
    if lab is not None and vocab < student_weight.shape[0]:
        lab = torch.where(lab >= vocab, IGNORE_INDEX, lab)
    if matmul_dtype is None:
        matmul_dtype = (
            torch.get_autocast_dtype(hs.device.type) if torch.is_autocast_enabled(hs.device.type) else hs.dtype
        )
    chunk = chunk_size_for(vocab, hs.shape[0], chunk_size)
    want_grad = torch.is_grad_enabled() and (hs.requires_grad or ws.requires_grad)
    loss, kl, ce, t_ce = _ChunkedKD.apply(
        hs, ws, ht, wt, lab, float(temperature), float(ce_weight), chunk, matmul_dtype, compile, teacher_ce, want_grad
    )
    labelled = int((lab != IGNORE_INDEX).sum()) if lab is not None else 0
    return loss, KDStats(kl, ce, t_ce, hs.shape[0], labelled)


def kd_loss_liger(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, KDStats]:
    """The KL loss through Liger-Kernel's fused linear JSD (β = 0 is KL(teacher ‖ student)), when
    that package is installed (GPU only). Same value as `kd_loss` without CE; for benchmarks."""
    try:
        from liger_kernel.ops import LigerFusedLinearJSDFunction
    except ImportError:
        raise ImportError("the liger loss needs liger-kernel: pip install liger-kernel") from None
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
    vocab = min(student_weight.shape[0], teacher_weight.shape[0])
    kl_mean = LigerFusedLinearJSDFunction.apply(
        hs, student_weight[:vocab], ht, teacher_weight[:vocab].detach(), None, 0.0, IGNORE_INDEX, float(temperature)
    )
    zero = kl_mean.new_zeros(()).float()
    n = hs.shape[0]
    return kl_mean * temperature**2, KDStats(kl_mean.detach().float() * n, zero, zero, n, 0)


def kd_loss_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
) -> torch.Tensor:
    """The same loss from full logits (..., V), differentiated by autograd."""
    zs = student_logits.reshape(-1, student_logits.shape[-1]).float()
    zt = teacher_logits.reshape(-1, teacher_logits.shape[-1]).float()
    vocab = min(zs.shape[-1], zt.shape[-1])
    zs, zt = zs[:, :vocab], zt[:, :vocab]
    log_ps = F.log_softmax(zs / temperature, dim=-1)
    log_pt = F.log_softmax(zt / temperature, dim=-1)
    loss = temperature**2 * F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean")
    if ce_weight and labels is not None:
        loss = loss + ce_weight * F.cross_entropy(zs, labels.reshape(-1), ignore_index=IGNORE_INDEX)
    return loss


def next_token_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """labels[t] = input_ids[t + 1]; the last position of each row has none."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[..., :-1] = input_ids[..., 1:]
    return labels


def ppl_from_nll(nll_sum: float, tokens: int) -> float:
    """Perplexity exp(Σ NLL / tokens) from a summed negative log-likelihood (capped at e^50)."""
    return math.exp(min(nll_sum / max(tokens, 1), 50.0))
