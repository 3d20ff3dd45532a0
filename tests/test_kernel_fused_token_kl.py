"""hscr_fast.kernels.fused_token_kl: the torch form and the Triton form against a float64 reference.

Without CUDA the Triton form runs in Triton's interpreter: TRITON_INTERPRET=1 is set by tests/kernel_backends.py, at
import time, before the first Triton-path call builds the kernel (the kernels module imports triton lazily, so the order
of test-module imports does not matter). Shapes are odd on purpose: N not a multiple of any block or chunk, prime V =
1031, D odd, and one V = 32000 case. The reference materialises both distributions in float64 and gets its gradients
from autograd, so the kernel's hand-derived gradient is checked against an independent computation.
"""

import pytest
import torch
from helpers import LargestTensor
from hscr_fast.kernels import fused_token_kl
from kernel_backends import (
    BACKENDS,
    DEVICE,
    NEEDS_TRITON_PACKAGE,
    assert_error_within_pytorchs_own,
    assert_kernels_compile_for_hopper,
    max_error,
    saved_for_backward,
    values_and_gradients,
)


def token_kl_from_logits(policy_logits, reference_logits, lam):
    """λ·KL(ref‖π) + (1−λ)·KL(π‖ref) row by row, read off the definition with full log-softmaxes."""
    log_policy = torch.log_softmax(policy_logits, dim=-1)
    log_reference = torch.log_softmax(reference_logits, dim=-1)
    kl_policy_reference = (log_policy.exp() * (log_policy - log_reference)).sum(-1)
    kl_reference_policy = (log_reference.exp() * (log_reference - log_policy)).sum(-1)
    return lam * kl_reference_policy + (1 - lam) * kl_policy_reference


def reference_fused_token_kl(policy_hidden, reference_hidden, weight, lam=0.5, mask=None):
    """Plain float64: materialised logits; the reference side is a constant (no gradient through it)."""
    policy_logits = policy_hidden.double() @ weight.double().T
    reference_logits = (reference_hidden.double() @ weight.double().T).detach()
    out = token_kl_from_logits(policy_logits, reference_logits, lam)
    return out if mask is None else torch.where(mask, out, 0.0)


def plain_low_precision(policy_hidden, reference_hidden, weight, lam=0.5, mask=None):
    """What PyTorch computes in the input dtype: the yardstick for low-precision error (flash-attention style)."""
    out = token_kl_from_logits(policy_hidden @ weight.T, (reference_hidden @ weight.T).detach(), lam)
    return (out if mask is None else torch.where(mask, out, 0.0)).float()


def make_inputs(rows, vocab, dim, *, dtype=torch.float32, logit_scale=3.0, reference_noise=0.5, masked=(), seed=0):
    """Policy hidden states, reference ones = policy + noise (nearby distributions, as after some training), the
    lm_head, a mask with the rows `masked` excluded (None when there are none) and an upstream gradient."""
    generator = torch.Generator().manual_seed(seed)
    policy = torch.randn(rows, dim, generator=generator)
    reference = policy + reference_noise * torch.randn(rows, dim, generator=generator)
    weight = torch.randn(vocab, dim, generator=generator) * (logit_scale / dim**0.5)
    mask = None
    if masked:
        mask = torch.ones(rows, dtype=torch.bool)
        mask[list(masked)] = False
        mask = mask.to(DEVICE)
    upstream = torch.randn(rows, generator=generator)
    return policy.to(DEVICE, dtype), reference.to(DEVICE, dtype), weight.to(DEVICE, dtype), mask, upstream.to(DEVICE)


def run(policy, reference, weight, upstream, *, weight_grad, fn=fused_token_kl, **kwargs):
    """Values and gradients (policy hidden, and weight when weight_grad) for upstream gradient `upstream`."""
    return values_and_gradients(lambda policy, weight: fn(policy, reference, weight, **kwargs), policy, weight,
                                upstream, weight_grad=weight_grad)


