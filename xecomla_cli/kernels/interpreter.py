"""Run @triton.jit kernels on CPU tensors through Triton's interpreter (numpy), for tests without a GPU.

Only the launcher's CPU branch imports this module; GPU launches never touch it.

    launch_on_cpu(kernel, grid, *args, **kwargs)    # what kernel[grid](*args, **kwargs) does on a GPU

It works whether or not Triton was imported with TRITON_INTERPRET=1: the kernel is wrapped in an
``InterpretedFunction`` for this launch, and for the duration of the launch the @triton.jit helpers
that the kernel calls from triton.language (tl.cdiv, tl.max, ...) are routed to the interpreter as
well, and ``range(start, end)`` over loaded scalars is fixed for numpy >= 2.4
(triton-lang/triton#9171). Both patches are undone when the launch returns. The interpreter gets
``tl.dot`` on bf16 wrong (it multiplies raw bits): use fp32 or fp16 here.
"""

from __future__ import annotations

import contextlib

_INTERPRETED: dict = {}  # id(JITFunction) -> its InterpretedFunction


def interpreted(kernel):
    """The same @triton.jit function, run by the Triton interpreter."""
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction):  # imported under TRITON_INTERPRET=1 already
        return kernel
    if id(kernel) not in _INTERPRETED:
        _INTERPRETED[id(kernel)] = InterpretedFunction(kernel.fn)
    return _INTERPRETED[id(kernel)]


@contextlib.contextmanager
def interpreter_patches():
    """Route nested @triton.jit calls to the interpreter and fix `range` over loaded scalars; undone on exit."""
    from triton.runtime import interpreter
    from triton.runtime.jit import JITFunction

    original_call, original_patch = JITFunction.__call__, interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    JITFunction.__call__ = lambda self, *args, **kwargs: interpreted(self)(*args, **kwargs)
    interpreter._patch_lang_tensor = patch_lang_tensor
    try:
        yield
    finally:
        JITFunction.__call__, interpreter._patch_lang_tensor = original_call, original_patch


def launch_on_cpu(kernel, grid: tuple, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs) on CPU tensors, through the interpreter."""
    with interpreter_patches():
        interpreted(kernel)[grid](*args, **kwargs)
