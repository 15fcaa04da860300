"""The tensors of a safetensors directory, read one at a time: what the streamed stages open instead
of a whole model.

A directory holds ``model.safetensors``, or shards listed by ``model.safetensors.index.json`` (Hugging
Face's layout, and xecomla's checkpoints). Each file is opened once with ``safetensors.safe_open``
(which checks its header and gives shapes and dtypes); a tensor is read with ``os.pread`` into memory
of its own, in the dtype it has on disk, and costs memory only while it is held. (Reading through the
memory map instead would leave every page read in the process's resident set until the file is
closed: 2.0 GB after reading every layer of a 2.5 GB model once, which a streamed stage must not keep.)

    weights = WeightsOnDisk(directory)
    weights.names                                  # every tensor name, in file order
    weights.get("model.layers.3.self_attn.k_proj.weight")          # that tensor, as stored
    weights.with_prefix("model.layers.3.")         # {name: tensor} of one decoder layer
    weights.shape(name), weights.dtype(name), weights.nbytes()     # read from the headers only
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .errors import XecomlaError
from .loaded import first_line

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def weight_files(directory: Path, label: str) -> dict[str, list[str] | None]:
    """{file name: the tensor names the index gives it (None: read them from the file)}."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise XecomlaError(f"{label}: {INDEX_FILE} is unreadable ({first_line(exc)}): re-create it") from None
        files: dict[str, list[str] | None] = {}
        for name, file in weight_map.items():
            files.setdefault(file, []).append(name)  # type: ignore[union-attr]
        return files
    if (directory / WEIGHTS_FILE).is_file():
        return {WEIGHTS_FILE: None}
    singles = sorted(p.name for p in directory.glob("*.safetensors"))
    if len(singles) == 1:
        return {singles[0]: None}
    raise XecomlaError(f"{label} has no {WEIGHTS_FILE} (or {INDEX_FILE}): it is incomplete")


class WeightsOnDisk:
    """Lazy, memory-mapped access to the tensors of one safetensors directory."""

    def __init__(self, directory: str | Path, label: str | None = None):
        from safetensors import safe_open

        self.directory = Path(directory)
        self.label = label or f"'{self.directory}'"
        self._handles = {}
        self._file_of: dict[str, str] = {}
        self._data_start: dict[str, int] = {}  # file -> byte offset of its data (after the header)
        self._headers: dict[str, dict] = {}  # file -> its header: name -> {"data_offsets": [a, b], ...}
        for file, names in weight_files(self.directory, self.label).items():
            path = self.directory / file
            if not path.is_file():
                raise XecomlaError(f"{self.label} is missing weight shard {file}: it is incomplete")
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as exc:  # safetensors raises its own error types for bad headers
                raise XecomlaError(f"{self.label}: weights '{path}' are corrupt ({first_line(exc)})") from None
            self._handles[file] = handle
            with open(path, "rb") as f:  # safe_open checked the header already
                n = int.from_bytes(f.read(8), "little")
                self._headers[file] = json.loads(f.read(n))
                self._data_start[file] = 8 + n
            for name in names if names is not None else handle.keys():
                self._file_of[name] = file

    @property
    def names(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def _slice(self, name: str):
        if name not in self._file_of:
            raise XecomlaError(f"{self.label} has no tensor '{name}': it does not match its config")
        return self._handles[self._file_of[name]].get_slice(name)

    def get(self, name: str) -> torch.Tensor:
        """One tensor as stored (its dtype on disk), read into memory of its own."""
        sl = self._slice(name)
        start, stop = self._offsets(name)
        return self._read(self._file_of[name], start, stop - start, tuple(sl.get_shape()), _DTYPES[sl.get_dtype()])

    def _offsets(self, name: str) -> tuple[int, int]:
        """The tensor's byte range in its file, from the header."""
        file = self._file_of[name]
        a, b = self._headers[file][name]["data_offsets"]
        base = self._data_start[file]
        return base + a, base + b

    def _read(self, file: str, offset: int, nbytes: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype)
        buf = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if nbytes else memoryview(b"")
        fd = os.open(self.directory / file, os.O_RDONLY)
        try:
            done = 0
            while done < nbytes:
                got = os.preadv(fd, [buf[done : min(nbytes, done + (1 << 30))]], offset + done)
                if got <= 0:
                    raise XecomlaError(f"{self.label}: weights '{self.directory / file}' are truncated")
                done += got
        finally:
            os.close(fd)
        return out

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop-1 of one tensor, as stored (only those rows are read)."""
        shape = self.shape(name)
        start, stop = max(0, start), min(shape[0], stop)
        row = self.dtype(name).itemsize * (self.numel(name) // max(shape[0], 1))
        first, _ = self._offsets(name)
        return self._read(
            self._file_of[name], first + start * row, (stop - start) * row, (stop - start, *shape[1:]), self.dtype(name)
        )

    def with_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """{name: tensor} of every tensor whose name starts with ``prefix`` (one layer: 'model.layers.3.')."""
        return {name: self.get(name) for name in self._file_of if name.startswith(prefix)}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self._slice(name).get_dtype()]

    def numel(self, name: str) -> int:
        n = 1
        for s in self.shape(name):
            n *= s
        return n

    def nbytes(self) -> int:
        """The bytes of every tensor, from the headers."""
        return sum(self.numel(n) * self.dtype(n).itemsize for n in self._file_of)

    def floating_dtype(self) -> torch.dtype:
        """The dtype of the floating-point tensors (the most common one if they differ): the model's precision."""
        counts: dict[torch.dtype, int] = {}
        for name in self._file_of:
            dt = self.dtype(name)
            if dt.is_floating_point:
                counts[dt] = counts.get(dt, 0) + self.numel(name)
        return max(counts, key=counts.get) if counts else torch.float32


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
