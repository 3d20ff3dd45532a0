"""Shared by the kernel ops: backend choice, the fp32-output linear layer, input checks, and the chunking and
backward shared by the two ops on logits = hidden @ weight.T (fused_linear_logprobs, fused_token_kl).

Every op has a Triton form (CUDA tensors) and a chunked PyTorch form with the same memory behaviour (CPU, and CUDA
without triton). `backend="auto"` picks by device; `backend="triton"` on CPU tensors runs the Triton kernels in
Triton's interpreter, which needs TRITON_INTERPRET=1 in the environment before the op's kernels are first built
(they are built lazily, on the first Triton-path call, so a test module can set it at import time).
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")

# Rows of W upcast at a time when fp32 logits must come from low-precision inputs without a fused fp32-output GEMM:
# bounds the transient fp32 copy of W to this many rows instead of all V.
_UPCAST_WEIGHT_ROWS = 4096


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def resolve_backend(backend: str, device: torch.device) -> str:
    """'triton' or 'torch' for tensors on `device`; explains what to do when the requested backend cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError("backend='triton' needs the `triton` package (Linux + CUDA); use backend='torch' or 'auto'")
    if device.type != "cuda" and not triton_interpret_mode():
        raise RuntimeError(
            f"backend='triton' got {device.type} tensors: Triton kernels run on CUDA, or on the CPU in Triton's "
            "interpreter when TRITON_INTERPRET=1 is set before the first Triton-path call; "
            "use backend='torch' otherwise"
        )
    return "triton"


@functools.cache
def _cuda_mm_has_out_dtype() -> bool:
    """torch.mm(a, b, out_dtype=torch.float32) for bf16/fp16 inputs exists on CUDA from torch 2.8 on."""
    probe = torch.ones(2, 2, device="cuda", dtype=torch.bfloat16)
    try:
        torch.mm(probe, probe, out_dtype=torch.float32)
    except (TypeError, RuntimeError):
        return False
    return True


def linear_logits_fp32(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden [R, D] @ weight[V, D].T with fp32 (or fp64) accumulation *and* output.

    A bf16 logits tensor would round every logit to 8 significant bits (about 0.03 at |logit| = 10), an error that
    the log-softmax then passes straight into the log-probability; fp32 output keeps the GEMM's fp32 accumulator.
    Autocast is switched off here for the same reason: it would hand back bf16 logits from fp32 inputs.
    """
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        if hidden.dtype in (torch.float32, torch.float64):
            return hidden @ weight.T
        if hidden.is_cuda and _cuda_mm_has_out_dtype():
            return torch.mm(hidden, weight.T, out_dtype=torch.float32)
        out = hidden.new_empty(hidden.shape[0], weight.shape[0], dtype=torch.float32)
        hidden32 = hidden.float()
        for start in range(0, weight.shape[0], _UPCAST_WEIGHT_ROWS):
            stop = min(start + _UPCAST_WEIGHT_ROWS, weight.shape[0])
            out[:, start:stop] = hidden32 @ weight[start:stop].float().T
        return out


# Least memory a chunk of logits may use, whatever 1/8 of the full logits comes to.
_MIN_CHUNK_BYTES = 32 * 2**20


def default_chunk_rows(rows: int, vocab: int, dtype: torch.dtype, logit_blocks: int) -> int:
    """Rows per chunk so that `logit_blocks` fp32 [rows, V] blocks (plus the gradient factor when `dtype` is
    narrower than fp32) use 1/8 of the full logits' memory in `dtype`, and at least _MIN_CHUNK_BYTES."""
    itemsize, logits_itemsize = dtype.itemsize, compute_dtype(dtype).itemsize
    bytes_per_row = vocab * (logit_blocks * logits_itemsize + (itemsize if itemsize != logits_itemsize else 0))
    budget = max(_MIN_CHUNK_BYTES, rows * vocab * itemsize // 8)
    return max(1, min(rows, budget // bytes_per_row))


def rescale_direction(direction: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """Frozen-weight backward: the per-row gradient direction kept by forward, times the upstream gradient [N].
    fp32 multiply, one rounding into the hidden dtype; `out=` avoids an fp32 [N, D] temporary."""
    return torch.mul(direction, grad_out.float()[:, None], out=torch.empty_like(direction))


def recompute_linear_grads(hidden: torch.Tensor, weight: torch.Tensor, chunk_rows: int, hidden_needs_grad: bool,
                           grad_factor_of) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Trained-weight backward of a chunked op on logits = hidden @ weight.T: (grad_hidden or None, grad_weight).

    `grad_factor_of(chunk)` recomputes the chunk's dOut/dlogits [rows, V] in the weight dtype. grad_weight is
    accumulated in the weight dtype, one rounding per chunk (as Liger does): an fp32 accumulator would add a full fp32
    [V, D] copy of the weight to the peak."""
    grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if hidden_needs_grad else None
    grad_weight = torch.zeros_like(weight, memory_format=torch.contiguous_format)
    for start in range(0, hidden.shape[0], chunk_rows):
        chunk = slice(start, start + chunk_rows)
        grad_factor = grad_factor_of(chunk)
        if hidden_needs_grad:
            torch.mm(grad_factor, weight, out=grad_hidden[chunk])
        grad_weight.addmm_(grad_factor.T, hidden[chunk])
    return grad_hidden, grad_weight


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for bf16/fp16/fp32 inputs, fp64 kept for fp64 inputs (useful in gradient checks)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_labels(labels: torch.Tensor, rows: int, vocab: int, ignore_index: int, *, op: str,
                 name: str = "labels") -> None:
    """Labels must be an integer vector of length `rows`, each in [0, vocab) or equal to ignore_index."""
    if labels.dim() != 1 or labels.shape[0] != rows:
        raise ValueError(f"{op}: {name} must have shape [{rows}], got {list(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{op}: {name} must be an integer tensor of token ids, got {labels.dtype}")
    out_of_range = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if rows and bool(out_of_range.any()):
        position = int(out_of_range.nonzero()[0, 0])
        raise ValueError(
            f"{op}: {name}[{position}] = {int(labels[position])} is outside the vocabulary [0, {vocab}) and is not "
            f"ignore_index={ignore_index}; check the tokenizer/lm_head pairing or mask the position with ignore_index"
        )
