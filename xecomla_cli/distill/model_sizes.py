"""The sizes `memory_plan` needs, read without loading any weights: the student's config and MLA spec
(xecomla.json), its safetensors headers, the teacher's config; the models are built on the meta
device (modules with shapes and no storage), so that every count is that of the modules the run
builds, freezing (`--freeze-non-mla`) included.

    plan_distill(ckpt, options, world=N, device="cuda")   -> DistillPlan (resolved config, plan)
"""

from __future__ import annotations

import contextlib
import resource
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import CheckpointInfo, build_model, read_checkpoint_info
from ..errors import XecomlaError
from ..host_memory import mem_available
from ..loaded import load_hf_config, parse_device
from ..mla.attention import MLAAttention
from ..mla.spec import attention_shape
from ..weights_on_disk import WeightsOnDisk
from .config import DistillConfig, ResolvedConfig, resolve_config
from .memory_plan import LayerShape, MemoryPlan, ModelSizes, StepShape, plan_memory
from .trainer import freeze_non_mla
from .validation import default_micro_batch


@dataclass(frozen=True)
class DistillPlan:
    """What `distill --plan` prints: the run's resolved config, its shape per process and its memory."""

    ckpt: Path
    cfg: ResolvedConfig
    step: StepShape
    student: ModelSizes
    teacher: ModelSizes
    memory: MemoryPlan
    device_memory: int | None  # bytes of the device (CPU: available RAM), when known
    device_label: str

    def to_dict(self) -> dict:
        step = self.step
        return {
            "student": str(self.ckpt),
            "teacher": self.cfg.teacher,
            "device": self.device_label,
            "processes": step.world,
            "fsdp": step.fsdp,
            "precision": step.precision,
            "batch_size": self.cfg.batch_size,
            "micro_batch": step.micro_batch,
            "accumulation": step.accumulation,
            "seq_len": step.seq_len,
            "checkpointed_layers": step.checkpointed_layers,
            "student_params": self.student.params,
            "trainable_params": self.student.trainable,
            "teacher_params": self.teacher.params,
            "memory": self.memory.to_dict(),
            "device_memory": self.device_memory,
            "fits": None if self.device_memory is None else self.memory.peak <= self.device_memory,
        }


def plan_distill(ckpt: str | Path, options: DistillConfig, *, world: int, device: str) -> DistillPlan:
    """The memory of one process of `distill CKPT` with these options, on `world` processes of `device`
    (cpu, cuda, auto: a GPU need not be present to plan for one)."""
    info = read_checkpoint_info(ckpt)
    dev = plan_device(device)
    cfg = resolve_config(options, student_source=info.source, device=dev, world=world)
    student_model = meta_student(info)
    if cfg.freeze_non_mla:
        freeze_non_mla(student_model)  # the run's own freezing: its error too
    student = model_sizes(student_model)
    teacher_model, teacher_files = meta_teacher(cfg.teacher, cfg.allow_pickle)
    teacher = model_sizes(teacher_model)
    step = step_shape(cfg, dev, world, len(student.layers))
    stored = WeightsOnDisk(info.directory, f"checkpoint '{info.path}'").nbytes()
    runtime = process_rss() if dev.type == "cpu" else 0
    teacher_dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    teacher_stored = converted_bytes(teacher_files, teacher_dtype, teacher.params)
    memory = plan_memory(
        student, teacher, step, stored_bytes=stored, teacher_stored_bytes=teacher_stored, runtime=runtime
    )
    available, label = device_memory(dev)
    return DistillPlan(info.path, cfg, step, student, teacher, memory, available, label)


def plan_device(name: str) -> torch.device:
    """The device a run would use; 'cuda' is accepted without a GPU here (planning a rented one)."""
    if name.startswith("cuda"):
        return torch.device("cuda")
    return parse_device(name)


