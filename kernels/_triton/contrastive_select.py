"""contrastive_select's Triton kernels: pass 1 (statistics and the running top-k of L') and pass 2 (candidates and
the best replacement key), each row's vocabulary split across programs so that short answers still fill the GPU.

Keys are packed int64: the order-preserving bits of an fp32 value in the high word, a token id in the low word
(0x7FFFFFFF − id when larger keys must mean lower ids), so one integer max or min orders by value, then by id.
"""
import torch
import triton
import triton.language as tl

_MAX_BLOCK_V = 2048
_INTERPRETER_SPLITS = 4  # enough programs per row to exercise the split merge under TRITON_INTERPRET

# int64 bounds of the packed keys: an empty top-k slot, and "no candidate"
_KEY_MIN = tl.constexpr(-(2**63))
_KEY_MAX = tl.constexpr(2**63 - 1)


@triton.jit
def _ordered_bits(values):
    # fp32 -> int32 with the same order; -0.0 first becomes +0.0 so that equal floats give equal integers
    values = tl.where(values == 0.0, 0.0, values)
    bits = values.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _keys_by_value_desc(values, ids):
    # max key = largest value, then lowest id
    return (_ordered_bits(values).to(tl.int64) << 32) | (0x7FFFFFFF - ids)


@triton.jit
def _keys_by_value_asc(values, ids):
    # min key = smallest value, then lowest id
    return (_ordered_bits(values).to(tl.int64) << 32) | ids


@triton.jit
def _program_columns(full_ptr, drop_ptr, full_row_stride, drop_row_stride, n_cols, span):
    """Programs (row, split) cover each row's vocabulary in splits of `span` columns: this program's row, split,
    columns [start, stop) and the two rows' pointers (int64 offsets: rows·V exceeds 2**31 on long answers)."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    start = split * span
    stop = tl.minimum(start + span, n_cols)
    return row, split, start, stop, full_ptr + row * full_row_stride, drop_ptr + row * drop_row_stride


@triton.jit
def stats_kernel(
    full_ptr, drop_ptr, full_row_stride, drop_row_stride, n_cols, span, vocab_offset,
    max_full_ptr, sumexp_full_ptr, max_drop_ptr, sumexp_drop_ptr, top_keys_ptr, num_splits,
    K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row, split, start, stop, full_row, drop_row = _program_columns(full_ptr, drop_ptr, full_row_stride,
                                                                   drop_row_stride, n_cols, span)
    max_full = float("-inf")
    sumexp_full = 0.0
    max_drop = float("-inf")
    sumexp_drop = 0.0
    slots = tl.arange(0, K_PAD)
    # empty slots hold the smallest key; padding slots (>= K) the largest, so they are never the one replaced
    top = tl.where(slots < K, _KEY_MIN, _KEY_MAX)
    for block_start in range(start, stop, BLOCK_V):
        cols = block_start + tl.arange(0, BLOCK_V)
        in_range = cols < stop
        full = tl.load(full_row + cols, mask=in_range, other=float("-inf")).to(tl.float32)
        drop = tl.load(drop_row + cols, mask=in_range, other=float("-inf")).to(tl.float32)

        new_max = tl.maximum(max_full, tl.max(full, 0))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        sumexp_full = sumexp_full * tl.exp(max_full - shift) + tl.sum(tl.exp(full - shift), 0)
        max_full = new_max
        new_max = tl.maximum(max_drop, tl.max(drop, 0))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        sumexp_drop = sumexp_drop * tl.exp(max_drop - shift) + tl.sum(tl.exp(drop - shift), 0)
        max_drop = new_max

        # Merge the tile into the running top-k: move the tile's best key in while it beats the worst kept one.
        # Keys are unique (they hold the token id), so each move takes out exactly one tile element; after the
        # first tiles only the few tokens that enter the top-k cost an iteration.
        keys = tl.where(in_range, _keys_by_value_desc(drop, cols.to(tl.int64) + vocab_offset), _KEY_MIN)
        best = tl.max(keys, 0)
        worst_kept = tl.min(top, 0)
        while best > worst_kept:
            top = tl.where(slots == tl.argmin(top, 0), best, top)
            keys = tl.where(keys == best, _KEY_MIN, keys)
            best = tl.max(keys, 0)
            worst_kept = tl.min(top, 0)
    out = row * num_splits + split
    tl.store(max_full_ptr + out, max_full)
    tl.store(sumexp_full_ptr + out, sumexp_full)
    tl.store(max_drop_ptr + out, max_drop)
    tl.store(sumexp_drop_ptr + out, sumexp_drop)
    tl.store(top_keys_ptr + out * K + slots, top, mask=slots < K)


@triton.jit
def candidates_kernel(
    full_ptr, drop_ptr, full_row_stride, drop_row_stride, n_cols, span, vocab_offset,
    labels_ptr, exclude_ptr, max_full_ptr, max_drop_ptr, kth_key_ptr, best_ptr, num_splits, log_alpha,
    log_alpha_drop, coef_full, coef_drop, NUM_EXCLUDED: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row, split, start, stop, full_row, drop_row = _program_columns(full_ptr, drop_ptr, full_row_stride,
                                                                   drop_row_stride, n_cols, span)
    label = tl.load(labels_ptr + row)
    max_full = tl.load(max_full_ptr + row)
    max_drop = tl.load(max_drop_ptr + row)
    kth_key = tl.load(kth_key_ptr + row)
    best = tl.full([], _KEY_MAX, tl.int64)
    for block_start in range(start, stop, BLOCK_V):
        cols = block_start + tl.arange(0, BLOCK_V)
        in_range = cols < stop
        ids = cols.to(tl.int64) + vocab_offset
        full = tl.load(full_row + cols, mask=in_range, other=0.0).to(tl.float32)
        drop = tl.load(drop_row + cols, mask=in_range, other=0.0).to(tl.float32)
        # deprived side: in the top-k of L' and plausible without the image; full side: plausible with it
        deprived = (_keys_by_value_desc(drop, ids) >= kth_key) & ((drop - max_drop) >= log_alpha_drop)
        plausible = (full - max_full) >= log_alpha
        candidate = in_range & (deprived | plausible) & (ids != label)
        for slot in tl.static_range(NUM_EXCLUDED):  # a handful of ids per row: one comparison each
            candidate = candidate & (ids != tl.load(exclude_ptr + row * NUM_EXCLUDED + slot))
        contrast = coef_full * full - coef_drop * drop
        keys = tl.where(candidate, _keys_by_value_asc(contrast, ids), _KEY_MAX)
        best = tl.minimum(best, tl.min(keys, 0))
    tl.store(best_ptr + row * num_splits + split, best)


def _split_layout(rows: int, cols: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_V, span, splits): each row's `cols` go to `splits` programs of `span` columns (a multiple of BLOCK_V)."""
    block = min(_MAX_BLOCK_V, triton.next_power_of_2(cols))
    blocks = triton.cdiv(cols, block)
    if device.type == "cuda":
        # about 4 programs per SM in all, however few rows there are
        programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
        splits = max(1, min(blocks, triton.cdiv(programs, max(rows, 1))))
    else:
        splits = min(blocks, _INTERPRETER_SPLITS)
    span = triton.cdiv(blocks, splits) * block
    return block, span, triton.cdiv(cols, span)


