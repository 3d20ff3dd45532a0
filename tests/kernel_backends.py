"""The kernel tests' harness. The backends every kernel test runs: the chunked torch form everywhere, the Triton form
on CUDA or, without CUDA, in Triton's interpreter (TRITON_INTERPRET=1 is set here, at import, before any kernel is
compiled). Then what the tests of the differentiable ops share: values and gradients of one call, the error
criterion against PyTorch's own, the tensors kept for backward, and compiling the kernels for Hopper."""
import os

import pytest
import torch
from helpers import assert_compiles_for_hopper

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hscr_fast.kernels._common import triton_available, triton_interpret_mode  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON_RUNNABLE = triton_available() and (DEVICE.type == "cuda" or triton_interpret_mode())
NEEDS_TRITON = pytest.mark.skipif(not TRITON_RUNNABLE, reason="triton missing, or CPU without TRITON_INTERPRET=1")
BACKENDS = ["torch", pytest.param("triton", marks=NEEDS_TRITON)]
NEEDS_TRITON_PACKAGE = pytest.mark.skipif(not triton_available(), reason="triton not installed")


def values_and_gradients(op, hidden, weight, upstream, *, weight_grad):
    """(value, grad hidden, grad weight or None), float64, of `op(hidden, weight)` for upstream gradient `upstream`;
    the weight gets a gradient only when `weight_grad`."""
    hidden = hidden.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(weight_grad)
    out = op(hidden, weight)
    out.backward(upstream.to(out.dtype))
    return out.detach().double(), hidden.grad.double(), (weight.grad.double() if weight_grad else None)


def max_error(actual, expected):
    return (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0


def assert_error_within_pytorchs_own(ours, plain, reference, *, factor=2.0, eps=1e-6):
    """flash-attention's criterion: |ours - fp64| <= factor * |plain PyTorch in the input dtype - fp64| + eps,
    for the value and every gradient of `values_and_gradients` (entries that are None were not computed)."""
    for name, ours_value, plain_value, ref_value in zip(("value", "grad hidden", "grad weight"), ours, plain,
                                                        reference):
        if ref_value is None:
            continue
        ours_error, plain_error = max_error(ours_value, ref_value), max_error(plain_value, ref_value)
        assert ours_error <= factor * plain_error + eps, (
            f"{name}: error {ours_error:.3g} vs PyTorch's {plain_error:.3g}")


def saved_for_backward(op, *args, **kwargs):
    """(op(*args, **kwargs), shapes of the tensors autograd saved for backward while it ran)."""
    saved = []

    def record(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(record, lambda tensor: tensor):
        return op(*args, **kwargs), saved


def assert_kernels_compile_for_hopper(module: str, builds: list[tuple[str, dict, dict]]) -> None:
    """Builds each (kernel name in `module`, signature, constexprs) for sm_90, PTX and cubin, without a GPU: the
    interpreter does not type-check like the compiler."""
    assert_compiles_for_hopper(f"""
import importlib
import triton
from triton.backends.compiler import GPUTarget
module = importlib.import_module({module!r})
for name, signature, constexprs in {builds!r}:
    signature = {{**signature, **{{key: "constexpr" for key in constexprs}}}}
    source = triton.compiler.ASTSource(fn=getattr(module, name), signature=signature, constexprs=constexprs)
    assert "cubin" in triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm, name
""")
