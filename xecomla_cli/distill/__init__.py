"""Distillation of an MLA student: global KD from a teacher (single process, or torchrun DDP/FSDP),
layer-wise (--local), and the stages after KD: DPO (--dpo) and on-policy distillation (--on-policy).

One recipe (`recipe.py`) owns the run, in the manner of torchtune's recipes over components: the
student checkpoint read once, the options resolved once into a frozen config (`config`,
`policy_config`), the plan (`plan`: output paths, resume or not), the models (`models`), a batch
source and a loss (the objective: `kd`, `policy`, over the math in `kd_loss`, `module`, `dpo`,
`on_policy`, `preferences`), the optimizer step (`trainer`), the one loop (`loop`: steps, metrics
lines, validations, resumable states) with its fault handling (`faults`: Ctrl-C / SIGTERM, a
diverging loss), `state` (the resumable state), `metrics` and `progress` (what a run reports) and
`output` (the distilled stage checkpoint). ``distill --local`` is the recipe ``local_run`` over
``local`` (layer-wise training), with the same plan, models, data, validation, metrics and output.

Data positions are a function of the step (`BlockSampler`), so a run resumed from a saved state
(model, optimizer, scheduler, RNG, step) continues exactly where the stopped run stopped.

Files, for an output directory OUT:
    OUT.run/metrics.jsonl     one JSON object per logged step / validation, while training
    OUT.run/data.safetensors  the packed blocks (tokenised once, reused on resume)
    OUT.run/state/            the resumable state, written atomically every --save-every steps
    OUT/                      the final stage checkpoint (+ metrics.jsonl); OUT.run is removed
Under torchrun every rank computes, rank 0 writes.
"""

from .config import DistillConfig, ResolvedConfig, resolve_config
from .recipe import run_distill, run_policy

__all__ = ["DistillConfig", "ResolvedConfig", "resolve_config", "run_distill", "run_policy"]
