"""What the row kernels of the differentiable ops (logprob_rows, token_kl_rows) share: a row's upstream-gradient
factor and where its gradient goes."""
import torch
import triton
import triton.language as tl


@triton.jit
def gradient_row(scale_ptr, grad_ptr, grad_row_stride, row, HAS_SCALE: tl.constexpr):
    """(the row's upstream gradient in fp32, 1 when there is none (forward's precomputed direction); the pointer to
    the row's gradient)."""
    scale = 1.0
    if HAS_SCALE:
        scale = tl.load(scale_ptr + row).to(tl.float32)
    return scale, grad_ptr + row * grad_row_stride


def grad_buffer(logits: torch.Tensor, grad_dtype: torch.dtype | None) -> torch.Tensor:
    """Where the gradient pass writes: over the chunk's logits when the dtypes agree (each tile is read before it is
    overwritten, and the logits are not needed afterwards), else a new [C, V] tensor in `grad_dtype`."""
    if grad_dtype is None or grad_dtype == logits.dtype:
        return logits
    return logits.new_empty(logits.shape, dtype=grad_dtype)
