"""Choices are checked while parsing (Typer Enums, --method's callback); --local and global KD each
refuse the other's options; the options show the config dataclasses' defaults."""

from __future__ import annotations

import inspect

import pytest
from typer.testing import CliRunner

from xecomla_cli.cli import app
from xecomla_cli.commands.distill import distill_command
from xecomla_cli.distill.config import DistillConfig
from xecomla_cli.distill.local import LocalConfig

runner = CliRunner()


@pytest.mark.parametrize(
    "args, bad",
    [
        (["distill", "nowhere", "--precision", "fp16"], "--precision"),
        (["distill", "nowhere", "--local", "--local-inputs", "both"], "--local-inputs"),
        (["export", "nowhere", "--format", "onnx"], "--format"),
        (["init-svd", "nowhere", "--kv-rank", "8", "--kv-svd-rows", "some"], "--kv-svd-rows"),
        (["init-svd", "nowhere", "--kv-rank", "8", "--method", "best+nonsense"], "--method"),
    ],
)
def test_bad_choices_fail_while_parsing(args, bad):
    """Exit 2 (a usage error) naming the option, before any source is looked at."""
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert bad in result.output and "nowhere" not in result.output.split(bad)[0][-20:]


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--tokens", "1k", "--local", "--micro-batch", "2"],
            "--micro-batch: not used by --local (option(s) of global KD",
        ),
        (["--tokens", "1k", "--local", "--lr", "1e-3", "--resume"], "--lr, --resume: not used by --local"),
        (["--tokens", "1k", "--local-lr", "1e-2"], "--local-lr: not used by global KD (option(s) of --local)"),
        (["--dpo", "--tokens", "1k"], "--tokens: not used by --dpo"),
        (["--dpo", "--divergence", "jsd"], "--divergence: not used by --dpo (option(s) of --on-policy)"),
        (["--on-policy", "--beta", "0.1", "--temperature", "2"], "--temperature, --beta: not used by --on-policy"),
        (["--tokens", "1k", "--prompts", "8"], "--prompts: not used by global KD (option(s) of --dpo, --on-policy)"),
        (["--dpo", "--on-policy"], "--dpo and --on-policy are separate runs"),
    ],
)
def test_each_mode_refuses_the_options_it_would_ignore(args, message):
    result = runner.invoke(app, ["distill", "nowhere", *args])
    assert message in str(result.exception)  # main() prints it as one line and exits 1


def test_the_options_show_the_config_defaults():
    params = inspect.signature(distill_command).parameters
    for name in ("seq_len", "batch_size", "lr", "warmup", "weight_decay", "clip", "temperature", "save_every", "seed"):
        assert params[name].default == getattr(DistillConfig, name), name
    assert params["precision"].default.value == DistillConfig.precision
    assert params["local_batch"].default == LocalConfig.batch == 1  # what --local used before --local-batch
    assert params["local_lr"].default == LocalConfig.lr
    assert params["local_inputs"].default.value == LocalConfig.inputs
