"""``inspect`` without loading the model: the architecture from the config (a meta-device model gives names,
shapes and the parameter count), the dtype from the safetensors headers, and each layer's stacked K/V read
alone from the safetensors files (memory: one layer's k_proj and v_proj).

Sources: an HF directory, a Hub id (its local snapshot), ``demo`` / a .gguf file (its de-quantized cache
directory, made by one ordinary load the first time), a stage checkpoint of an original model. An MLA
checkpoint is refused (its K/V are already factored: inspect its source). A source with pickle weights only,
or whose GGUF cache cannot be written, is loaded in memory as before (``inspect_source`` returns None).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import XecomlaError
from ..mla.kv_spectrum import stacked_kv_singular_values
from .report import architecture, report


def weights_directory(source: str, allow_pickle: bool) -> tuple[Path, str] | None:
    """(directory of safetensors + config, the source as the report names it), or None: load in memory."""
    from .. import dequantized
    from ..checkpoint import read_checkpoint_info
    from ..sources import load_model, portable_source, resolve

    resolved = resolve(source, allow_pickle=allow_pickle)
    if resolved.is_checkpoint:
        info = read_checkpoint_info(resolved.directory)
        if info.spec is not None:
            raise XecomlaError(
                f"'{source}' is an MLA checkpoint: inspect reads an original model's K/V projections; "
                f"inspect its source ({info.source}) instead"
            )
        return resolved.directory, info.source
    directory = resolved.directory
    if resolved.gguf_file:
        gguf = resolved.directory / resolved.gguf_file
        if dequantized.cached(gguf) is None:
            load_model(source, dtype="float32")  # de-quantizes once and caches the result as safetensors
        directory = dequantized.cached(gguf)
        if directory is None:
            return None
    if not list(directory.glob("*.safetensors")):
        return None  # pickle weights only: the ordinary load refuses them or reads them whole
    return directory, portable_source(source)


def meta_model(config):
    """The source's architecture on the meta device: names, shapes, parameter count; no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def inspect_source(
    source: str, *, ranks=None, rope_dim=None, context: int = 8192, batch: int = 1, allow_pickle: bool = False
) -> dict[str, Any] | None:
    """The report of ``inspection.report.inspect``, read one layer at a time; None where the source must be
    loaded in memory instead (``weights_directory``)."""
    from ..loaded import check_family, load_hf_config
    from ..weights_on_disk import WeightsOnDisk

    found = weights_directory(source, allow_pickle)
    if found is None:
        return None
    directory, name = found
    config = load_hf_config(directory, f"'{source}'")
    family = check_family(config)
    weights = WeightsOnDisk(directory, f"'{source}'")
    arch = architecture(meta_model(config), family, dtype=weights.floating_dtype())
    sv = {}
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}.self_attn."
        wk, wv = weights.get(prefix + "k_proj.weight"), weights.get(prefix + "v_proj.weight")
        sv[i] = stacked_kv_singular_values(wk.float(), wv.float())
    return report(name, config, arch, sv, ranks, rope_dim, context, batch)
