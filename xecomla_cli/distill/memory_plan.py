"""How much memory one process of a global-KD run needs: pure functions over sizes (no model, no
tensor). `distill --plan` fills them from the checkpoint's config and metadata (`plan_sizes.py`).

Per process, S = N under --fsdp with N processes (the shards), else 1; c = 2 bytes in a bf16 run
(autocast), 4 in fp32; t = the teacher's bytes per value (bf16 run: 2, fp32: 4):

    student weights   P_s · 4 / S             fp32: they are the master weights (bf16 is autocast)
    teacher weights   P_t · t                 frozen; --fsdp shards its decoder layers
    gradients         P_train · 4 / S         fp32, like the weights; --freeze-non-mla: MLA only
    optimizer state   (2 · P_train · 4 + 4 · n_tensors) / S     AdamW: exp_avg, exp_avg_sq, a step
    DDP buckets       P_train · 4             the reducer's flat gradient copy (DDP, N > 1)
    validation cache  val blocks · T · d_t · t                 the teacher's held-out hidden states
    activations       Σ layers (below) + the final norm + bf16 weight copies
    KD loss           chunk buffers + head gradient + hidden-state gradient (kd_loss.py)

The peak is the largest of these moments of a step:

    end of forward    persistent + activations + KD loss + teacher hidden (+ gradients when
                      the step accumulates over several micro batches)
    optimizer step    persistent + gradients + the optimizer's temporaries
    backward          with activation checkpointing: persistent + gradients + the layer inputs
                      kept + one recomputed layer's activations

where persistent = the weights, the optimizer state, the DDP buckets and the validation cache;
and on the host, loading the models may be higher: the student's safetensors read whole and copied
into its fp32 model, then beside it the teacher's weights (and, when its file is in another dtype,
the file's pages: memory-mapped, read and converted).
"""

from __future__ import annotations

from dataclasses import dataclass

from .kd_loss import chunk_size_for

FP32 = 4
INDEX = 8  # int64 token ids
KL_CHUNK_BUFFERS = 7  # (chunk, V) fp32 tensors alive at once in kd_chunk_math: zs, zt, log_ps, log_pt, pt + 2 temps
CE_CHUNK_BUFFERS = 9  # with --ce-weight: the one-hot and softmax(z_s) besides


@dataclass(frozen=True)
class LayerShape:
    """One decoder layer's sizes: what its saved activations scale with."""

    hidden: int  # d
    intermediate: int  # I (MLP width)
    heads: int  # H
    head_dim: int  # h (value dim per head)
    qk_dim: int  # n + p: query/key dims per head
    kv_rank: int | None  # r of an MLA layer; None: the original attention
    rope_dim: int  # p (MLA)
    kv_heads: int  # G (original attention)
    latent_norm: bool  # an RMSNorm over the latent
    linear_weights: int  # values in the layer's linear weights (their bf16 copies under autocast)
    params: int  # every parameter of the layer


@dataclass(frozen=True)
class ModelSizes:
    """A model's parameter counts, from its modules built on the meta device (`plan_sizes.py`)."""

    params: int  # every parameter (tied embeddings once)
    trainable: int  # the parameters the run trains
    trainable_tensors: int
    largest_trainable: int  # values in the largest trainable tensor
    head_trainable: bool  # the lm_head (tied: the embeddings) is trained
    vocab: int
    hidden: int
    layers: tuple[LayerShape, ...]

    @property
    def root_params(self) -> int:
        """Parameters outside the decoder layers: embeddings, final norm, head."""
        return self.params - sum(layer.params for layer in self.layers)


@dataclass(frozen=True)
class StepShape:
    """What one process computes per step."""

    micro_batch: int  # blocks per forward/backward
    seq_len: int  # T
    accumulation: int  # micro batches per optimizer step
    precision: str  # bf16 | fp32
    device: str  # cpu | cuda
    world: int = 1  # processes
    fsdp: bool = False
    checkpointed_layers: int = 0  # the first k decoder layers recompute their activations
    val_blocks: int = 0  # held-out blocks this process validates on
    ce: bool = False  # --ce-weight > 0

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len

    @property
    def compute_bytes(self) -> int:
        return 2 if self.precision == "bf16" else FP32

    @property
    def shards(self) -> int:
        return self.world if self.fsdp else 1


