"""Local (layer-wise) distillation: the objective, exactness, training, hybrid layers, memory."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_model

from xecomla_cli.distill.local import LocalConfig, local_distill, relative_error
from xecomla_cli.distill.local_run import held_out_blocks, local_metrics
from xecomla_cli.errors import XecomlaError
from xecomla_cli.init import build_spec, convert_model
from xecomla_cli.mla.rebuild import decoder_layers


def converted(teacher, **kw):
    student = copy.deepcopy(teacher)
    convert_model(student, build_spec(student.config, **kw))
    return student


@pytest.fixture(scope="module")
def setup():
    teacher = make_model("llama")
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    return teacher, ids


def independent_errors(teacher, student, ids) -> list[float]:
    """Each layer's relative output error with the teacher's inputs, from forward hooks."""
    seen = {}
    hooks = [
        layer.self_attn.register_forward_hook(
            lambda m, args, kwargs, out, i=i: seen.__setitem__(i, (kwargs, out[0])), with_kwargs=True
        )
        for i, layer in enumerate(decoder_layers(teacher))
    ]
    with torch.no_grad():
        teacher(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    errors = []
    for i, layer in enumerate(decoder_layers(student)):
        kwargs, y = seen[i]
        with torch.no_grad():
            out = layer.self_attn(**kwargs)[0]
        errors.append(float((out - y).norm() / y.norm()))
    return errors


def test_objective_at_step_zero_is_the_relative_output_error(setup):
    teacher, ids = setup
    student = converted(teacher, kv_rank=8, rope_dim=8)
    expected = independent_errors(teacher, student, ids)
    results = local_distill(copy.deepcopy(student), teacher, ids, LocalConfig(epochs=1))
    assert [r.layer for r in results] == [0, 1, 2]
    assert [r.error_before for r in results] == pytest.approx(expected, rel=1e-4)


def test_training_reduces_every_layer_error(setup):
    teacher, ids = setup
    for inputs in ("teacher", "student"):
        student = converted(teacher, kv_rank=8, rope_dim=8)
        results = local_distill(student, teacher, ids, LocalConfig(epochs=8, lr=3e-3, batch=1, inputs=inputs))
        assert all(r.error_after < 0.9 * r.error_before for r in results), [
            (r.error_before, r.error_after) for r in results
        ]
        again = [relative_error(decoder_layers(student)[0].self_attn, *_layer0(teacher, ids))]
        assert again[0] == pytest.approx(results[0].error_after, rel=1e-4)


def _layer0(teacher, ids):
    from xecomla_cli.layerwise import LayerRunner

    run = LayerRunner(teacher, ids, micro_batch=4)
    layer = decoder_layers(teacher)[0]
    xs = [layer.input_layernorm(c.h) for c in run.chunks]
    with torch.no_grad():
        ys = [
            layer.self_attn(hidden_states=x, position_embeddings=c.emb, attention_mask=c.mask, position_ids=c.pos)[0]
            for x, c in zip(xs, run.chunks, strict=True)
        ]
    return xs, ys, run.chunks


def test_exact_full_rank_layer_is_left_unchanged(setup):
    """An MQA model whose slow RoPE pairs have zero keys converts exactly at full rank with the
    original fast pairs (fast-pairs+complex, one KV head): zero error, and nothing is trained."""
    _, ids = setup
    teacher = make_model("llama", num_key_value_heads=1)
    h, p = 16, 8
    with torch.no_grad():
        for layer in decoder_layers(teacher):
            wk = layer.self_attn.k_proj.weight.view(1, h, -1)
            slow = [j for j in range(h // 2) if j >= p // 2]
            wk[:, slow] = 0
            wk[:, [j + h // 2 for j in slow]] = 0
    student = copy.deepcopy(teacher)
    spec = build_spec(student.config, kv_rank=h - p + h, rope_dim=p, method="fast-pairs+complex")
    spec = convert_model(student, spec, "fast-pairs+complex", calib_ids=ids)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    results = local_distill(student, teacher, ids, LocalConfig(epochs=2))
    assert all(r.error_before < 1e-5 and not r.trained for r in results), [r.error_before for r in results]
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_hybrid_layers_and_everything_else_untouched(setup):
    teacher, ids = setup
    student = converted(teacher, kv_rank=8, rope_dim=8, layers=[1])
    before = {k: v.clone() for k, v in student.state_dict().items()}
    results = local_distill(student, teacher, ids, LocalConfig(epochs=2, batch=1))
    assert [r.layer for r in results] == [1]
    after = student.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed and all(k.startswith("model.layers.1.self_attn.") for k in changed)


def test_memory_held_is_what_the_docstring_says(setup):
    teacher, ids = setup
    n, d = ids.numel(), teacher.config.hidden_size
    for inputs, copies in (("teacher", 3), ("student", 4)):
        student = converted(teacher, kv_rank=8, rope_dim=8)
        results = local_distill(student, teacher, ids, LocalConfig(epochs=1, inputs=inputs))
        assert {r.held_bytes for r in results} == {copies * n * d * 4}


def test_bad_input_is_one_line(setup):
    teacher, ids = setup
    with pytest.raises(XecomlaError, match="no MLA layers"):
        local_distill(copy.deepcopy(teacher), teacher, ids, LocalConfig())
    with pytest.raises(XecomlaError, match="--local-inputs"):
        LocalConfig(inputs="both")
    for bad in (dict(epochs=0), dict(lr=0.0), dict(batch=0)):
        with pytest.raises(XecomlaError, match="--local-epochs >= 1, --local-lr > 0 and --local-batch >= 1"):
            LocalConfig(**bad)


# ---- the held-out guard ------------------------------------------------------------------------
def attention_state(student, i: int) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in decoder_layers(student)[i].self_attn.state_dict().items()}


def test_guard_restores_a_layer_whose_held_out_error_rose(setup):
    """Training on one repeated token drives every layer's training error to ~0 and its error on
    held-out random text up: every layer is restored bit for bit; the same run without held-out
    blocks (the training error decides) would have kept them."""
    teacher, held = setup
    const = torch.full((4, 32), 7)
    cfg = LocalConfig(epochs=20, lr=1e-2)
    student = converted(teacher, kv_rank=8, rope_dim=8)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    results = local_distill(student, teacher, const, cfg, held_ids=held)
    for r in results:
        assert r.trained and not r.kept and r.epoch == 0
        assert r.error_after < 0.5 * r.error_before and r.held_after > r.held_before, r
        assert r.final_error == r.error_before and r.final_held == r.held_before
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    unguarded = converted(teacher, kv_rank=8, rope_dim=8)
    assert all(r.kept for r in local_distill(unguarded, teacher, const, cfg))
    metrics = local_metrics(results, *[{"val_kl": 1.0, "val_ppl": 2.0, "val_ppl_teacher": 1.5}] * 2, 128, 1.0, "t", "d")
    assert metrics["local_layers_kept"] == 0
    assert metrics["local_held_error_after"] == metrics["local_held_error_before"]
    assert metrics["local_layers"][0]["held_error_after"] > metrics["local_layers"][0]["held_error_before"]


def test_guard_keeps_the_best_held_out_epoch_of_a_layer_that_improved(setup):
    """On the held-out blocks' own distribution, a layer whose held-out error falls keeps the
    weights of its best epoch, and its error there is what the result says."""
    teacher, held = setup
    ids = torch.randint(0, 300, (16, 32), generator=torch.Generator().manual_seed(1))
    student = converted(teacher, kv_rank=8, rope_dim=8)
    start = [attention_state(student, i) for i in range(3)]
    results = local_distill(student, teacher, ids, LocalConfig(epochs=3, lr=1e-3), held_ids=held)
    kept = [r for r in results if r.kept]
    assert kept, [(r.held_before, r.held_after) for r in results]
    for r in results:
        now = attention_state(student, r.layer)
        same = all(torch.equal(start[r.layer][k], v) for k, v in now.items())
        assert same != r.kept and (r.epoch > 0) == r.kept
        if r.kept:
            assert r.held_after < r.held_before
    r = kept[0]
    from xecomla_cli.layerwise import LayerRunner, walk

    run = LayerRunner(teacher, held, micro_batch=1)
    for i in walk([run], [r.layer]):
        t_layer = decoder_layers(teacher)[i]
        with torch.no_grad():
            xs = [t_layer.input_layernorm(c.h) for c in run.chunks]
            ys = [
                t_layer.self_attn(
                    hidden_states=x, position_embeddings=c.emb, attention_mask=c.mask, position_ids=c.pos
                )[0]
                for x, c in zip(xs, run.chunks, strict=True)
            ]
        got = relative_error(decoder_layers(student)[i].self_attn, xs, ys, run.chunks)
    assert got == pytest.approx(r.held_after, rel=1e-4)


def test_held_out_blocks_never_overlap_training():
    train = torch.arange(40 * 4).view(40, 4)
    ids, held = held_out_blocks(train, 16)
    assert (ids.shape[0], held.shape[0]) == (16, 4) and torch.equal(held, train[16:20])
    ids, held = held_out_blocks(train[:18], 16)  # too few blocks beyond the budget: off the end of training
    assert (ids.shape[0], held.shape[0]) == (14, 4) and torch.equal(held, train[14:18])
    ids, held = held_out_blocks(train[:2], 16)
    assert torch.equal(ids, train[:1]) and torch.equal(held, train[1:2])
    with pytest.raises(XecomlaError, match="at least 2 training blocks"):
        held_out_blocks(train[:1], 16)
