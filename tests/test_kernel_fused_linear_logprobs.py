"""hscr_fast.kernels.fused_linear_logprobs: the torch form and the Triton form against a float64 reference.

Without CUDA the Triton form runs in Triton's interpreter: TRITON_INTERPRET=1 is set by tests/kernel_backends.py, at
import time, before the first Triton-path call builds the kernels (the kernels module imports triton lazily, so the
order of test-module imports does not matter). Shapes are odd on purpose: N not a multiple of any block or chunk, prime
V = 1031, D odd, and one V = 32000 case.
"""
import importlib.util

import pytest
import torch
from helpers import LargestTensor
from hscr_fast.kernels import fused_linear_logprobs
from kernel_backends import (
    BACKENDS,
    DEVICE,
    NEEDS_TRITON_PACKAGE,
    TRITON_RUNNABLE,
    assert_error_within_pytorchs_own,
    assert_kernels_compile_for_hopper,
    saved_for_backward,
    values_and_gradients,
)


def reference_fused_linear_logprobs(hidden, weight, labels, ignore_index=-100):
    """Plain float64: materialised logits -> log_softmax -> gather."""
    logprobs = torch.log_softmax(hidden.double() @ weight.double().T, dim=-1)
    valid = labels != ignore_index
    picked = logprobs.gather(1, torch.where(valid, labels, 0)[:, None]).squeeze(1)
    return torch.where(valid, picked, 0.0)


def plain_low_precision(hidden, weight, labels, ignore_index=-100):
    """What PyTorch computes in the input dtype: the yardstick for low-precision error (flash-attention style)."""
    logprobs = torch.log_softmax(hidden @ weight.T, dim=-1)
    valid = labels != ignore_index
    return torch.where(valid, logprobs.gather(1, torch.where(valid, labels, 0)[:, None]).squeeze(1), 0.0).float()


def make_inputs(rows, vocab, dim, *, dtype=torch.float32, logit_scale=3.0, ignored=(), seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=generator)
    weight = torch.randn(vocab, dim, generator=generator) * (logit_scale / dim**0.5)
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    labels[list(ignored)] = -100
    upstream = torch.randn(rows, generator=generator)
    return hidden.to(DEVICE, dtype), weight.to(DEVICE, dtype), labels.to(DEVICE), upstream.to(DEVICE)


