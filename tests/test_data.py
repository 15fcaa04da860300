"""Data sources -> tokenised, packed, held-out blocks (text.documents, text.packing, text.teacher)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from xecomla_cli.counts import parse_count
from xecomla_cli.errors import XecomlaError
from xecomla_cli.text.chat import has_chat_template, user_header
from xecomla_cli.text.documents import iter_documents
from xecomla_cli.text.packing import BlockSampler, pack, prepare_text_data, spread, steps_for_tokens, tokenize_document
from xecomla_cli.text.teacher import teacher_samples


def test_parse_count():
    assert parse_count("50k") == 50_000
    assert parse_count("2M") == 2_000_000
    assert parse_count("1.5B") == 1_500_000_000
    assert parse_count("1234") == 1234
    assert parse_count(7) == 7 and parse_count(None) is None
    for bad in ("lots", "1.5X", "-3", "0"):
        with pytest.raises(XecomlaError, match="--tokens"):
            parse_count(bad)


def test_text_jsonl_chat_and_directory(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("plain text document")
    rows = [
        {"text": "a text record"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"prompt": "Q: 1+1? ", "completion": "2"},
    ]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "ignored.bin").write_bytes(b"\0\1")
    docs = list(iter_documents(str(tmp_path), tokenizer))
    assert docs[0] == "plain text document"
    assert docs[1] == "a text record"
    assert docs[2] == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"  # chat template
    assert docs[3] == "Q: 1+1? 2"


def test_parquet_and_arrow(tmp_path, tokenizer):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"text": ["first row", "second row"], "id": [1, 2]})
    pq.write_table(table, tmp_path / "d.parquet")
    with pa.ipc.new_stream(tmp_path / "d.arrow", table.schema) as w:  # the layout `datasets` writes
        w.write_table(table)
    assert list(iter_documents(str(tmp_path / "d.parquet"), tokenizer)) == ["first row", "second row"]
    assert list(iter_documents(str(tmp_path / "d.arrow"), tokenizer)) == ["first row", "second row"]
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(XecomlaError, match="no 'text' or 'messages' column"):
        list(iter_documents(str(tmp_path / "bad.parquet"), tokenizer))


def test_bad_inputs_give_one_line_errors(tmp_path, tokenizer):
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(XecomlaError, match="line 2 is not valid JSON"):
        list(iter_documents(str(tmp_path / "x.jsonl"), tokenizer))
    (tmp_path / "y.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(XecomlaError, match="found: body"):
        list(iter_documents(str(tmp_path / "y.jsonl"), tokenizer))
    (tmp_path / "empty").mkdir()
    with pytest.raises(XecomlaError, match="no readable files"):
        list(iter_documents(str(tmp_path / "empty"), tokenizer))
    with pytest.raises(XecomlaError):
        list(iter_documents("./no/such/file.txt", tokenizer))


def test_tokenize_appends_eos(tokenizer):
    ids = tokenize_document("The quick brown fox", tokenizer)
    assert ids[-1] == tokenizer.eos_token_id
    assert ids[:-1] == tokenizer("The quick brown fox")["input_ids"]


def test_validation_is_held_out_per_document(tmp_path, tokenizer):
    """Long documents lose their tail to validation; nothing held out is trained on."""
    words = [f"w{i}" for i in range(3000)]  # distinct words: every token position is traceable
    (tmp_path / "long.txt").write_text(" ".join(words))
    seq = 32
    data = prepare_text_data(str(tmp_path / "long.txt"), tokenizer, seq, val_fraction=0.1, val_tokens=10**6)
    ids = tokenize_document(" ".join(words), tokenizer)
    assert data.tokens == len(ids)
    cut = len(ids) - int(len(ids) * 0.1)
    assert torch.equal(data.train.flatten(), torch.tensor(ids[: data.train.numel()]))
    assert data.train.numel() <= cut
    assert torch.equal(data.val.flatten(), torch.tensor(ids[cut : cut + data.val.numel()]))
    assert data.train.shape[1] == data.val.shape[1] == seq
    assert "validation blocks" in data.describe()


def test_short_documents_are_held_out_whole(tmp_path, tokenizer):
    lines = [json.dumps({"text": f"document number {i} says hello"}) for i in range(400)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines))
    data = prepare_text_data(str(tmp_path / "d.jsonl"), tokenizer, 16, val_fraction=0.1, val_tokens=10**6)
    assert data.documents == 400
    n_val = data.val.numel()
    assert 0.04 < n_val / (n_val + data.train.numel()) < 0.2
    with pytest.raises(XecomlaError, match="not one training block"):
        prepare_text_data(str(tmp_path / "d.jsonl"), tokenizer, 100_000)


def test_pack_and_spread():
    blocks = pack(torch.arange(10), 3)
    assert blocks.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    many = pack(torch.arange(100), 2)
    picked = spread(many, 5)
    assert len(picked) == 5 and picked[0, 0] == 0 and picked[-1, 0] == 98


def test_block_sampler_is_a_function_of_the_step():
    s = BlockSampler(10, 4, seed=3)
    first_epoch = torch.cat([s.indices(0), s.indices(1), s.indices(2)[:2]])
    assert sorted(first_epoch.tolist()) == list(range(10))  # every block once per epoch
    again = BlockSampler(10, 4, seed=3)
    assert torch.equal(again.indices(7), s.indices(7))  # no hidden state: resuming is exact
    assert not torch.equal(BlockSampler(10, 4, seed=4).indices(0), s.indices(0))
    assert steps_for_tokens(50_000, 8, 512) == 13


def test_teacher_samples_are_reproducible(tokenizer, tmp_path, monkeypatch):
    from conftest import make_model

    model = make_model("llama")
    a = teacher_samples(model, tokenizer, 3, 12, batch_size=2, seed=5, chat=False, cache_dir=tmp_path / "a")
    b = teacher_samples(model, tokenizer, 3, 12, batch_size=2, seed=5, chat=False, cache_dir=tmp_path / "b")
    assert a.shape == (3, 12) and torch.equal(a, b)
    assert (a[:, 0] == tokenizer.bos_token_id).all()
    assert int(a.max()) < len(tokenizer)
    assert not torch.equal(a, teacher_samples(model, tokenizer, 3, 12, seed=6, chat=False, cache_dir=tmp_path))
    # asking the cache for more samples only the missing blocks
    from xecomla_cli.text import teacher as teacher_text

    sampled = []
    plain = teacher_text.plain_samples
    monkeypatch.setattr(teacher_text, "plain_samples", lambda m, t, b, *a: sampled.append(b) or plain(m, t, b, *a))
    more = teacher_samples(model, tokenizer, 5, 12, batch_size=2, seed=5, chat=False, cache_dir=tmp_path / "a")
    assert more.shape == (5, 12) and torch.equal(more[:3], a) and sum(sampled) == 2
    again = teacher_samples(model, tokenizer, 5, 12, batch_size=2, seed=5, chat=False, cache_dir=tmp_path / "a")
    assert torch.equal(again, more) and sum(sampled) == 2


def test_inverse_cdf_draws_follow_the_softmax():
    from xecomla_cli.text.sampling import sample_next

    torch.manual_seed(0)
    logits = torch.tensor([2.0, 0.0, -1.0, float("-inf"), 1.0])
    for temperature in (1.0, 0.5):
        draws = sample_next(logits.expand(40_000, -1), temperature)
        freq = torch.bincount(draws, minlength=5).double() / draws.numel()
        probs = torch.softmax(logits.double() / temperature, dim=0)
        assert (freq - probs).abs().max() < 0.01  # 40k draws: 3 standard errors are < 0.008
        assert freq[3] == 0  # a token of probability zero is never drawn


def test_sampling_with_left_padding_matches_generate(tokenizer):
    """At a tiny temperature the sampler is greedy: left-padded prompts in one batch get what
    transformers' greedy generate gives each prompt alone (positions and mask are right)."""
    from conftest import make_model

    from xecomla_cli.text.chat import left_pad
    from xecomla_cli.text.sampling import sample

    model = make_model("llama").eval()
    prompts = [[5, 9, 13, 2, 7], [11, 4], [8, 8, 3]]
    ids, mask = left_pad(prompts, 0, torch.device("cpu"))
    got = sample(model, ids, mask, 6, [], temperature=1e-6)
    for row, prompt in zip(got, prompts, strict=True):
        x = torch.tensor([prompt])
        want = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=6, pad_token_id=0)
        assert row.tolist() == want[0, len(prompt) :].tolist()
    # a row that draws a stop token leaves the batch; the others go on exactly as before
    stop = int(got[1, 0])
    early = sample(model, ids, mask, 6, [stop], temperature=1e-6)
    assert early[1].tolist() == [stop] * early.shape[1]
    for k in (0, 2):
        want = got[k].tolist()
        want = want[: want.index(stop) + 1] if stop in want else want
        assert early[k, : len(want)].tolist() == want