def stats_pass(full, drop, vocab_offset, k):
    """Pass 1 on one chunk (the torch form's `_stats_torch`): per-split partials (max_full, sumexp_full, max_drop,
    sumexp_drop) [T, S] each and the splits' top-k keys [T, S·k]."""
    rows, cols = full.shape
    block, span, splits = _split_layout(rows, cols, full.device)
    partial = [full.new_empty(rows, splits, dtype=torch.float32) for _ in range(4)]
    top_keys = full.new_empty(rows, splits * k, dtype=torch.int64)
    stats_kernel[(rows, splits)](
        full, drop, full.stride(0), drop.stride(0), cols, span, vocab_offset, *partial, top_keys, splits,
        K=k, K_PAD=triton.next_power_of_2(max(k, 1)), BLOCK_V=block, num_warps=8 if block >= 2048 else 4,
    )
    return (*partial, top_keys)


def candidates_pass(full, drop, vocab_offset, labels, exclude, stats, options):
    """Pass 2 on one chunk (the torch form's `_candidates_torch`): each row's least ascending (contrast, id) key
    among its candidates, INT64_MAX where none; `stats` and `options` are the op's pass-1 results and options."""
    rows, cols = full.shape
    block, span, splits = _split_layout(rows, cols, full.device)
    best = full.new_empty(rows, splits, dtype=torch.int64)
    num_excluded = 0 if exclude is None else exclude.shape[1]
    candidates_kernel[(rows, splits)](
        full, drop, full.stride(0), drop.stride(0), cols, span, vocab_offset,
        labels, labels if exclude is None else exclude, stats.max_full, stats.max_drop, stats.kth_key, best, splits,
        options.log_alpha, options.log_alpha_drop, options.coef_full, options.coef_drop, NUM_EXCLUDED=num_excluded,
        BLOCK_V=block, num_warps=8 if block >= 2048 else 4,
    )
    return best.amin(dim=1)
