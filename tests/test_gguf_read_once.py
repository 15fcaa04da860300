"""Loading a GGUF source parses its header once (``loaded.gguf_read_once``), with the same result."""

from __future__ import annotations

import numpy as np


def tiny_gguf(path):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_token_list([f"t{i}" for i in range(50)])
    w.add_tensor("blk.0.attn_q.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_gguf_header_is_parsed_once_inside_and_as_before_outside(tmp_path):
    import gguf

    from xecomla_cli.loaded import gguf_read_once

    path = tiny_gguf(tmp_path / "m.gguf")
    before = gguf.GGUFReader(path)
    with gguf_read_once():
        a, b = gguf.GGUFReader(path), gguf.GGUFReader(str(path))
        assert a is b  # one parse for every load inside
        arch = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
        assert gguf.get_tensor_name_map(arch, 3) is not gguf.get_tensor_name_map(arch, 2)
    assert gguf.GGUFReader(path) is not gguf.GGUFReader(path)  # put back afterwards
    assert list(a.fields) == list(before.fields)
    assert [bytes(a.fields["tokenizer.ggml.tokens"].parts[i]) for i in a.fields["tokenizer.ggml.tokens"].data] == [
        f"t{i}".encode() for i in range(50)
    ]
    assert np.array_equal(a.tensors[0].data, before.tensors[0].data)