@dataclass(frozen=True)
class Row:
    name: str
    bytes: int
    formula: str


@dataclass(frozen=True)
class MemoryPlan:
    """The rows, the moments of a step and the loading peak, per process."""

    rows: tuple[Row, ...]
    end_of_forward: int
    optimizer_step: int
    backward: int  # with checkpointed layers: all gradients while one layer is recomputed (0: none)
    loading: int  # host memory while the models load
    device: str  # cpu | cuda: on a GPU the loading happens in host memory, not on the device

    @property
    def moments(self) -> dict[str, int]:
        moments = {"end of forward": self.end_of_forward, "optimizer step": self.optimizer_step}
        if self.backward:
            moments["backward (recomputing a layer)"] = self.backward
        if self.device == "cpu":
            moments["loading the models"] = self.loading
        return moments

    @property
    def peak(self) -> int:
        return max(self.moments.values())

    @property
    def peak_moment(self) -> str:
        return max(self.moments, key=self.moments.get)

    def row(self, name: str) -> int:
        return next(r.bytes for r in self.rows if r.name == name)

    def to_dict(self) -> dict:
        return {
            "rows": {r.name: r.bytes for r in self.rows},
            "formulas": {r.name: r.formula for r in self.rows},
            "end_of_forward": self.end_of_forward,
            "optimizer_step": self.optimizer_step,
            "backward": self.backward,
            "loading": self.loading,
            "device": self.device,
            "peak": self.peak,
            "peak_moment": self.peak_moment,
        }


# ---- the terms ------------------------------------------------------------------------------
def layer_activations(layer: LayerShape, step: StepShape) -> int:
    """Bytes one decoder layer saves for its backward pass, for N = B·T tokens (B blocks of T).

    Counted from the tensors autograd keeps (the layer as transformers and mla/attention.py write it):

        norms, inputs  6·N·d·4      layer input, both norms' normalised x, the linears' inputs, the residual
        MLP            4·N·I·c      gate, silu(gate), up, silu(gate)·up
        o_proj input   N·H·h·c
        MLA latent     N·(r+p)·c    the down-projection (with a latent norm: N·(r+p)·4 + 2·N·r·c)
        q, k           2·N·H·(n+p)·a
        attention      SDPA's saved state: flash / memory-efficient kernels keep v (N·H·(n+h)·c, a view
                       of the up-projection), the output N·H·h·a and the log-sum-exp N·H·4; the math
                       kernel (CPU, n+p ≠ h: no fused kernel takes unequal head dims) keeps a copy of v
                       N·H·h·a (one block: the up-projection it views) and the probabilities B·H·T²·a

    a: the attention's dtype (fp32 on CPU, where autocast leaves SDPA in fp32; c on GPU).
    An original (GQA) layer: q N·H·h, k and v N·G·h each, out and log-sum-exp, its linears' inputs.
    """
    n_tok, c, d = step.tokens, step.compute_bytes, layer.hidden
    a = FP32 if step.device == "cpu" else c
    H, h = layer.heads, layer.head_dim
    total = 6 * n_tok * d * FP32 + 4 * n_tok * layer.intermediate * c + n_tok * H * h * c
    if layer.kv_rank is None:  # the original attention: q, k, v, output, log-sum-exp (a fused kernel)
        return total + n_tok * (H * h + 2 * layer.kv_heads * h + H * h) * a + n_tok * H * FP32
    r, p, qk = layer.kv_rank, layer.rope_dim, layer.qk_dim
    if layer.latent_norm:
        total += n_tok * (r + p) * FP32 + 2 * n_tok * r * c
    else:
        total += n_tok * (r + p) * c
    total += 2 * n_tok * H * qk * a
    nope = qk - p
    if math_attention(layer, step):
        # v: a view of the up-projection when one block makes it viewable, else a copy
        v = n_tok * H * (nope + h) * c if step.micro_batch == 1 else n_tok * H * h * a
        total += v + step.micro_batch * H * step.seq_len**2 * a
    else:
        total += n_tok * H * (nope + h) * c + n_tok * H * h * a + n_tok * H * FP32
    return total