def reference_run(policy, reference, weight, upstream, *, weight_grad, **kwargs):
    return run(policy.double(), reference.double(), weight.double(), upstream.double(), weight_grad=weight_grad,
               fn=reference_fused_token_kl, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen-weight", "trained-weight"])
@pytest.mark.parametrize(
    "rows,vocab,dim,chunk_size,lam",
    [(37, 1031, 67, 16, 0.0), (37, 1031, 67, 16, 0.5), (37, 1031, 67, 16, 1.0), (83, 1031, 45, None, 0.3),
     (5, 32000, 33, 2, 0.3)],
    ids=["N37-V1031-chunked-lam0", "N37-V1031-chunked-lam0.5", "N37-V1031-chunked-lam1", "N83-V1031-auto-lam0.3",
         "N5-V32000-chunked-lam0.3"],
)
def test_values_and_gradients_match_float64_reference(backend, weight_grad, rows, vocab, dim, chunk_size, lam):
    masked = (0, rows // 2)
    policy, reference, weight, mask, upstream = make_inputs(rows, vocab, dim, masked=masked)
    ours = run(policy, reference, weight, upstream, weight_grad=weight_grad, lam=lam, mask=mask, backend=backend,
               chunk_size=chunk_size)
    plain = run(policy, reference, weight, upstream, weight_grad=weight_grad, fn=plain_low_precision, lam=lam,
                mask=mask)
    expected = reference_run(policy, reference, weight, upstream, weight_grad=weight_grad, lam=lam, mask=mask)
    assert ours[0].shape == (rows,)
    assert expected[0][mask].min() > 1e-2  # selected rows carry a real divergence, not a near-zero one
    assert_error_within_pytorchs_own(ours, plain, expected)
    # and in absolute terms: fp32 sums over up to 32000 vocabulary terms
    torch.testing.assert_close(ours[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[1], expected[1], atol=1e-5, rtol=1e-5)
    if weight_grad:
        torch.testing.assert_close(ours[2], expected[2], atol=1e-5, rtol=1e-5)
    for row in masked:
        assert ours[0][row] == 0 and ours[1][row].abs().max() == 0


def test_float64_torch_form_matches_the_reference_to_float64_precision():
    """fp64 inputs stay fp64 in the torch form (the output is float32): the hand-derived gradient must equal
    autograd's through the definition to ~1e-12, which no fp32 rounding could hide a wrong term behind."""
    policy, reference, weight, mask, upstream = make_inputs(19, 1031, 23, dtype=torch.float64, masked=(3,))
    for lam in (0.0, 0.3, 1.0):
        ours = run(policy, reference, weight, upstream, weight_grad=True, lam=lam, mask=mask, backend="torch",
                   chunk_size=7)
        expected = reference_run(policy, reference, weight, upstream, weight_grad=True, lam=lam, mask=mask)
        torch.testing.assert_close(ours[0], expected[0], atol=1e-6, rtol=1e-6)  # float32 output
        torch.testing.assert_close(ours[1], expected[1], atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(ours[2], expected[2], atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen-weight", "trained-weight"])
def test_identical_policy_and_reference_give_exactly_zero_kl_and_gradient(backend, weight_grad):
    policy, _, weight, _, upstream = make_inputs(21, 1031, 27)
    # the same tensor, and equal values in another tensor
    for reference, lam in ((policy, 0.0), (policy.clone(), 0.7)):
        out, grad_policy, grad_weight = run(policy, reference, weight, upstream, weight_grad=weight_grad, lam=lam,
                                            backend=backend, chunk_size=8)
        assert out.abs().max() == 0 and grad_policy.abs().max() == 0
        if weight_grad:
            assert grad_weight.abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_nearby_distributions_give_small_accurate_kl(backend):
    """The regime at the start of training: KL of order 1e-4, where lse(a) − lse(b) would cancel catastrophically.
    The floor is the fp32 rounding of the logits themselves, which plain fp32 PyTorch shares."""
    policy, reference, weight, _, upstream = make_inputs(17, 1031, 31, reference_noise=3e-3)
    for lam in (0.0, 0.5, 1.0):
        ours = run(policy, reference, weight, upstream, weight_grad=False, lam=lam, backend=backend)
        plain = run(policy, reference, weight, upstream, weight_grad=False, fn=plain_low_precision, lam=lam)
        expected = reference_run(policy, reference, weight, upstream, weight_grad=False, lam=lam)
        assert 1e-6 < expected[0].max() < 1e-3
        # an absolute eps of the usual 1e-6 would be 1% of these values: far tighter here
        assert_error_within_pytorchs_own(ours, plain, expected, eps=1e-9)
        assert max_error(ours[0], expected[0]) <= 1e-2 * expected[0].max()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen-weight", "trained-weight"])
def test_all_masked_rows_give_zeros(backend, weight_grad):
    policy, reference, weight, mask, upstream = make_inputs(11, 1031, 19, masked=range(11))
    out, grad_policy, grad_weight = run(policy, reference, weight, upstream, weight_grad=weight_grad, mask=mask,
                                        backend=backend)
    assert out.shape == (11,) and out.abs().max() == 0 and grad_policy.abs().max() == 0
    if weight_grad:
        assert grad_weight.abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_true_mask_equals_no_mask(backend):
    policy, reference, weight, _, upstream = make_inputs(13, 1031, 17)
    everything = torch.ones(13, dtype=torch.bool, device=DEVICE)
    with_mask = run(policy, reference, weight, upstream, weight_grad=True, mask=everything, backend=backend)
    without = run(policy, reference, weight, upstream, weight_grad=True, backend=backend)
    for a, b in zip(with_mask, without):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen-weight", "trained-weight"])
def test_empty_input(backend, weight_grad):
    policy, reference, weight, _, upstream = make_inputs(0, 1031, 19)
    out, grad_policy, grad_weight = run(policy, reference, weight, upstream, weight_grad=weight_grad, backend=backend)
    assert out.shape == (0,) and grad_policy.shape == (0, 19)
    if weight_grad:
        assert grad_weight.abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen-weight", "trained-weight"])
def test_extreme_logits_stay_finite_and_exact(backend, weight_grad):
    # logits of order ±1e4 on both sides: a naive exp overflows; the online sums must not
    policy, reference, weight, mask, upstream = make_inputs(23, 1031, 21, logit_scale=1e4, reference_noise=1.0,
                                                            masked=(4,))
    ours = run(policy, reference, weight, upstream, weight_grad=weight_grad, mask=mask, backend=backend, chunk_size=8)
    plain = run(policy, reference, weight, upstream, weight_grad=weight_grad, fn=plain_low_precision, mask=mask)
    expected = reference_run(policy, reference, weight, upstream, weight_grad=weight_grad, mask=mask)
    assert expected[0].max() > 1e3  # the case really is extreme
    for value in ours:
        assert value is None or torch.isfinite(value).all()
    # fp32 logits of size 1e4 carry ~1e-3 absolute rounding: judged against fp32 PyTorch on the same inputs, and
    # relative to the scale
    assert_error_within_pytorchs_own(ours, plain, expected, eps=1e-3)
    torch.testing.assert_close(ours[0], expected[0], atol=1e4 * 1e-5, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen-weight", "trained-weight"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_is_within_a_small_multiple_of_pytorchs_own(backend, weight_grad, dtype):
    policy, reference, weight, mask, upstream = make_inputs(45, 1031, 67, dtype=dtype, masked=(7,))
    lam = 0.3  # every term of the value and of the gradient has a nonzero weight
    ours = run(policy, reference, weight, upstream, weight_grad=weight_grad, lam=lam, mask=mask, backend=backend,
               chunk_size=16)
    plain = run(policy, reference, weight, upstream, weight_grad=weight_grad, fn=plain_low_precision, lam=lam,
                mask=mask)
    # the reference sees exactly the low-precision inputs, upcast: only the arithmetic differs
    expected = reference_run(policy, reference, weight, upstream, weight_grad=weight_grad, lam=lam, mask=mask)
    assert_error_within_pytorchs_own(ours, plain, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_is_float32_and_reference_gets_no_gradient(backend):
    policy, reference, weight, _, upstream = make_inputs(9, 1031, 17)
    reference = reference.clone().requires_grad_(True)
    with torch.no_grad():
        out = fused_token_kl(policy.clone().requires_grad_(True), reference, weight, backend=backend)
    assert out.dtype == torch.float32 and not out.requires_grad
    torch.testing.assert_close(out.double(), reference_fused_token_kl(policy, reference, weight), atol=1e-5, rtol=1e-5)
    weight = weight.clone().requires_grad_(True)
    fused_token_kl(policy.clone().requires_grad_(True), reference, weight, backend=backend).backward(upstream)
    assert reference.grad is None and weight.grad is not None


@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen-weight", "trained-weight"])
def test_no_tensor_of_all_rows_by_vocabulary_is_ever_created(weight_grad):
    rows, vocab, dim, chunk = 150, 1031, 40, 32
    policy, reference, weight, mask, upstream = make_inputs(rows, vocab, dim, masked=(5, 6))
    policy.requires_grad_(True)
    weight.requires_grad_(weight_grad)
    with LargestTensor() as largest:
        fused_token_kl(policy, reference, weight, mask=mask, chunk_size=chunk, backend="torch").backward(upstream)
    assert largest.numel <= max(chunk * vocab, vocab * dim) < rows * vocab


def test_frozen_weight_keeps_the_gradient_direction_and_trained_weight_keeps_only_statistics():
    rows, vocab, dim = 50, 1031, 24
    policy, reference, weight, _, _ = make_inputs(rows, vocab, dim)
    for weight_grad, expected_shapes in ((False, [(rows, dim)]),
                                         (True, [(rows, dim), (rows, dim), (vocab, dim), (3, rows)])):
        _, saved = saved_for_backward(fused_token_kl, policy.clone().requires_grad_(True), reference,
                                      weight.clone().requires_grad_(weight_grad), backend="torch")
        assert saved == expected_shapes


def test_bad_inputs_raise_specific_errors():
    policy, reference, weight, _, _ = make_inputs(6, 1031, 19)
    with pytest.raises(ValueError, match="D=19 but weight has D=18"):
        fused_token_kl(policy, reference, weight[:, :18])
    with pytest.raises(ValueError, match=r"must both be \[N, D\]"):
        fused_token_kl(policy, reference[:5], weight)
    with pytest.raises(TypeError, match="share one floating dtype"):
        fused_token_kl(policy, reference.double(), weight)
    with pytest.raises(ValueError, match=r"lam .* must be a number in \[0, 1\], got 1.5"):
        fused_token_kl(policy, reference, weight, lam=1.5)
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \[6\]"):
        fused_token_kl(policy, reference, weight, mask=torch.ones(6, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \[6\]"):
        fused_token_kl(policy, reference, weight, mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="chunk_size must be a positive number of rows"):
        fused_token_kl(policy, reference, weight, chunk_size=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_token_kl(policy, reference, weight, backend="cuda")


@NEEDS_TRITON_PACKAGE
def test_triton_kernel_compiles_for_hopper():
    signature = {"policy_ptr": "*fp32", "policy_row_stride": "i32", "reference_ptr": "*fp32",
                 "reference_row_stride": "i32", "stats_ptr": "*fp32", "stats_stride": "i32", "kl_ptr": "*fp32",
                 "scale_ptr": "*fp32", "grad_ptr": "*bf16", "grad_row_stride": "i32", "n_cols": "i32", "lam": "fp32"}
    builds = [("token_kl_rows_kernel", signature,
               {"HAS_STATS": has_stats, "WRITE_GRAD": write_grad, "HAS_SCALE": has_scale, "BLOCK_V": 4096})
              for has_stats, write_grad, has_scale in [(False, False, False), (False, True, False), (True, True, True)]]
    assert_kernels_compile_for_hopper("hscr_fast.kernels._triton.token_kl_rows", builds)
