"""lm-evaluation-harness adapter: ``--model xecomla`` evaluates any xecomla source or checkpoint.

lm-evaluation-harness finds models in its own registry, so the adapter must be registered before
the harness looks ``xecomla`` up. From the shell (all of lm_eval's options work)::

    python -m xecomla_cli.lm_eval_adapter --model xecomla \\
        --model_args pretrained=runs/demo-r128,dtype=float32 --tasks arc_easy,hellaswag --device cpu

From Python::

    from xecomla_cli.lm_eval_adapter import register
    register()
    lm_eval.simple_evaluate(model="xecomla", model_args="pretrained=runs/demo-r128", tasks=["piqa"])

``pretrained`` is anything ``xecomla`` loads ('demo', a stage checkpoint with MLA layers, a
.gguf file, an HF directory or Hub id); the model is then scored by the harness's own HFLM code.
lm_eval is imported only here, and only when it is installed (``pip install lm_eval``); the tasks
download their data from the Hugging Face Hub, so this needs network (``xecomla eval`` does not).
"""

from __future__ import annotations

from ..errors import XecomlaError

MODEL_NAME = "xecomla"
_registered: dict[str, type] = {}


def register() -> type:
    """Register the ``xecomla`` model with lm-evaluation-harness; returns the model class."""
    if MODEL_NAME in _registered:
        return _registered[MODEL_NAME]
    try:
        from lm_eval.api.registry import register_model
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise XecomlaError("the lm-evaluation-harness adapter needs lm_eval: pip install lm_eval") from None

    class XecomlaLM(HFLM):
        """HFLM over a model loaded by xecomla (MLA attention and latent cache included)."""

        def __init__(self, pretrained: str = "demo", dtype: str = "float32", device: str | None = None, **kwargs):
            import torch

            from ..loaded import dtype_name
            from ..sources import load_model

            # lm_eval's rule: a dtype is a torch attribute name ('half', 'float', 'bfloat16') or 'auto'
            torch_dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
            name = dtype_name(torch_dtype) if isinstance(torch_dtype, torch.dtype) else str(dtype)
            loaded = load_model(str(pretrained), dtype=name, device=device or "cpu")
            kwargs.pop("tokenizer", None)
            kwargs.pop("backend", None)
            super().__init__(pretrained=loaded.model, tokenizer=loaded.tokenizer, backend="causal", **kwargs)
            self.xecomla_source = str(pretrained)

    try:
        register_model(MODEL_NAME)(XecomlaLM)
    except ValueError:  # already registered (e.g. module reloaded): keep the first
        pass
    _registered[MODEL_NAME] = XecomlaLM
    return XecomlaLM


def main() -> None:
    """``python -m xecomla_cli.lm_eval_adapter <lm_eval arguments>``: lm_eval's CLI with xecomla registered."""
    import sys

    try:
        register()
    except XecomlaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
