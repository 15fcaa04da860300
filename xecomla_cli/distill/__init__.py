"""Knowledge distillation of an MLA student from a teacher (single process, or torchrun DDP/FSDP).

One optimizer step is written out once, in ``trainer`` (its docstring's table).

Data positions are a function of the step (`BlockSampler`), so a run resumed from a saved state
(model, optimizer, scheduler, RNG, step) continues exactly where the killed run stopped.

Files, for an output directory OUT:
    OUT.run/metrics.jsonl     one JSON object per logged step / validation, while training
    OUT.run/data.safetensors  the packed blocks (tokenised once, reused on resume)
    OUT.run/state/            the resumable state, written atomically every --save-every steps
    OUT/                      the final stage checkpoint (+ metrics.jsonl); OUT.run is removed
Under torchrun every rank computes, rank 0 writes.

The recipe is ``run`` (`run_distill`); its components: ``config`` (options, resolved once into a
frozen config), ``plan`` (output paths, resume or not), ``dist`` (processes), ``models`` (student
and teacher), ``data`` (the packed-block cache), ``kd_loss`` (the chunked loss and its reference),
``module`` (the student and the loss in one module), ``trainer`` (steps, validation, LR
schedule), ``validation`` (KL and perplexities on held-out blocks), ``state`` (resumable state),
``metrics`` and ``progress`` (what a run reports), ``output`` (the distilled stage checkpoint).
``distill --local`` is the recipe ``local_run`` over ``local`` (layer-wise training).
"""

from .config import DistillConfig, ResolvedConfig, resolve_config
from .run import run_distill

__all__ = ["DistillConfig", "ResolvedConfig", "resolve_config", "run_distill"]