def step_shape(cfg: ResolvedConfig, device: torch.device, world: int, n_layers: int) -> StepShape:
    """Blocks per forward and micro batches per step as `kd.KDObjective` chooses them."""
    local = cfg.batch_size // world
    micro = max(1, min(cfg.micro_batch or default_micro_batch(device, local, cfg.seq_len), local))
    checkpointed = 0
    if cfg.grad_checkpointing or cfg.checkpoint_layers is not None:
        checkpointed = n_layers if cfg.checkpoint_layers is None else min(cfg.checkpoint_layers, n_layers)
    val_blocks = max(1, cfg.val_tokens // cfg.seq_len)
    return StepShape(
        micro_batch=micro,
        seq_len=cfg.seq_len,
        accumulation=-(-local // micro),
        precision=cfg.precision,
        device=device.type,
        world=world,
        fsdp=cfg.fsdp,
        checkpointed_layers=checkpointed,
        val_blocks=-(-val_blocks // world),
        ce=cfg.ce_weight > 0,
    )


def meta_student(info: CheckpointInfo) -> nn.Module:
    """The student as the run builds it (fp32, MLA layers from the spec), on the meta device."""
    config = load_hf_config(info.directory, f"checkpoint '{info.path}'")
    with torch.device("meta"):
        model = build_model(config, info.spec, torch.float32)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # as load_checkpoint does
    return model


def meta_teacher(source: str, allow_pickle: bool) -> tuple[nn.Module, Path | None]:
    """The teacher's architecture on the meta device, from its config only (no weights are read), and
    the directory of the safetensors it loads from (None: not on this machine yet)."""
    from transformers import AutoModelForCausalLM

    from .. import dequantized
    from ..sources import load_config, resolve

    path = Path(source).expanduser()
    if source != "demo" and not path.exists():
        config, files = hub_config(source), None
    else:
        resolved = resolve(source, allow_pickle=allow_pickle)
        if resolved.is_checkpoint:
            return meta_student(read_checkpoint_info(resolved.directory)), resolved.directory
        files = resolved.directory
        if resolved.gguf_file:  # loaded from its de-quantized cache, when there is one
            files = dequantized.cached(resolved.directory / resolved.gguf_file)
        config = load_hf_config(files, f"'{source}'") if files else load_config(resolved)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config), files


def converted_bytes(directory: Path | None, dtype: torch.dtype, params: int) -> int:
    """The teacher's file bytes resident beside its weights while it loads: its safetensors when they
    are in another dtype (read, then converted); none when they are already in `dtype` (measured: the
    loaded weights are then those pages). Not on this machine yet: assume bf16 files (the Hub's usual)."""
    try:
        weights = WeightsOnDisk(directory) if directory is not None else None
    except XecomlaError:
        weights = None
    if weights is None:
        return 0 if dtype == torch.bfloat16 else params * 2
    return 0 if weights.floating_dtype() == dtype else weights.nbytes()


def hub_config(repo_id: str):
    """A Hub model's config.json alone (the local cache first)."""
    from huggingface_hub import hf_hub_download

    for local in (True, False):
        with contextlib.suppress(Exception):
            path = Path(hf_hub_download(repo_id, "config.json", local_files_only=local))
            return load_hf_config(path.parent, f"'{repo_id}'")
    raise XecomlaError(f"cannot read the config of '{repo_id}' (not a local path, not reachable on the Hub)")


def model_sizes(model: nn.Module) -> ModelSizes:
    """Parameter counts (each tensor once: tied embeddings count once) and the decoder layers' shapes."""
    params = list(model.parameters())
    trained = [p for p in params if p.requires_grad]
    head = model.lm_head.weight
    config = model.config
    return ModelSizes(
        params=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in trained),
        trainable_tensors=len(trained),
        largest_trainable=max((p.numel() for p in trained), default=0),
        head_trainable=head.requires_grad,
        vocab=head.shape[0],
        hidden=config.hidden_size,
        layers=tuple(layer_shape(layer, config) for layer in model.model.layers),
    )


def layer_shape(layer: nn.Module, config) -> LayerShape:
    attn = layer.self_attn
    shape = attention_shape(config)
    linear = sum(m.weight.numel() for m in layer.modules() if isinstance(m, nn.Linear))
    common = {
        "hidden": config.hidden_size,
        "intermediate": layer.mlp.gate_proj.out_features,
        "heads": shape["num_heads"],
        "head_dim": shape["head_dim"],
        "kv_heads": shape["num_kv_heads"],
        "linear_weights": linear,
        "params": sum(p.numel() for p in layer.parameters()),
    }
    if isinstance(attn, MLAAttention):
        return LayerShape(
            **common,
            qk_dim=attn.qk_head_dim,
            kv_rank=attn.kv_rank,
            rope_dim=attn.rope_dim,
            latent_norm=attn.kv_a_layernorm is not None,
        )
    return LayerShape(**common, qk_dim=shape["head_dim"], kv_rank=None, rope_dim=0, latent_norm=False)


def process_rss() -> int:
    """This process's peak resident memory so far (python, torch, transformers imported): what a run
    holds before its first tensor."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_memory(device: torch.device) -> tuple[int | None, str]:
    """(bytes, label): a GPU's total memory when one is visible; on CPU the RAM available now."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None, "cuda (none here: compare the total with the GPU's memory)"
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return props.total_memory, f"cuda: {props.name}"
    available = mem_available()
    return available, "cpu: RAM available now"
