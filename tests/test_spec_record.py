"""The spec is built, not mutated, and typed: what init-svd found is in fields, and the ``options``
dict older versions wrote into xecomla.json still loads."""

from __future__ import annotations

import copy
import json

import torch
from conftest import make_model, make_tokenizer

from xecomla_cli.checkpoint import save_checkpoint
from xecomla_cli.init import build_spec, convert_model
from xecomla_cli.init.convert import convert_layer
from xecomla_cli.mla.spec import MLASpec
from xecomla_cli.sources import load_model


def test_convert_model_returns_the_record_and_leaves_its_argument_alone():
    model = make_model("llama")
    spec = build_spec(model.config, kv_rank=16, method="best")
    before = copy.deepcopy(spec)
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    out = convert_model(model, spec, "best", ids)
    assert spec == before  # not mutated
    assert out.rank_budget == 16 * 3 and sum(out.kv_ranks) == 48
    assert set(out.rope_pairs) == {"0", "1", "2"} and out.rope_attention_scaling == 1.0
    layer = convert_layer(make_model("llama"), spec, 0, "paper")
    assert spec == before and layer.rope_attention_scaling == 1.0


def test_old_options_in_xecomla_json_still_load(tmp_path):
    """A checkpoint written by the code before typed fields: its records sat in spec.options."""
    model = make_model("llama")
    spec = convert_model(model, build_spec(model.config, kv_rank=16))
    ckpt = save_checkpoint(
        tmp_path / "c", model=model, tokenizer=make_tokenizer(), stage="init-svd", spec=spec, source="t"
    )
    meta_path = ckpt / "xecomla.json"
    meta = json.loads(meta_path.read_text())
    written = meta["mla"]
    assert "options" not in written and written["kv_svd_rows"] == "all" and "energy" not in written
    for key in ("kv_svd_rows", "rope_attention_scaling"):
        written.pop(key, None)
    written["options"] = {
        "kv_svd_rows": "nope-v",
        "rope_attention_scaling": 0.75,
        "rank_budget": 48,
        "budget_rank": 16,  # recorded by old code, never needed
        "rope_pairs": {"0": [0, 1]},
    }
    meta_path.write_text(json.dumps(meta))
    lm = load_model(str(ckpt))
    assert lm.spec.kv_svd_rows == "nope-v" and lm.spec.rank_budget == 48 and lm.spec.rope_pairs == {"0": [0, 1]}
    assert lm.model.model.layers[0].self_attn.rope_attention_scaling == 0.75  # read back into every layer
    assert MLASpec.from_dict(lm.spec.to_dict()) == lm.spec


def test_the_export_plan_is_decided_once(tmp_path):
    """plan_export decides everything, the emulation constants and RoPE notes included; the plan is
    frozen and the export writes exactly that plan."""
    import dataclasses

    import pytest

    from xecomla_cli.export import export_checkpoint, plan_export

    model = make_model("llama")
    spec = convert_model(model, build_spec(model.config, kv_rank=16, q_rank=24))
    ckpt = save_checkpoint(
        tmp_path / "c", model=model, tokenizer=make_tokenizer(), stage="init-svd", spec=spec, source="t"
    )
    plan = plan_export(load_model(str(ckpt)))
    assert plan.latent == "identity" and plan.queries == "lora-identity"
    assert len(plan.latent_constants) == len(plan.q_constants) == 3 and min(plan.latent_constants) > 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.rope_theta = 1.0
    assert export_checkpoint(ckpt, tmp_path / "out").plan == plan
