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
Llama-3.2-1B (d = 2048), N = 2k x 8: 403 MB (537 MB). Held-out blocks add their own share (a
quarter in ``distill --local``). ``LayerResult.held_bytes`` records it.
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
    """One layer's errors. ``*_after`` are the trained weights' (the best epoch's on the held-out
    blocks), also when the guard restored the layer (``kept`` False): ``final_*`` is what stays."""

    layer: int
    error_before: float
    error_after: float
    seconds: float
    trained: bool
    held_bytes: int = 0  # hidden states, inputs and targets held while training this layer
    held_before: float | None = None  # the error on held-out blocks (None: no held-out blocks)
    held_after: float | None = None
    kept: bool = False  # the trained weights stay (False: the layer is as it was before training)
    epoch: int = 0  # the epoch whose weights stay (0: none)

    @property
    def final_error(self) -> float:
        return self.error_after if self.kept else self.error_before

    @property
    def final_held(self) -> float | None:
        return self.held_after if self.kept else self.held_before

    def to_dict(self) -> dict:
        r6 = lambda x: None if x is None else round(x, 6)  # noqa: E731
        return {
            "layer": self.layer,
            "error_before": r6(self.error_before),
            "error_after": r6(self.error_after),
            "held_error_before": r6(self.held_before),
            "held_error_after": r6(self.held_after),
            "kept": self.kept,
            "epoch": self.epoch,
            "seconds": round(self.seconds, 2),
            "trained": self.trained,
            "held_bytes": self.held_bytes,
        }


@dataclass
class LayerData:
    """One layer's attention inputs x, targets y and chunks (positions, mask, RoPE)."""

    inputs: list[torch.Tensor]
    targets: list[torch.Tensor]
    chunks: list[Chunk]

    def error(self, attn) -> float:
        return relative_error(attn, self.inputs, self.targets, self.chunks)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.inputs + self.targets)


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
    held: LayerData | None = None,
) -> LayerResult:
    """Adam on the relative squared output error of one attention module (``layer`` and
    ``seconds`` of the result are left 0 for the caller).

    With ``held``, the weights of the epoch with the lowest held-out error stay when that error is
    below the one before training; otherwise (and without ``held``, when the training error did not
    drop) the module's initial weights are restored exactly."""
    train = LayerData(inputs, targets, chunks)
    before = train.error(attn)
    held_before = held.error(attn) if held is not None else None
    if before < cfg.skip_below:
        return LayerResult(0, before, before, 0.0, False, held_before=held_before, held_after=held_before)
    initial = {k: v.detach().clone() for k, v in attn.state_dict().items()}
    best, best_held, best_epoch = initial, held_before, 0
    ref = sum(float(y.double().pow(2).sum()) for y in targets)
    params = [p for p in attn.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    g = torch.Generator().manual_seed(seed)
    was_training = attn.training
    device = inputs[0].device.type
    epoch_held = None
    for epoch in range(1, cfg.epochs + 1):
        attn.train()
        for k in torch.randperm(len(chunks), generator=g).tolist():
            with torch.autocast(device, dtype=torch.bfloat16, enabled=cfg.bf16):
                out = attention_on(attn, inputs[k], chunks[k])
            loss = (out.float() - targets[k]).pow(2).sum() / ref * len(chunks)  # the chunk's share of the whole loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        attn.eval()
        if held is not None:
            epoch_held = held.error(attn)
            if not math.isfinite(epoch_held):
                break
            if epoch_held < best_held:
                best, best_held, best_epoch = (
                    {k: v.detach().clone() for k, v in attn.state_dict().items()},
                    epoch_held,
                    epoch,
                )
    if held is None:
        after = train.error(attn)
        kept = after < before
        epoch, held_after = (cfg.epochs if kept else 0), None
    else:
        if best_epoch == 0:  # no epoch beat the start: report the last epoch's, restore the start
            after, held_after = train.error(attn), epoch_held
        else:
            attn.load_state_dict(best)
            after, held_after = train.error(attn), best_held
        kept, epoch = best_epoch > 0, best_epoch
    if not kept:
        attn.load_state_dict(initial)
    attn.train(was_training)
    return LayerResult(
        0, before, after, 0.0, True, held_before=held_before, held_after=held_after, kept=kept, epoch=epoch
    )


def local_distill(
    student,
    teacher,
    input_ids: torch.Tensor,
    cfg: LocalConfig,
    progress: Callable[[LayerResult], None] | None = None,
    held_ids: torch.Tensor | None = None,
) -> list[LayerResult]:
    """Train every converted layer of ``student`` (in place) on ``input_ids`` (B, T); layers in order.

    ``held_ids`` (B', T'): held-out blocks that decide, per layer, whether its training stays (the
    module docstring). Only the MLA attention modules change; every other parameter is left as it is."""
    layers = mla_layers(student)
    if not layers:
        raise XecomlaError("the student has no MLA layers to distil locally: pass an init-svd checkpoint")
    if len(decoder_layers(student)) != len(decoder_layers(teacher)):
        raise XecomlaError("the teacher has a different number of layers from the student: pick the student's source")
    own = cfg.inputs == "student"
    pairs = [
        (LayerRunner(teacher, ids, cfg.batch), LayerRunner(student, ids, cfg.batch) if own else None)
        for ids in ([input_ids] if held_ids is None else [input_ids, held_ids])
    ]
    runners = [r for pair in pairs for r in pair if r is not None]
    results = []
    for i in walk(runners, layers):
        start = time.perf_counter()
        t_layer, s_layer = decoder_layers(teacher)[i], decoder_layers(student)[i]
        data = [layer_data(t_layer, s_layer, t_run, s_run) for t_run, s_run in pairs]
        held = data[1] if len(data) > 1 else None
        result = train_layer(s_layer.self_attn, data[0].inputs, data[0].targets, data[0].chunks, cfg, seed=i, held=held)
        states = sum(c.h.numel() * c.h.element_size() for r in runners for c in r.chunks)
        result.layer, result.seconds = i, time.perf_counter() - start
        result.held_bytes = states + sum(d.nbytes for d in data)
        results.append(result)
        if progress is not None:
            progress(result)
        del data, held
    return results


@torch.no_grad()
def layer_data(t_layer, s_layer, t_run: LayerRunner, s_run: LayerRunner | None) -> LayerData:
    """Layer i's attention inputs x_i and targets y_i on one runner's chunks (module docstring)."""
    inputs, targets = [], []
    for k, c in enumerate(t_run.chunks):
        y = attention_on(t_layer.self_attn, t_layer.input_layernorm(c.h), c)
        h = c.h if s_run is None else s_run.chunks[k].h
        targets.append(y if s_run is None else y + (c.h - h))
        inputs.append(s_layer.input_layernorm(h))
    return LayerData(inputs, targets, t_run.chunks)
