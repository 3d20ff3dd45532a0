"""Shared by the kernel ops: backend choice, the fp32-output linear layer, chunk sizes and input checks.

Every op has a Triton form (CUDA tensors) and a chunked PyTorch form with the same memory behaviour (CPU, and CUDA
without triton). `backend="auto"` picks by device; `backend="triton"` on CPU tensors runs the Triton kernels in
Triton's interpreter, which needs TRITON_INTERPRET=1 in the environment before the op's kernels are first built.
The kernels live in `_triton/`, imported only when an op takes its Triton path (that package says why), so a test
module can still set TRITON_INTERPRET at its import time.
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


def _listing(names) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def check_head_inputs(op: str, hidden: dict[str, torch.Tensor], weight: torch.Tensor, *, rows: str = "N",
                      on_same_device: dict[str, torch.Tensor] | None = None) -> None:
    """Checks shared by the ops on logits = hidden @ weight.T: every tensor of `hidden` (name -> tensor) is
    [rows, D] and all have one shape, weight is [V, D] with V > 0, all share one floating dtype, and they share one
    device with the tensors of `on_same_device` (labels)."""
    states, names = list(hidden.values()), list(hidden)
    first = states[0]
    if first.dim() != 2 or weight.dim() != 2 or any(state.shape != first.shape for state in states):
        both = "both " if len(states) == 2 else ""
        raise ValueError(f"{op}: {_listing(names)} must {both}be [{rows}, D] and weight [V, D], got "
                         f"{_listing(str(list(tensor.shape)) for tensor in (*states, weight))}")
    if first.shape[1] != weight.shape[1]:
        subject = f"{names[0]} has" if len(states) == 1 else "hidden states have"
        raise ValueError(f"{op}: {subject} D={first.shape[1]} but weight has D={weight.shape[1]} (weight is [V, D])")
    if not weight.is_floating_point() or any(state.dtype != weight.dtype for state in states):
        raise TypeError(f"{op}: {_listing([*names, 'weight'])} must share one floating dtype, got "
                        f"{_listing(str(tensor.dtype) for tensor in (*states, weight))}")
    others = on_same_device or {}
    tensors = (*states, weight, *others.values())
    if any(tensor.device != weight.device for tensor in tensors):
        raise ValueError(f"{op}: {_listing([*names, 'weight', *others])} must be on one device, got "
                         f"{_listing(str(tensor.device) for tensor in tensors)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{op}: weight has an empty vocabulary")


def check_chunk_rows(chunk_size: int | None, op: str) -> None:
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be a positive number of rows, got {chunk_size}")
