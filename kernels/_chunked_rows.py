"""The autograd base of the ops whose value is one number per row of logits = hidden @ weight.T, computed a chunk of
rows at a time (fused_linear_logprobs, fused_token_kl).

An op supplies only its row work, in a torch form and a Triton form with one contract (`torch_rows`,
`triton_rows`): from one chunk of logits, the value per row, the per-row statistics backward needs to rebuild the
chunk's gradient, and, when asked, G = dValue/dlogits [C, V] scaled by the upstream gradient. The base computes the
logits, runs the chunk loop, chooses the gradient strategy and keeps what backward needs, so every op has the same
memory behaviour: the chunk's logits (and G) are the only vocabulary-sized buffers alive, in forward and in backward;
the [N, V] logits are never stored.

Gradient strategy, chosen in forward from which inputs need a gradient:
  * hidden needs grad, weight frozen (LoRA) -> precompute. The value is one number per row, so the upstream gradient
    g only rescales row n: grad_h_n = g_n · G_n W, and the direction G_n W does not depend on g. Forward forms it
    while G is at hand (one more GEMM per chunk) and keeps it, [N, D] in the hidden dtype, cheaper than anything
    vocabulary-sized; backward is one multiply, and nothing is recomputed.
  * weight needs grad -> recompute. grad_W = Σ_n g_n G_nᵀ h_n weighs every row by g before summing over rows, so it
    cannot be formed before g is known without keeping [N, V]. Forward keeps the row statistics only; backward
    recomputes each chunk's logits, turns them into g·G in one pass and runs the two gradient GEMMs.
  * nothing needs grad -> forward only.

A subclass declares its row work and the layout of its row tensors; forward and backward are the base's (forward a
classmethod, as in Liger's chunked-loss bases, so that it reaches the subclass's declarations). Every op is called
as `Op.apply(*rows, weight, setting, chunk_rows, backend)`.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ._common import compute_dtype, linear_logits_fp32


class ChunkedLinearRowsFunction(torch.autograd.Function):
    # Leading dimensions of the per-row statistics forward keeps for backward, [*stats_shape, N]: () for one number
    # per row.
    stats_shape: tuple[int, ...] = ()
    # How many of the op's row tensors, from the first, go through the head; the rest (labels) reach the row work as
    # they are. rows[0] is the hidden state that gets the gradient.
    head_rows: int = 1

    @staticmethod
    def torch_rows(*logits_and_rows, setting, stats=None, grad_scale=None, grad_dtype=None):
        """Row work on one chunk: the fp32 logits [C, V] of the head rows (consumed: they may be overwritten), then
        the chunk of the other row tensors. Without `stats` (forward): (value [C] float32, statistics
        [*stats_shape, C], gradient factor or None). With `stats` (backward): (None, stats, gradient factor). The
        gradient factor, in `grad_dtype` (None: not wanted), is G per row times `grad_scale` (the upstream gradient;
        1 when None)."""
        raise NotImplementedError

    @staticmethod
    def triton_rows():
        """The Triton form of `torch_rows`, imported when called: the Triton path is the only one that imports
        triton (see `_triton`)."""
        raise NotImplementedError

    @classmethod
    def _chunk(cls, backend, weight, rows, setting, **options):
        row_work = cls.triton_rows() if backend == "triton" else cls.torch_rows
        logits = [linear_logits_fp32(row, weight) for row in rows[:cls.head_rows]]
        return row_work(*logits, *rows[cls.head_rows:], setting=setting, **options)

    @classmethod
    def forward(cls, ctx, *inputs) -> torch.Tensor:
        *rows, weight, setting, chunk_rows, backend = inputs
        hidden_needs_grad, weight_needs_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[len(rows)]
        hidden = rows[0]
        count = hidden.shape[0]
        precompute = hidden_needs_grad and not weight_needs_grad
        value = hidden.new_empty(count, dtype=torch.float32)
        # the Triton row kernels work in fp32; the torch form keeps fp64 statistics for fp64 inputs (gradient checks)
        stats = hidden.new_empty(*cls.stats_shape, count,
                                 dtype=torch.float32 if backend == "triton" else compute_dtype(hidden.dtype))
        direction = torch.empty_like(hidden, memory_format=torch.contiguous_format) if precompute else None
        for start in range(0, count, chunk_rows):
            chunk = slice(start, start + chunk_rows)
            value[chunk], stats[..., chunk], grad_factor = cls._chunk(
                backend, weight, [row[chunk] for row in rows], setting, grad_dtype=weight.dtype if precompute else None
            )
            if precompute:
                torch.mm(grad_factor, weight, out=direction[chunk])
        ctx.precompute, ctx.hidden_needs_grad, ctx.row_count = precompute, hidden_needs_grad, len(rows)
        ctx.op, ctx.setting, ctx.chunk_rows, ctx.backend = cls, setting, chunk_rows, backend
        if precompute:
            ctx.save_for_backward(direction)
        elif weight_needs_grad:
            ctx.save_for_backward(*rows, weight, stats)
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_value):
        # no gradient to the other row tensors (labels, the reference's hidden states), the setting and the options
        grad_hidden, grad_weight = ChunkedLinearRowsFunction._hidden_and_weight_grads(ctx, grad_value)
        return grad_hidden, *[None] * (ctx.row_count - 1), grad_weight, None, None, None

    @staticmethod
    def _hidden_and_weight_grads(ctx, grad_value: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if ctx.precompute:
            (direction,) = ctx.saved_tensors
            # fp32 multiply, one rounding into the hidden dtype; `out=` avoids an fp32 [N, D] temporary
            return torch.mul(direction, grad_value.float()[:, None], out=torch.empty_like(direction)), None
        *rows, weight, stats = ctx.saved_tensors
        hidden = rows[0]
        grad_value = grad_value.float().contiguous()
        grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if ctx.hidden_needs_grad else None
        # accumulated in the weight dtype, one rounding per chunk (as Liger does): an fp32 accumulator would add a full
        # fp32 [V, D] copy of the weight to the peak
        grad_weight = torch.zeros_like(weight, memory_format=torch.contiguous_format)
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            chunk = slice(start, start + ctx.chunk_rows)
            _, _, grad_factor = ctx.op._chunk(ctx.backend, weight, [row[chunk] for row in rows], ctx.setting,
                                              stats=stats[..., chunk], grad_scale=grad_value[chunk],
                                              grad_dtype=weight.dtype)
            if grad_hidden is not None:
                torch.mm(grad_factor, weight, out=grad_hidden[chunk])
            grad_weight.addmm_(grad_factor.T, hidden[chunk])
        return grad_hidden, grad_weight