def test_teacher_chat_samples_are_whole_conversations_and_cached(tokenizer, tmp_path, monkeypatch):
    from conftest import make_model

    from xecomla_cli.text import teacher as teacher_text

    model = make_model("llama")
    assert has_chat_template(tokenizer)
    assert user_header(tokenizer) == "<|im_start|>user\n"
    # every conversation: a sampled user turn, then the assistant header and a sampled answer
    for conv in teacher_text.chat_conversations(model, tokenizer, 2, temperature=1.0):
        text = tokenizer.decode(conv)
        assert text.startswith("<|im_start|>user\n")
        assert text.count("<|im_end|>\n<|im_start|>assistant\n") == 1
    blocks = teacher_samples(model, tokenizer, 4, 32, batch_size=3, seed=1, cache_dir=tmp_path)
    assert blocks.shape == (4, 32)
    assert tokenizer.decode(blocks[0].tolist()).startswith("<|im_start|>user\n")
    # a second run reads the cache instead of sampling again
    monkeypatch.setattr(teacher_text, "chat_conversations", lambda *a, **k: pytest.fail("sampled again"))
    again = teacher_samples(model, tokenizer, 3, 32, batch_size=3, seed=1, cache_dir=tmp_path)
    assert torch.equal(again, blocks[:3])


