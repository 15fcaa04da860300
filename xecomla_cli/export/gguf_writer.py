"""Writing a GGUF file with the ``gguf`` library: keys, tokenizer, tensors in the chosen weight type.

Weight types follow llama.cpp's converter (``--outtype``): 1-D tensors and norms stay f32; every
matrix is f32, f16, bf16 or q8_0; a q8_0 matrix whose rows are not a multiple of 32 falls back to f16.
``rounded`` gives the values llama.cpp will read back, for the verification's reference.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import XecomlaError
from .gguf_tokenizer import TokenizerMeta
from .shards import one_by_one


class OutType(str, Enum):
    """GGUF weight types, named as llama.cpp's ``--outtype``."""

    f32 = "f32"
    f16 = "f16"
    bf16 = "bf16"
    q8_0 = "q8_0"


def _qtypes():
    from gguf import GGMLQuantizationType as Q
    from gguf import LlamaFileType as F

    return {
        OutType.f32: (Q.F32, F.ALL_F32),
        OutType.f16: (Q.F16, F.MOSTLY_F16),
        OutType.bf16: (Q.BF16, F.MOSTLY_BF16),
        OutType.q8_0: (Q.Q8_0, F.MOSTLY_Q8_0),
    }


def tensor_qtype(name: str, shape: tuple[int, ...], outtype: OutType):
    """The ggml type a tensor of this shape is stored in (llama.cpp's converter rules)."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return Q.F32
    qtype = _qtypes()[OutType(outtype)][0]
    if shape[-1] % GGML_QUANT_SIZES[qtype][0]:
        return Q.F16
    return qtype


def stored_nbytes(shape: tuple[int, ...], qtype) -> int:
    """The bytes a tensor of this shape takes in ``qtype``."""
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    n = 1
    for s in shape:
        n *= s
    return n // block * size


ENCODE_ROWS = 16384  # rows encoded at a time: the encoder's temporaries stay small beside a 128k-row embedding


def encode(name: str, data: np.ndarray, outtype: OutType) -> tuple[np.ndarray, object]:
    """(stored bytes or array, ggml type) of one tensor, encoded ``ENCODE_ROWS`` rows at a time (every type
    encodes rows independently: blocks run along the last dim)."""
    from gguf import quants

    qtype = tensor_qtype(name, data.shape, outtype)
    if data.ndim < 2 or data.shape[0] <= ENCODE_ROWS:
        return quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype), qtype
    first = quants.quantize(np.ascontiguousarray(data[:ENCODE_ROWS], dtype=np.float32), qtype)
    out = np.empty((data.shape[0], *first.shape[1:]), dtype=first.dtype)
    out[:ENCODE_ROWS] = first
    for a in range(ENCODE_ROWS, data.shape[0], ENCODE_ROWS):
        out[a : a + ENCODE_ROWS] = quants.quantize(np.ascontiguousarray(data[a : a + ENCODE_ROWS], np.float32), qtype)
    return out, qtype


def rounded(name: str, data: np.ndarray, outtype: OutType) -> np.ndarray:
    """The float32 values llama.cpp reads back for this tensor."""
    from gguf import quants

    stored, qtype = encode(name, data, outtype)
    return quants.dequantize(stored, qtype).reshape(data.shape).astype(np.float32)


def write_gguf(
    path: Path,
    arch: str,
    keys: dict,
    layout: list[tuple[str, tuple[int, ...]]],
    groups: Iterable[dict[str, np.ndarray]],
    tokenizer: TokenizerMeta,
    outtype: OutType,
    name: str,
) -> dict[str, str]:
    """Write the file: keys and tensor infos from ``layout`` first, then the tensors ``groups`` yields (in that
    order and those shapes), each encoded as it comes; returns each tensor's stored type (for the report)."""
    import gguf

    writer = gguf.GGUFWriter(path, arch=arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_string("general.source.xecomla_version", __version__)
    for key, value in keys.items():
        getattr(writer, f"add_{key}")(value)
    writer.add_file_type(_qtypes()[OutType(outtype)][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokenizer.write(writer)
    types = {}
    for tensor_name, shape in layout:
        qtype = tensor_qtype(tensor_name, shape, outtype)
        writer.add_tensor_info(tensor_name, shape, np.dtype(np.float32), stored_nbytes(shape, qtype), raw_dtype=qtype)
        types[tensor_name] = qtype.name
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    stream = one_by_one(groups)
    for tensor_name, shape in layout:
        got = next(stream, None)
        if got is None or got[0] != tensor_name or tuple(got[1].shape) != tuple(shape):
            seen = "nothing" if got is None else f"{got[0]} {tuple(got[1].shape)}"
            raise XecomlaError(f"GGUF export: expected {tensor_name} {tuple(shape)}, got {seen}: report this")
        stored, _ = encode(tensor_name, got[1], outtype)
        del got
        writer.write_tensor_data(stored)
        del stored  # before the next tensor (the next layer) is made
    if next(stream, None) is not None:
        raise XecomlaError("GGUF export: more tensors than its layout: report this")
    writer.close()
    return types