def math_attention(layer: LayerShape, step: StepShape) -> bool:
    """SDPA falls back to its math kernel (T² probabilities kept) on CPU when q/k and v head dims differ."""
    return step.device == "cpu" and layer.kv_rank is not None and layer.qk_dim != layer.head_dim


def activations(model: ModelSizes, step: StepShape) -> int:
    """Every decoder layer's saved tensors (a checkpointed layer keeps only its input N·d·4), the final
    norm's (its input and normalised x: 2·N·d·4) and, in a bf16 run, the bf16 copies autocast makes of
    each linear weight, held for the backward pass (2 bytes per value of every non-checkpointed layer)."""
    n_tok = step.tokens
    total = 2 * n_tok * model.hidden * FP32
    for i, layer in enumerate(model.layers):
        if i < step.checkpointed_layers:
            total += n_tok * layer.hidden * FP32
            continue
        total += layer_activations(layer, step)
        if step.precision == "bf16":
            total += 2 * layer.linear_weights
    return total


def recomputed_layer(model: ModelSizes, step: StepShape) -> int:
    """With activation checkpointing, the backward pass recomputes one checkpointed layer at a time:
    the layer inputs kept (k·N·d·4) and the largest such layer's full activations (bf16: + its weight copies)."""
    k = min(step.checkpointed_layers, len(model.layers))
    if k == 0:
        return 0
    copies = 2 if step.precision == "bf16" else 0
    full = max(layer_activations(layer, step) + copies * layer.linear_weights for layer in model.layers[:k])
    return k * step.tokens * model.hidden * FP32 + full


def kd_loss_bytes(model: ModelSizes, teacher: ModelSizes, step: StepShape) -> int:
    """The chunked KD loss (kd_loss.py) at its peak, over N positions and vocabulary V:

    chunk buffers   7 · chunk · V · 4    (9 with --ce-weight), chunk = chunk_size_for(V, N)
    head gradient   V · d · 4            the lm_head's gradient, kept to the backward pass (+ a
                                         V · d · 4 product per chunk), when the head is trained
    student hidden  2 · N · d · 4        h_s and its gradient; the teacher's N · d_t · t besides
    head copy       V · d · 2            the student head in bf16 for the matmuls (bf16 run)
    """
    n_tok = step.tokens
    vocab = min(model.vocab, teacher.vocab)
    chunk = chunk_size_for(vocab, n_tok)
    buffers = (CE_CHUNK_BUFFERS if step.ce else KL_CHUNK_BUFFERS) * chunk * vocab * FP32
    head = vocab * model.hidden * FP32
    total = buffers
    if model.head_trainable:
        total = max(buffers, chunk * vocab * FP32 + head) + head
    total += 2 * n_tok * model.hidden * FP32
    if step.precision == "bf16":
        total += vocab * model.hidden * 2
    return total


