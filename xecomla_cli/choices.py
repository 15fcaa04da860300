"""The fixed choices of the command line as Enums: Typer lists them in --help and refuses anything
else while parsing. Commands pass ``.value`` on; the library takes (and checks) plain strings."""

from __future__ import annotations

from enum import Enum


class Precision(str, Enum):
    """distill --precision."""

    AUTO = "auto"  # bf16 autocast over fp32 weights on GPU and on CPUs with AMX, else fp32
    BF16 = "bf16"
    FP32 = "fp32"


class LocalInputs(str, Enum):
    """distill --local-inputs: the hidden states a layer is trained on."""

    TEACHER = "teacher"
    STUDENT = "student"


class Divergence(str, Enum):
    """distill --on-policy --divergence: what the teacher's scores on the student's answers minimise."""

    REVERSE = "reverse"  # KL(student ‖ teacher)
    FORWARD = "forward"  # KL(teacher ‖ student)
    JSD = "jsd"  # generalised Jensen-Shannon (GKD's β 0.5)


class ExportFormat(str, Enum):
    """export --format."""

    HF = "hf"  # DeepSeek-V3 layout for stock transformers / vLLM
    GGUF = "gguf"  # one llama.cpp file (deepseek2 for MLA, llama for an original model)
    XECOMLA = "xecomla"  # our own format (any checkpoint)


class KvSvdRows(str, Enum):
    """init-svd --kv-svd-rows: the K/V rows the paper init's latent covers."""

    ALL = "all"
    NOPE_V = "nope-v"


class RopeFrequencies(str, Enum):
    """init-svd --rope-frequencies: how a source with scaled RoPE (Llama 3) keeps it (``init.engine_ready``)."""

    DEFAULT = "default"  # default RoPE at dim p: every engine reads it exactly
    SOURCE = "source"  # the source's scaled frequencies: exact in transformers and xecomla only


class AttentionBias(str, Enum):
    """init-svd --attention-bias: what a source's q/k/v biases (Qwen2) become (``init.engine_ready``)."""

    FOLD = "fold"  # folded into the weights: bias-free, every engine loads it
    KEEP = "keep"  # kept exactly: xecomla and --format xecomla only


def values(choice: type[Enum]) -> tuple[str, ...]:
    return tuple(c.value for c in choice)


DEFAULT_METHOD = (
    "transmla"  # init-svd --method when not given: the best after training (docs/reference/init-methods.md)
)
DEFAULT_CALIB_DATA = "teacher"  # init-svd --calib-data when not given ('teacher', 'shakespeare' or a path)