def test_hub_datasets_need_the_datasets_package(monkeypatch, tokenizer):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(XecomlaError, match="install `datasets`"):
        list(iter_documents("hf:wikitext:wikitext-2-raw-v1", tokenizer))


def test_tests_never_write_the_users_cache(private_cache, monkeypatch):
    """conftest points the cache at the session's tmp dir; without it, XDG_CACHE_HOME then ~/.cache."""
    from pathlib import Path

    from xecomla_cli.text.teacher import default_cache_dir

    assert default_cache_dir() == private_cache / "teacher-text"
    assert Path.home() not in default_cache_dir().parents
    monkeypatch.delenv("XECOMLA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere")
    assert default_cache_dir() == Path("/somewhere/xecomla/teacher-text")


def test_teacher_samples_cache_under_the_private_cache(private_cache):
    from conftest import make_model, make_tokenizer

    model, tokenizer = make_model("llama"), make_tokenizer()
    teacher_samples(model, tokenizer, 2, 8, batch_size=2, seed=11, chat=False)
    assert list((private_cache / "teacher-text").glob("plain-*.safetensors"))


def test_greedy_answers_are_the_teachers_own(tokenizer):
    """answer_temperature=0: each answer is what greedy generate gives the sampled question (seq-level KD)."""
    from conftest import make_model

    from xecomla_cli.text import teacher as teacher_text

    model = make_model("llama").eval()
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    gen = torch.Generator().manual_seed(3)
    for conv in teacher_text.chat_conversations(model, tokenizer, 2, 1.0, gen, answer_temperature=0.0):
        cut = tokenizer.decode(conv).index("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")
        start = tokenizer(tokenizer.decode(conv)[:cut], add_special_tokens=False)["input_ids"]
        answer = conv[len(start) : len(conv) - len(newline)]
        x = torch.tensor([start])
        want = model.generate(
            x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=len(answer), pad_token_id=0
        )
        assert answer == want[0, len(start) :].tolist()