def teacher_bytes(teacher: ModelSizes, step: StepShape, t: int) -> int:
    """The frozen teacher: whole, or with --fsdp its decoder layers sharded (the root stays whole)."""
    if not step.fsdp:
        return teacher.params * t
    return (teacher.root_params + sum(layer.params for layer in teacher.layers) // step.world) * t


def optimizer_temporaries(model: ModelSizes, step: StepShape) -> int:
    """AdamW's temporaries at its step: on CPU one tensor at a time (sqrt and division: 2 · largest · 4);
    on GPU the fused kernel none, the foreach one (FSDP) a sqrt of every shard (P_train · 4 / S)."""
    if step.device == "cpu":
        return 2 * model.largest_trainable * FP32
    return model.trainable * FP32 // step.shards if step.fsdp else 0


def fsdp_gathered(model: ModelSizes, teacher: ModelSizes, step: StepShape, t: int) -> int:
    """FSDP's unsharded parameters during a step: the student's root (kept whole through the step) and
    two decoder layers (the current one and the prefetched one) in the compute dtype, two teacher layers."""
    if not step.fsdp:
        return 0
    layer = max((x.params for x in model.layers), default=0)
    teacher_layer = max((x.params for x in teacher.layers), default=0)
    return (model.root_params + 2 * layer) * step.compute_bytes + 2 * teacher_layer * t


def plan_memory(
    model: ModelSizes,
    teacher: ModelSizes,
    step: StepShape,
    *,
    stored_bytes: int,
    teacher_stored_bytes: int,
    runtime: int = 0,
) -> MemoryPlan:
    """The memory of one process of the run; `stored_bytes` are the student's file bytes (read whole,
    then copied into the fp32 model), `teacher_stored_bytes` the teacher's file bytes resident beside
    its weights while it loads, `runtime` what the process holds besides (python, torch, the tokenizer
    and the data: measured, on CPU)."""
    S, c = step.shards, step.compute_bytes
    t = 2 if step.precision == "bf16" else FP32
    ddp = step.world > 1 and not step.fsdp
    n_tok = step.tokens
    rows = [
        Row("student weights", model.params * FP32 // S, f"P_s {model.params:,} x 4 / {S}"),
        Row(
            "teacher weights",
            teacher_bytes(teacher, step, t),
            f"P_t {teacher.params:,} x {t}" + (f", its layers / {step.world}" if step.fsdp else ""),
        ),
        Row("gradients", model.trainable * FP32 // S, f"P_train {model.trainable:,} x 4 / {S}"),
        Row(
            "optimizer state",
            (2 * model.trainable * FP32 + FP32 * model.trainable_tensors) // S,
            f"AdamW: 2 x P_train x 4 + 4 x {model.trainable_tensors} steps, / {S}",
        ),
        Row("DDP buckets", model.trainable * FP32 if ddp else 0, "P_train x 4 under DDP"),
        Row(
            "validation cache",
            step.val_blocks * step.seq_len * teacher.hidden * t,
            f"{step.val_blocks} blocks x {step.seq_len} x d_t {teacher.hidden} x {t}",
        ),
        Row(
            "activations",
            activations(model, step),
            f"{len(model.layers)} layers, {step.micro_batch} x {step.seq_len} tokens, {step.precision}"
            + (f", {step.checkpointed_layers} checkpointed" if step.checkpointed_layers else ""),
        ),
        Row("KD loss (logits)", kd_loss_bytes(model, teacher, step), f"vocab {min(model.vocab, teacher.vocab):,}"),
        Row("teacher hidden", n_tok * teacher.hidden * t, f"N {n_tok} x d_t {teacher.hidden} x {t}"),
        Row("FSDP gathered", fsdp_gathered(model, teacher, step, t), f"root + 2 layers x {c}"),
        Row("optimizer temporaries", optimizer_temporaries(model, step), "AdamW's step"),
        Row("runtime", runtime, "python, torch, tokenizer, data (measured)"),
    ]
    b = {r.name: r.bytes for r in rows}
    persistent = sum(b[k] for k in ("student weights", "teacher weights", "optimizer state", "DDP buckets"))
    persistent += b["validation cache"] + b["FSDP gathered"] + runtime
    forward = persistent + b["activations"] + b["KD loss (logits)"] + b["teacher hidden"]
    if step.accumulation > 1:
        forward += b["gradients"]
    optimizer = persistent + b["gradients"] + b["optimizer temporaries"]
    recompute = recomputed_layer(model, step)
    backward = persistent + b["gradients"] + recompute if recompute else 0
    student_loads = stored_bytes + model.params * FP32
    teacher_loads = model.params * FP32 + teacher_stored_bytes + teacher.params * t
    loading = runtime + max(student_loads, teacher_loads)
    return MemoryPlan(tuple(rows), forward, optimizer, backward, loading, step.device)
