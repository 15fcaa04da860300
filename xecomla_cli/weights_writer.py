"""Safetensors shards written one tensor at a time: what the streamed stages write instead of a whole
state dict (``init.streamed``), so that a model is never whole in memory on the way out either.

The layout is planned first from every tensor's name, shape and dtype (a stage knows them before it
computes a single value), the way ``huggingface_hub.save_torch_state_dict`` shards a state dict: in
the given order, a new shard when the next tensor would take the current one past ``max_shard_bytes``
(a tensor larger than that alone in its shard); one shard is ``model.safetensors``, more are
``model-0000k-of-0000n.safetensors`` with ``model.safetensors.index.json``. Each file gets its header
at once and its full size; ``write(name, tensor)`` then puts a tensor's bytes at its offset, in any
order, and ``close()`` refuses a file with a tensor never written.

    writer = ShardedWriter(directory, [(name, shape, dtype), ...])
    writer.write(name, tensor)      # any order, each once
    writer.close()
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import XecomlaError

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 4 * 10**9  # huggingface_hub's "4GB" (decimal), as checkpoint.MAX_SHARD_SIZE
WRITE_BLOCK = 1 << 30  # bytes per os.pwrite call (Linux writes at most ~2 GiB at once)

SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass
class Slot:
    """Where one tensor goes: its file, its absolute byte offset there, and what it must be."""

    file: str
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    written: bool = False

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


def plan_shards(tensors: list[tuple[str, tuple[int, ...], torch.dtype]], max_bytes: int) -> list[list[int]]:
    """Indices of ``tensors`` per shard, as huggingface_hub splits a state dict."""
    shards: list[list[int]] = []
    current: list[int] | None = None
    size = 0
    for k, (_, shape, dtype) in enumerate(tensors):
        n = dtype.itemsize * int(torch.Size(shape).numel())
        if n > max_bytes:  # alone in its shard
            shards.append([k])
            current = None
            continue
        if current is None or size + n > max_bytes:
            current, size = [], 0
            shards.append(current)
        current.append(k)
        size += n
    return shards


class ShardedWriter:
    """Safetensors files of a planned layout, filled one tensor at a time (see the module docstring)."""

    def __init__(
        self,
        directory: str | Path,
        tensors: list[tuple[str, tuple[int, ...], torch.dtype]],
        max_shard_bytes: int | None = None,
    ):
        self.directory = Path(directory)
        max_shard_bytes = MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes
        names = [t[0] for t in tensors]
        if len(set(names)) != len(names):
            raise XecomlaError("the planned checkpoint names a tensor twice: a bug")
        shards = plan_shards(tensors, max_shard_bytes)
        self.slots: dict[str, Slot] = {}
        self.files: list[str] = []
        self.total = 0
        for k, shard in enumerate(shards):
            file = WEIGHTS_FILE if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            self.files.append(file)
            header: dict = {"__metadata__": {"format": "pt"}}
            start = 0
            for j in shard:
                name, shape, dtype = tensors[j]
                slot = Slot(file, start, tuple(int(s) for s in shape), dtype)
                header[name] = {
                    "dtype": SAFETENSORS_DTYPES[dtype],
                    "shape": list(slot.shape),
                    "data_offsets": [start, start + slot.nbytes],
                }
                self.slots[name] = slot
                start += slot.nbytes
            text = json.dumps(header, separators=(",", ":")).encode()
            text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
            base = 8 + len(text)
            for j in shard:
                self.slots[tensors[j][0]].offset += base
            with open(self.directory / file, "wb") as f:
                f.write(len(text).to_bytes(8, "little"))
                f.write(text)
                f.truncate(base + start)
            self.total += start
        self._fds = {file: os.open(self.directory / file, os.O_WRONLY) for file in self.files}

    @property
    def names(self) -> list[str]:
        return list(self.slots)

    def pending(self) -> list[str]:
        """The names not written yet."""
        return [n for n, s in self.slots.items() if not s.written]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Put one planned tensor's bytes in place (it must have the planned shape and dtype)."""
        slot = self.slots.get(name)
        if slot is None:
            raise XecomlaError(f"the checkpoint has no tensor '{name}' in its plan: a bug")
        if tuple(tensor.shape) != slot.shape or tensor.dtype != slot.dtype:
            got, want = f"{tuple(tensor.shape)} {tensor.dtype}", f"{slot.shape} {slot.dtype}"
            raise XecomlaError(f"tensor '{name}' is {got}, the plan says {want}: a bug")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(self._fds[slot.file], view[done : done + WRITE_BLOCK], slot.offset + done)
        slot.written = True

    def close(self) -> None:
        """Close the files, refusing any with a tensor never written; write the index of a sharded layout."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
        missing = self.pending()
        if missing:
            raise XecomlaError(f"the checkpoint's tensor '{missing[0]}' was never written: a bug")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": {n: s.file for n, s in self.slots.items()}}
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
        for file in self.files:
            (self.directory / file).chmod(0o644)

    def abort(self) -> None:
        """Close the files without checking (the caller is failing; the directory is removed)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
