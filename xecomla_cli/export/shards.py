"""Safetensors shards written tensor by tensor: each shard's header (names, dtypes, shapes, offsets) is written
first from a layout known in advance, then the tensors as they come, so that memory holds one group (one decoder
layer), never the model.

Files as ``huggingface_hub.save_torch_state_dict`` names them: ``model.safetensors`` when everything fits in one
shard, else ``model-0000k-of-0000n.safetensors`` and ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from ..errors import XecomlaError

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


def one_by_one(groups: Iterable[dict]) -> Iterator[tuple[str, object]]:
    """(name, tensor) of each group in turn, each taken out of its group as it is given: once the caller drops it,
    nothing holds it (a plain nested loop would keep the previous group alive while the next one is made)."""
    for group in groups:
        while group:
            name = next(iter(group))
            yield name, group.pop(name)
        del group


def plan_shards(layout: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype, max_bytes: int) -> list[list[int]]:
    """Tensor indices per shard, in order: a new shard when the next tensor would pass ``max_bytes``."""
    shards: list[list[int]] = [[]]
    size = 0
    for k, (_, shape) in enumerate(layout):
        n = _nbytes(shape, dtype)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    return shards


def _header(entries: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype) -> bytes:
    """The safetensors header: 8-byte length, then the JSON (padded with spaces to 8 bytes)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        n = _nbytes(shape, dtype)
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_shards(
    directory: Path,
    layout: list[tuple[str, tuple[int, ...]]],
    groups: Iterable[dict[str, torch.Tensor]],
    dtype: torch.dtype,
    max_bytes: int,
) -> list[str]:
    """Write the tensors ``groups`` yields (in ``layout``'s order, each of its shape and ``dtype``) as shards; returns
    the file names. A tensor out of order or of another shape is an internal error (nothing is left half-said)."""
    shards = plan_shards(layout, dtype, max_bytes)
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    shard_of = {k: s for s, members in enumerate(shards) for k in members}
    handles: dict[int, object] = {}
    stream = one_by_one(groups)
    try:
        for k, (name, shape) in enumerate(layout):
            got = next(stream, None)
            if got is None or got[0] != name or tuple(got[1].shape) != shape or got[1].dtype != dtype:
                seen = "nothing" if got is None else f"{got[0]} {tuple(got[1].shape)} {got[1].dtype}"
                raise XecomlaError(
                    f"export: expected {name} {shape} {dtype}, got {seen}: report this with the checkpoint's "
                    "xecomla.json"
                )
            s = shard_of[k]
            if s not in handles:
                for f in handles.values():
                    f.close()
                handles = {s: open(directory / files[s], "wb")}  # noqa: SIM115 (closed below)
                handles[s].write(_header([layout[j] for j in shards[s]], dtype))
            handles[s].write(got[1].contiguous().view(torch.uint8).numpy().data)
            del got  # before the next tensor (the next layer) is made
        if next(stream, None) is not None:
            raise XecomlaError("export: more tensors than its layout: report this with the checkpoint's xecomla.json")
    finally:
        for f in handles.values():
            f.close()
    if n > 1:
        weight_map = {layout[k][0]: files[s] for s, members in enumerate(shards) for k in members}
        total = sum(_nbytes(shape, dtype) for _, shape in layout)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    for f in files:
        (directory / f).chmod(0o644)
    return files
