"""Local (layer-wise) distillation: train each converted layer's MLA attention, one layer at a time,
to reproduce the teacher's attention output. No full-model backward; one teacher pass.

For converted layer i, with teacher attention A_t, student attention A_s (MLA), the layer's input
RMSNorm N_i and hidden states h entering the layer (teacher's h^t, student's h^s):

    x_i    = N_i(h_i)                          the student's attention input: h = h^t ("teacher"
                                               inputs) or h = h^s, its own ("student" inputs)
    y_i    = A_t(N_i(h_i^t)) + (h_i^t − h_i)   the target: the teacher's hidden state after the
                                               attention, minus the residual the student brings
    loss_i = Σ ||A_s(x_i) − y_i||² / Σ ||y_i||²

so that h_i + A_s(x_i) matches the teacher's h_i^t + A_t(N_i(h_i^t)). With teacher inputs
h = h^t and y_i is just the teacher's attention output. The error reported per layer is the
relative output error sqrt(loss_i), before and after training (Adam, a few epochs over the
calibration tokens). A layer whose error is already below ``skip_below`` (an exact full-rank
init) is left unchanged.

Memory: the hidden states of the calibration tokens are kept for one layer at a time, in the
model's dtype: h^t, the layer's inputs x and targets y (3·N·d values for N tokens of hidden size
d), and with student inputs h^s too (4·N·d). In fp32: demo (d = 576), N = 16k: 113 MB (151 MB);
Llama-3.2-1B (d = 2048), N = 2k x 8: 403 MB (537 MB). ``LayerResult.held_bytes`` records it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..choices import LocalInputs, values
from ..errors import XecomlaError
from ..layerwise import Chunk, LayerRunner, attention_on, walk
from ..mla.attention import MLAAttention
from ..mla.rebuild import decoder_layers, mla_layers

INPUTS = values(LocalInputs)


@dataclass(frozen=True)
class LocalConfig:
    """How each converted layer is trained."""

    epochs: int = 4
    lr: float = 1e-3
    batch: int = 1  # sequences per Adam step (and per chunk of the layer walk)
    inputs: str = "teacher"  # "teacher": the teacher's hidden states; "student": the student's own
    skip_below: float = 1e-5  # relative error under which a layer is exact already and left alone
    bf16: bool = False  # training steps under bf16 autocast (fp32 weights; errors are measured in fp32)

    def to_dict(self) -> dict:
        return {
            "local_epochs": self.epochs,
            "local_lr": self.lr,
            "local_batch": self.batch,
            "local_inputs": self.inputs,
        }

    def __post_init__(self) -> None:
        if self.inputs not in INPUTS:
            raise XecomlaError(f"--local-inputs must be one of {', '.join(INPUTS)} (got '{self.inputs}')")
        if self.epochs < 1 or self.lr <= 0 or self.batch < 1:
            raise XecomlaError("local distillation needs --local-epochs >= 1, --local-lr > 0 and --local-batch >= 1")


@dataclass
class LayerResult:
    layer: int
    error_before: float
    error_after: float
    seconds: float
    trained: bool
    held_bytes: int = 0  # hidden states, inputs and targets held while training this layer

    def to_dict(self) -> dict:
        return {
            "layer": self.layer,
            "error_before": round(self.error_before, 6),
            "error_after": round(self.error_after, 6),
            "seconds": round(self.seconds, 2),
            "trained": self.trained,
            "held_bytes": self.held_bytes,
        }


@torch.no_grad()
def relative_error(attn, inputs: list[torch.Tensor], targets: list[torch.Tensor], chunks: list[Chunk]) -> float:
    """sqrt(Σ ||attn(x) − y||² / Σ ||y||²) over the calibration chunks."""
    err = ref = 0.0
    for x, y, chunk in zip(inputs, targets, chunks, strict=True):
        out = attention_on(attn, x, chunk)
        err += float((out.double() - y.double()).pow(2).sum())
        ref += float(y.double().pow(2).sum())
    return math.sqrt(err / max(ref, 1e-30))


def train_layer(
    attn: MLAAttention,
    inputs: list[torch.Tensor],
    targets: list[torch.Tensor],
    chunks: list[Chunk],
    cfg: LocalConfig,
    seed: int = 0,
) -> tuple[float, float]:
    """Adam on the relative squared output error of one attention module; returns (before, after).

    The module keeps its initial weights when training did not lower the error."""
    before = relative_error(attn, inputs, targets, chunks)
    if before < cfg.skip_below:
        return before, before
    initial = {k: v.detach().clone() for k, v in attn.state_dict().items()}
    ref = sum(float(y.double().pow(2).sum()) for y in targets)
    params = [p for p in attn.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    g = torch.Generator().manual_seed(seed)
    was_training = attn.training
    attn.train()
    device = inputs[0].device.type
    for _ in range(cfg.epochs):
        for k in torch.randperm(len(chunks), generator=g).tolist():
            with torch.autocast(device, dtype=torch.bfloat16, enabled=cfg.bf16):
                out = attention_on(attn, inputs[k], chunks[k])
            loss = (out.float() - targets[k]).pow(2).sum() / ref * len(chunks)  # the chunk's share of the whole loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    attn.train(was_training)
    after = relative_error(attn, inputs, targets, chunks)
    if after >= before:
        attn.load_state_dict(initial)
        return before, before
    return before, after


def local_distill(
    student,
    teacher,
    input_ids: torch.Tensor,
    cfg: LocalConfig,
    progress: Callable[[LayerResult], None] | None = None,
) -> list[LayerResult]:
    """Train every converted layer of ``student`` (in place) on ``input_ids`` (B, T); layers in order.

    Only the MLA attention modules change; every other parameter is left as it is."""
    layers = mla_layers(student)
    if not layers:
        raise XecomlaError("the student has no MLA layers to distil locally: pass an init-svd checkpoint")
    if len(decoder_layers(student)) != len(decoder_layers(teacher)):
        raise XecomlaError("the teacher has a different number of layers from the student: pick the student's source")
    t_run = LayerRunner(teacher, input_ids, micro_batch=cfg.batch)
    s_run = LayerRunner(student, input_ids, micro_batch=cfg.batch) if cfg.inputs == "student" else None
    results = []
    for i in walk([t_run] if s_run is None else [t_run, s_run], layers):
        start = time.perf_counter()
        t_layer, s_layer = decoder_layers(teacher)[i], decoder_layers(student)[i]
        with torch.no_grad():
            targets = []
            inputs = []
            for k, c in enumerate(t_run.chunks):
                y = attention_on(t_layer.self_attn, t_layer.input_layernorm(c.h), c)
                h = c.h if s_run is None else s_run.chunks[k].h
                targets.append(y if s_run is None else y + (c.h - h))
                inputs.append(s_layer.input_layernorm(h))
        before, after = train_layer(s_layer.self_attn, inputs, targets, t_run.chunks, cfg, seed=i)
        held = [c.h for c in t_run.chunks] + inputs + targets
        held += [c.h for c in s_run.chunks] if s_run is not None else []
        nbytes = sum(t.numel() * t.element_size() for t in held)
        result = LayerResult(i, before, after, time.perf_counter() - start, before >= cfg.skip_below, nbytes)
        results.append(result)
        if progress is not None:
            progress(result)
        del inputs, targets
    return results
