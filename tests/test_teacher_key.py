"""Teacher text is reproducible: its cache key and its samples do not depend on the dtype the
teacher was loaded in, nor on the path or format it was loaded from."""

from __future__ import annotations

import pytest
import torch

from xecomla_cli.text.teacher import cache_key, sampling_model, teacher_samples

SETTINGS = ("plain", 12, 1.0, 5)  # kind, seq_len, temperature, seed


@pytest.fixture(scope="module")
def loads(tiny_model_dir, tmp_path_factory):
    """The same tiny teacher loaded four ways: its HF directory in fp32 and in bf16, a symlink to
    that directory, and a stage checkpoint written from the bf16 load."""
    from xecomla_cli.checkpoint import save_checkpoint
    from xecomla_cli.sources import load_model

    hf = tiny_model_dir("llama")
    tmp = tmp_path_factory.mktemp("teacher-key")
    link = tmp / "link"
    link.symlink_to(hf, target_is_directory=True)
    fp32 = load_model(str(hf), dtype="float32")
    bf16 = load_model(str(hf), dtype="bfloat16")
    ckpt = save_checkpoint(
        tmp / "ckpt", model=bf16.model, tokenizer=bf16.tokenizer, stage="inspect", spec=None, source=str(hf)
    )
    return {
        "hf fp32": fp32.model,
        "hf bf16": bf16.model,
        "symlink fp32": load_model(str(link), dtype="float32").model,
        "checkpoint fp32": load_model(str(ckpt), dtype="float32").model,
        "checkpoint bf16": load_model(str(ckpt), dtype="bfloat16").model,
    }


def test_the_teacher_text_cache_key_is_identical_for_the_same_settings_across_dtypes_and_load_paths(loads):
    keys = {how: cache_key(model, *SETTINGS) for how, model in loads.items()}
    assert len(set(keys.values())) == 1, keys
    assert {p.dtype for p in loads["hf bf16"].parameters()} == {torch.bfloat16}  # really two dtypes
    model = loads["hf fp32"]
    key = keys["hf fp32"]
    # any other setting, or other weights, gives another key
    for other in [("chat", 12, 1.0, 5), ("plain", 16, 1.0, 5), ("plain", 12, 0.8, 5), ("plain", 12, 1.0, 6)]:
        assert cache_key(model, *other) != key, other
    assert cache_key(model, *SETTINGS, batch_size=8) != key
    from conftest import make_model

    assert cache_key(make_model("llama", seed=1), *SETTINGS) != key
    changed = make_model("llama")  # the saved teacher's weights, one of them moved by more than bf16 rounding
    with torch.no_grad():
        changed.model.layers[2].mlp.down_proj.weight[3, 7] += 0.05
    assert cache_key(make_model("llama"), *SETTINGS) == key and cache_key(changed, *SETTINGS) != key


def test_the_same_settings_sample_the_same_text_from_any_load(loads, tokenizer, tmp_path):
    """Each load samples on its own (a fresh cache each): the same tokens, whatever the dtype or path."""
    got = {
        how: teacher_samples(model, tokenizer, 3, 12, batch_size=2, seed=5, chat=False, cache_dir=tmp_path / str(i))
        for i, (how, model) in enumerate(loads.items())
    }
    first = got["hf fp32"]
    assert all(torch.equal(first, v) for v in got.values()), got
    # the draws come from the seeded CPU generator, not the global RNG
    torch.manual_seed(123)
    again = teacher_samples(
        loads["hf fp32"], tokenizer, 3, 12, batch_size=2, seed=5, chat=False, cache_dir=tmp_path / "x"
    )
    assert torch.equal(again, first)


def test_the_sampling_model_is_the_weights_rounded_to_bf16_in_fp32_on_a_cpu(loads):
    fp32, bf16 = loads["hf fp32"], loads["hf bf16"]
    a, b = sampling_model(fp32), sampling_model(bf16)
    assert a is not fp32 and {p.dtype for p in fp32.parameters()} == {torch.float32}  # the teacher is untouched
    for (name, pa), pb, p in zip(a.named_parameters(), b.parameters(), fp32.parameters(), strict=True):
        assert pa.dtype == pb.dtype == torch.float32, name
        assert torch.equal(pa, pb) and torch.equal(pa, p.to(torch.bfloat16).float()), name


@pytest.mark.parametrize("chat", [False, True])
def test_the_same_settings_sample_the_same_blocks_whatever_was_asked_before(tokenizer, tmp_path, chat):
    """Round i of a sample has its own seeded draws: asking for 3 blocks then 7 caches the same
    bytes as asking for 7 at once, and a run stopped after a round resumes to the same bytes."""
    from conftest import make_model

    from xecomla_cli.text import teacher as teacher_text

    model = make_model("llama")
    seq_len = 160 if chat else 12  # a chat round of two conversations: a few blocks of 160

    def ask(n, where, batch_size=2):
        return teacher_samples(
            model, tokenizer, n, seq_len, batch_size=batch_size, seed=5, chat=chat, cache_dir=tmp_path / where
        )

    at_once = ask(7, "at-once")
    (cached,) = (tmp_path / "at-once").glob("*.safetensors")
    assert teacher_text._read_cache(cached, seq_len)[1] >= 3  # several rounds
    ask(3, "in-steps")
    assert torch.equal(ask(7, "in-steps"), at_once)
    ask(1, "three-steps")
    ask(4, "three-steps")
    assert torch.equal(ask(7, "three-steps"), at_once)
    # interrupted after its first round: the next run samples only what is missing, the same bytes
    real, calls = teacher_text._sample_round, []

    def dies_after_one(*args):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args)

    teacher_text._sample_round = dies_after_one
    try:
        with pytest.raises(KeyboardInterrupt):
            ask(7, "interrupted")
    finally:
        teacher_text._sample_round = real
    assert list((tmp_path / "interrupted").glob("*.safetensors"))  # the first round was kept
    assert torch.equal(ask(7, "interrupted"), at_once)
    assert not torch.equal(ask(7, "b3", batch_size=3), at_once)  # another batch size is another sample
    # two runs at once: one that finds rounds written by the other takes them up instead of sampling them
    outer, inner = [], []

    def other_run_meanwhile(*args):
        if inner:  # the other run's rounds
            return real(*args)
        outer.append(1)
        if len(outer) == 1:
            inner.append(1)
            ask(7, "together")  # the other run, start to end, while this one samples its first round
            inner.clear()
        return real(*args)

    teacher_text._sample_round = other_run_meanwhile
    try:
        assert torch.equal(ask(7, "together"), at_once) and len(outer) == 1
    finally:
        teacher_text._sample_round = real


def test_rounds_have_their_own_seeds():
    from xecomla_cli.text.teacher import round_seed

    seeds = {round_seed(s, i) for s in (0, 1, 1009) for i in range(2000)}
    assert len(seeds) == 6000 and all(0 <= x < 2**63 for x in seeds)


def test_a_cache_that_cannot_be_written_only_costs_time(tokenizer, tmp_path, monkeypatch):
    """Disk full or read-only: the text is sampled and returned all the same, and nothing half-written stays."""
    import safetensors.torch
    from conftest import make_model

    model = make_model("llama")
    want = teacher_samples(model, tokenizer, 3, 12, batch_size=2, seed=5, chat=False, cache_dir=tmp_path / "ok")

    def disk_full(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    got = teacher_samples(model, tokenizer, 3, 12, batch_size=2, seed=5, chat=False, cache_dir=tmp_path / "full")
    assert torch.equal(got, want) and not list((tmp_path / "full").iterdir())