def test_greedy_answer_blocks_mix_into_training_only(tokenizer, monkeypatch):
    """--greedy-answers f: f of the training blocks from a second sample (own seed, greedy answers);
    validation is always the first sample's; a text source or a plain teacher is refused."""
    from pathlib import Path

    from xecomla_cli.distill import DistillConfig, resolve_config
    from xecomla_cli.distill import data as data_mod
    from xecomla_cli.distill.dist import Dist

    calls = []

    def fake_samples(model, tok, n, seq_len, *, seed, answer_temperature, **kw):
        calls.append((n, seed, answer_temperature))
        return torch.full((n, seq_len), 0 if answer_temperature is None else 1)

    monkeypatch.setattr(data_mod, "teacher_samples", fake_samples)
    opts = DistillConfig(data="teacher", tokens=1024, seq_len=32, batch_size=4, val_tokens=64, greedy_answers=0.25)
    cfg = resolve_config(opts, student_source="s", device=torch.device("cpu"))
    got = data_mod.sample_teacher_data(cfg, tokenizer, None, Dist())
    n_train = cfg.budget_blocks
    assert calls[0] == (n_train + 2 - n_train // 4, 0, None) and calls[1][1:] == (data_mod.round_seed(0, -1), 0.0)
    assert got.train.shape[0] == n_train and int(got.train[:, 0].sum()) == n_train // 4
    assert int(got.val.sum()) == 0 and "greedy" in got.source
    log = lambda _m: None  # noqa: E731
    with pytest.raises(XecomlaError, match="--greedy-answers needs --data teacher"):
        data_mod.prepare_data(
            resolve_config(dataclasses.replace(opts, data="demo"), student_source="s", device=torch.device("cpu")),
            tokenizer, None, Dist(), Path("/nonexistent/data.safetensors"), log,
        )  # fmt: skip
    with pytest.raises(XecomlaError, match="give 0 to 1"):
        resolve_config(dataclasses.replace(opts, greedy_answers=1.5), student_source="s", device=torch.device("cpu"))


def test_data_mix_shares_the_blocks_evenly(tmp_path, tokenizer, monkeypatch):
    """--data teacher+FILE: half the training blocks from each source, interleaved (every batch holds
    both), the validation tokens shared; --greedy-answers applies to the teacher's share only."""
    from xecomla_cli.distill import DistillConfig, resolve_config
    from xecomla_cli.distill import data as data_mod
    from xecomla_cli.distill.dist import Dist

    calls = []

    def fake_samples(model, tok, n, seq_len, *, seed, answer_temperature, **kw):
        calls.append((n, answer_temperature))
        return torch.full((n, seq_len), -1 if answer_temperature is None else -2)

    monkeypatch.setattr(data_mod, "teacher_samples", fake_samples)
    text = tmp_path / "prose.txt"
    text.write_text(" ".join(f"word{i}" for i in range(3000)))
    opts = DistillConfig(data=f"teacher+{text}", tokens=2048, seq_len=32, batch_size=4, val_tokens=128)
    cfg = resolve_config(opts, student_source="s", device=torch.device("cpu"))
    got = data_mod.prepare_data(cfg, tokenizer, None, Dist(), tmp_path / "run" / "data.safetensors", lambda _m: None)
    n = cfg.budget_blocks
    assert got.train.shape == (n, 32) and n % 2 == 0
    from_teacher = got.train[:, 0] < 0
    assert from_teacher[0::2].all() and not from_teacher[1::2].any()  # A B A B ...
    assert got.val.shape[0] == (64 // 32) * 2 and int((got.val[:, 0] < 0).sum()) == 2
    assert "teacher" in got.source and "prose.txt" in got.source
    again = data_mod.prepare_data(cfg, tokenizer, None, Dist(), tmp_path / "run" / "data.safetensors", print)
    assert torch.equal(again.train, got.train) and len(calls) == 1  # cached: the teacher is not asked again

    greedy = resolve_config(
        dataclasses.replace(opts, greedy_answers=0.5), student_source="s", device=torch.device("cpu")
    )
    mixed = data_mod.mixed_data(greedy, data_mod.data_parts(greedy.data), tokenizer, None, Dist())
    assert int((mixed.train[0::2, 0] == -2).sum()) == n // 4  # half of the teacher's half
    with pytest.raises(XecomlaError, match="join different sources"):
        resolve_config(
            dataclasses.replace(opts, data="teacher+teacher"), student_source="s", device=torch.device("cpu")
        )
    with pytest.raises(XecomlaError, match="--greedy-answers needs --data teacher"):
        resolve_config(
            dataclasses.replace(opts, data=f"demo+{text}", greedy_answers=0.5),
            student_source="s",
            device=torch.device("cpu"),
        )