def run(hidden, weight, labels, upstream, *, weight_grad, fn=fused_linear_logprobs, **kwargs):
    """Values and gradients (hidden, and weight when weight_grad) for upstream gradient `upstream`."""
    return values_and_gradients(lambda hidden, weight: fn(hidden, weight, labels, **kwargs), hidden, weight, upstream,
                                weight_grad=weight_grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen-weight", "trained-weight"])
# Many small chunks are covered at V = 1031 (65 chunks of 16). At V = 32000 the chunks are of a realistic size (33,
# the last one partial): with 16,000 chunks of 2, the float32 sum of per-chunk gradient terms carries ~10x the error
# of PyTorch's single-thread matmul, which is a property of that artificial setting, not of the kernel as used.
@pytest.mark.parametrize(
    "rows,vocab,dim,chunk_size",
    [(37, 1031, 67, 16), (130, 1031, 45, None), (5, 32000, 33, 999)],
    ids=["N37-V1031-chunked", "N130-V1031-auto", "N5-V32000-chunked"],
)
def test_values_and_gradients_match_float64_reference(backend, weight_grad, rows, vocab, dim, chunk_size):
    hidden, weight, labels, upstream = make_inputs(rows, vocab, dim, ignored=(0, rows // 2))
    ours = run(hidden, weight, labels, upstream, weight_grad=weight_grad, backend=backend, chunk_size=chunk_size)
    plain = run(hidden, weight, labels, upstream, weight_grad=weight_grad, fn=plain_low_precision)
    reference = run(hidden.double(), weight.double(), labels, upstream.double(), weight_grad=weight_grad,
                    fn=reference_fused_linear_logprobs)
    assert ours[0].shape == (rows,)
    assert_error_within_pytorchs_own(ours, plain, reference)
    # and in absolute terms: fp32 sums over up to 32000 vocabulary terms
    torch.testing.assert_close(ours[0], reference[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[1], reference[1], atol=1e-4, rtol=1e-5)
    out, grad_hidden = ours[0], ours[1]
    assert out[0] == 0 and out[rows // 2] == 0
    assert grad_hidden[0].abs().max() == 0 and grad_hidden[rows // 2].abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_is_float32_and_needs_no_graph_under_no_grad(backend):
    hidden, weight, labels, _ = make_inputs(9, 1031, 17)
    hidden.requires_grad_(True)
    assert fused_linear_logprobs(hidden, weight, labels, backend=backend).requires_grad  # with grad: a graph
    with torch.no_grad():
        out, saved = saved_for_backward(fused_linear_logprobs, hidden, weight, labels, backend=backend)
    assert out.dtype == torch.float32 and not out.requires_grad and saved == []  # nothing kept for a backward
    expected = reference_fused_linear_logprobs(hidden, weight, labels)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen-weight", "trained-weight"])
def test_all_ignored_rows_give_zeros(backend, weight_grad):
    hidden, weight, labels, upstream = make_inputs(11, 1031, 19, ignored=range(11))
    out, grad_hidden, grad_weight = run(hidden, weight, labels, upstream, weight_grad=weight_grad, backend=backend)
    assert out.abs().max() == 0 and grad_hidden.abs().max() == 0
    if weight_grad:
        assert grad_weight.abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen-weight", "trained-weight"])
def test_empty_input(backend, weight_grad):
    hidden, weight, labels, upstream = make_inputs(0, 1031, 19)
    out, grad_hidden, grad_weight = run(hidden, weight, labels, upstream, weight_grad=weight_grad, backend=backend)
    assert out.shape == (0,) and grad_hidden.shape == (0, 19)
    if weight_grad:
        assert grad_weight.abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen-weight", "trained-weight"])
def test_extreme_logits_stay_finite_and_exact(backend, weight_grad):
    # logits of order ±1e4: a naive exp overflows; the online logsumexp must not
    hidden, weight, labels, upstream = make_inputs(23, 1031, 21, logit_scale=1e4, ignored=(4,))
    out, grad_hidden, grad_weight = run(hidden, weight, labels, upstream, weight_grad=weight_grad,
                                        backend=backend, chunk_size=8)
    ref, ref_grad_hidden, ref_grad_weight = run(hidden.double(), weight.double(), labels, upstream.double(),
                                                weight_grad=weight_grad, fn=reference_fused_linear_logprobs)
    assert ref.abs().max() > 1e3  # the case really is extreme
    assert torch.isfinite(out).all() and torch.isfinite(grad_hidden).all()
    # fp32 logits of size 1e4 carry ~1e-3 absolute rounding; relative to the scale this is tight
    torch.testing.assert_close(out, ref, atol=1e4 * 2e-6, rtol=1e-6)
    torch.testing.assert_close(grad_hidden, ref_grad_hidden, atol=1e-3 * ref_grad_hidden.abs().max().item(), rtol=0)
    if weight_grad:
        assert torch.isfinite(grad_weight).all()
        torch.testing.assert_close(grad_weight, ref_grad_weight, atol=1e-3 * ref_grad_weight.abs().max().item(), rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen-weight", "trained-weight"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_is_within_a_small_multiple_of_pytorchs_own(backend, weight_grad, dtype):
    hidden, weight, labels, upstream = make_inputs(45, 1031, 67, dtype=dtype, ignored=(7,))
    ours = run(hidden, weight, labels, upstream, weight_grad=weight_grad, backend=backend, chunk_size=16)
    plain = run(hidden, weight, labels, upstream, weight_grad=weight_grad, fn=plain_low_precision)
    # the reference sees exactly the low-precision inputs, upcast: only the arithmetic differs
    reference = run(hidden.double(), weight.double(), labels, upstream.double(), weight_grad=weight_grad,
                    fn=reference_fused_linear_logprobs)
    assert_error_within_pytorchs_own(ours, plain, reference)


@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen-weight", "trained-weight"])
def test_no_tensor_of_all_rows_by_vocabulary_is_ever_created(weight_grad):
    rows, vocab, dim, chunk = 300, 1031, 40, 64
    hidden, weight, labels, upstream = make_inputs(rows, vocab, dim)
    hidden.requires_grad_(True)
    weight.requires_grad_(weight_grad)
    with LargestTensor() as largest:
        fused_linear_logprobs(hidden, weight, labels, chunk_size=chunk, backend="torch").backward(upstream)
    assert largest.numel <= max(chunk * vocab, vocab * dim) < rows * vocab


def test_frozen_weight_keeps_the_gradient_direction_and_trained_weight_keeps_only_lse():
    rows, vocab, dim = 50, 1031, 24
    hidden, weight, labels, _ = make_inputs(rows, vocab, dim)
    # trained weight: hidden, labels, weight, lse
    for weight_grad, expected_shapes in ((False, [(rows, dim)]), (True, [(rows, dim), (rows,), (vocab, dim), (rows,)])):
        _, saved = saved_for_backward(fused_linear_logprobs, hidden.clone().requires_grad_(True),
                                      weight.clone().requires_grad_(weight_grad), labels, backend="torch")
        assert saved == expected_shapes


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_does_not_lower_the_logits_precision(backend):
    hidden, weight, labels, upstream = make_inputs(21, 1031, 33)
    with torch.autocast(device_type=DEVICE.type, dtype=torch.bfloat16):
        ours = run(hidden, weight, labels, upstream, weight_grad=False, backend=backend)
    reference = run(hidden.double(), weight.double(), labels, upstream.double(), weight_grad=False,
                    fn=reference_fused_linear_logprobs)
    torch.testing.assert_close(ours[0], reference[0], atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise_specific_errors():
    hidden, weight, labels, _ = make_inputs(6, 1031, 19)
    bad_labels = labels.clone()
    bad_labels[4] = 1031
    with pytest.raises(ValueError, match=r"labels\[4\] = 1031 is outside the vocabulary \[0, 1031\)"):
        fused_linear_logprobs(hidden, weight, bad_labels)
    with pytest.raises(ValueError, match="D=19 but weight has D=18"):
        fused_linear_logprobs(hidden, weight[:, :18], labels)
    with pytest.raises(TypeError, match="share one floating dtype"):
        fused_linear_logprobs(hidden, weight.double(), labels)
    with pytest.raises(ValueError, match="shape \\[6\\]"):
        fused_linear_logprobs(hidden, weight, labels[:5])
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_linear_logprobs(hidden, weight, labels, backend="cuda")


@NEEDS_TRITON_PACKAGE
def test_triton_kernel_compiles_for_hopper():
    signature = {"logits_ptr": "*fp32", "logits_row_stride": "i32", "labels_ptr": "*i64", "lse_ptr": "*fp32",
                 "scale_ptr": "*fp32", "logp_ptr": "*fp32", "grad_ptr": "*bf16", "grad_row_stride": "i32",
                 "n_cols": "i32", "ignore_index": "i32"}
    builds = [("logprob_rows_kernel", signature,
               {"HAS_LSE": has_lse, "WRITE_GRAD": write_grad, "HAS_SCALE": has_scale, "BLOCK_V": 4096})
              for has_lse, write_grad, has_scale in [(False, False, False), (False, True, False), (True, True, True)]]
    assert_kernels_compile_for_hopper("hscr_fast.kernels._triton.logprob_rows", builds)


# Liger's Triton kernels also run in Triton's interpreter, so the oracle runs on CPU too (small shapes only there).
LIGER = importlib.util.find_spec("liger_kernel") is not None and TRITON_RUNNABLE


def liger_logprobs(hidden, weight, labels, ignore_index=-100):
    """Liger-Kernel's fused linear cross entropy with per-token output (reduction="none"), negated: log p(label), 0 at
    ignored rows. Its upstream gradient per token is folded into its recomputed gradients (Liger >= 0.8.5)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    accumulate = torch.float32 if hidden.dtype != torch.float32 else None
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index, reduction="none", accum_dtype=accumulate)
    return -loss(weight, hidden, labels).float()


@pytest.mark.skipif(not LIGER, reason="needs liger-kernel (pip install -e .[bench]) and CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen-weight", "trained-weight"])
@pytest.mark.parametrize("rows, vocab, dim", [
    (37, 263, 41),
    pytest.param(300, 32000, 256, marks=pytest.mark.skipif(DEVICE.type != "cuda", reason="too slow interpreted")),
])
def test_values_and_gradients_match_liger(weight_grad, dtype, rows, vocab, dim):
    """Liger as an independent oracle: the same log-probs and gradients (per-token upstream gradient, ignored
    rows). In fp32 both must agree closely; in bf16 ours may be no further from the float64 reference than Liger."""
    hidden, weight, labels, upstream = make_inputs(rows, vocab, dim, dtype=dtype, ignored=(3, rows - 1), seed=rows)
    ours = run(hidden, weight, labels, upstream, weight_grad=weight_grad, backend="triton")
    liger = run(hidden, weight, labels, upstream, weight_grad=weight_grad, fn=liger_logprobs)
    exact = run(hidden.double(), weight.double(), labels, upstream.double(), weight_grad=weight_grad,
                fn=reference_fused_linear_logprobs)
    for name, mine, theirs, truth in zip(("log-probs", "grad hidden", "grad weight"), ours, liger, exact):
        if truth is None:
            continue
        scale = truth.abs().max()
        if dtype == torch.float32:
            assert (mine - theirs).abs().max() <= 1e-4 * scale + 1e-5, name
        else:
            liger_error = (theirs - truth).abs().max()
            assert (mine - truth).abs().max() <= 2 * liger_error + 1e-3 * scale, name
