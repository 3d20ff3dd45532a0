"""Throughput and peak memory of hscr_fast.kernels against the plain PyTorch forms (and Liger-Kernel, on CUDA).

  pytest bench/                                       CPU cases run anywhere (a couple of minutes on 2 cores)
  HSCR_BENCH_RESULTS=bench/results/kernels-<device>-<date>.json pytest bench/     also writes a JSON summary

CPU cases use the issue's target shapes (V = 32000, N = 4096, D = 1024, fp32) and assert the memory target (peak
≤ 1/4 of the plain form's); time ratios are recorded, not asserted (the CPU is shared and noisy). CUDA cases (bf16,
N = 8192, D = 4096) also record the fraction of the device's measured bf16 matmul rate / copy bandwidth reached.
"""
from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch
from hscr_fast.kernels import contrastive_select, contrastive_select_from_hidden, fused_linear_logprobs

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="GPU benchmark: needs CUDA")
LIGER = CUDA and importlib.util.find_spec("liger_kernel") is not None
CPU_MEMORY_TARGET = 0.25
CPU_ROUNDS = int(os.environ.get("HSCR_BENCH_ROUNDS", 2))
CUDA_ROUNDS = int(os.environ.get("HSCR_BENCH_ROUNDS", 5))


# ------------------------------------------------------------------------------------------------ plain forms
def plain_logprobs(hidden, weight, labels, ignore_index=-100):
    """Materialised logits -> log_softmax -> gather (what a DPO trainer usually does)."""
    logprobs = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
    valid = labels != ignore_index
    return torch.where(valid, logprobs.gather(1, torch.where(valid, labels, 0)[:, None]).squeeze(1), 0.0)


def plain_contrastive_select(logits_full, logits_drop, labels, *, beta=0.9, top_n=10, alpha=0.1, num_candidates=8):
    """VCD-style multi-pass contrast: full log_softmax of both, contrast tensor, softmax, masks, topk."""
    logprobs_full = torch.log_softmax(logits_full.float(), dim=-1)
    logprobs_drop = torch.log_softmax(logits_drop.float(), dim=-1)
    labels = labels[:, None]
    sensitivity = (logprobs_full.gather(1, labels) - logprobs_drop.gather(1, labels)).squeeze(1)
    p_diff = torch.softmax((1 + beta) * logits_full.float() - beta * logits_drop.float(), dim=-1)
    candidates = logprobs_full >= logprobs_full.amax(dim=-1, keepdim=True) + math.log(alpha)
    candidates.scatter_(1, logits_drop.topk(num_candidates, dim=-1).indices, True)
    candidates.scatter_(1, labels, False)
    replacement = p_diff.masked_fill(~candidates, float("inf")).argmin(dim=-1)
    positions = sensitivity.topk(min(top_n, sensitivity.shape[0])).indices
    return sensitivity, positions, replacement


# ------------------------------------------------------------------------------------------------ inputs
def logprob_inputs(rows, vocab, dim, dtype, device):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, dim, generator=generator).to(device, dtype)
    weight = (torch.randn(vocab, dim, generator=generator) / dim**0.5).to(device, dtype)
    labels = torch.randint(0, vocab, (rows,), generator=generator).to(device)
    return hidden, weight, labels


def logprob_forms(hidden, weight, labels, mode):
    """Callables running one forward (+ backward) of each form; `mode`: forward | frozen-weight | trained-weight."""
    needs_grad = mode != "forward"
    hidden = hidden.detach().requires_grad_(needs_grad)
    weight = weight.detach().requires_grad_(mode == "trained-weight")

    def runner(op):
        def run():
            hidden.grad = weight.grad = None
            if needs_grad:
                op(hidden, weight, labels).sum().backward()
            else:
                with torch.no_grad():
                    op(hidden, weight, labels)
        return run

    forms = {"plain": runner(plain_logprobs), "fused": runner(fused_linear_logprobs)}
    if LIGER and hidden.is_cuda:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger_loss = LigerFusedLinearCrossEntropyLoss(reduction="none")
        forms["liger"] = runner(lambda h, w, y: -liger_loss(w, h, y))
    return forms


def contrast_inputs(rows, vocab, dim, dtype, device):
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(vocab, dim, generator=generator) * 3 / dim**0.5).to(device, dtype)
    hidden_full = torch.randn(rows, dim, generator=generator).to(device, dtype)
    hidden_drop = (hidden_full.float().cpu() + 0.5 * torch.randn(rows, dim, generator=generator)).to(device, dtype)
    labels = torch.randint(0, vocab, (rows,), generator=generator).to(device)
    return hidden_full, hidden_drop, weight, labels


# ------------------------------------------------------------------------------------------------ device yardsticks
def best_time(fn, repeats=5):
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return min(times)


def measured_matmul_flops(rows, dim, vocab, dtype):
    a = torch.randn(rows, dim, device="cuda", dtype=dtype)
    b = torch.randn(dim, vocab, device="cuda", dtype=dtype)
    a @ b
    return 2 * rows * dim * vocab / best_time(lambda: a @ b)


def measured_copy_bandwidth(nbytes):
    source = torch.empty(nbytes // 2, device="cuda", dtype=torch.bfloat16)
    target = torch.empty_like(source)
    target.copy_(source)
    return 2 * nbytes / best_time(lambda: target.copy_(source))  # read + write


# ------------------------------------------------------------------------------------------------ log-probs
@pytest.mark.parametrize("mode", ["forward", "frozen-weight", "trained-weight"])
def test_bench_logprobs_cpu(side_by_side, mode):
    rows, vocab, dim, dtype, device = 4096, 32000, 1024, torch.float32, torch.device("cpu")
    forms = logprob_forms(*logprob_inputs(rows, vocab, dim, dtype, device), mode)
    summary = side_by_side(forms, subject="fused", baseline="plain", rounds=CPU_ROUNDS, device=device,
                           case={"op": "fused_linear_logprobs", "mode": mode, "N": rows, "V": vocab, "D": dim,
                                 "dtype": str(dtype)})
    memory_ratio = summary["vs_baseline"]["fused"]["memory_ratio"]
    if memory_ratio is not None:
        assert memory_ratio <= CPU_MEMORY_TARGET, summary


@needs_cuda
@pytest.mark.parametrize("mode", ["forward", "frozen-weight", "trained-weight"])
def test_bench_logprobs_cuda(side_by_side, mode):
    rows, vocab, dim, dtype, device = 8192, 32000, 4096, torch.bfloat16, torch.device("cuda")
    forms = logprob_forms(*logprob_inputs(rows, vocab, dim, dtype, device), mode)
    # GEMMs the op must do: logits, plus grad_hidden, plus grad_weight
    gemms = {"forward": 1, "frozen-weight": 2, "trained-weight": 3}[mode]
    matmul_rate = measured_matmul_flops(rows, dim, vocab, dtype)

    def fraction_of_matmul_rate(summary):
        return {name: {"fraction_of_matmul_rate": gemms * 2 * rows * dim * vocab / form["time_s"] / matmul_rate}
                for name, form in summary["forms"].items()} | {"measured_matmul_tflops": matmul_rate / 1e12}

    side_by_side(forms, subject="fused", baseline="plain", rounds=CUDA_ROUNDS, device=device, warmup=True,
                 derived=lambda summary: {"derived": fraction_of_matmul_rate(summary)},
                 case={"op": "fused_linear_logprobs", "mode": mode, "N": rows, "V": vocab, "D": dim,
                       "dtype": str(dtype)})


# ------------------------------------------------------------------------------------------------ contrast
def contrast_forms(hidden_full, hidden_drop, weight, labels, from_hidden):
    if from_hidden:
        def plain():
            plain_contrastive_select(hidden_full @ weight.T, hidden_drop @ weight.T, labels)

        def fused():
            contrastive_select_from_hidden(hidden_full, hidden_drop, weight, labels)
    else:
        logits_full, logits_drop = hidden_full @ weight.T, hidden_drop @ weight.T

        def plain():
            plain_contrastive_select(logits_full, logits_drop, labels)

        def fused():
            contrastive_select(logits_full, logits_drop, labels)
    return {"plain": plain, "fused": fused}


@pytest.mark.parametrize("source,rows", [("logits", 2048), ("hidden", 512)])
def test_bench_contrast_cpu(side_by_side, source, rows):
    vocab, dim, dtype, device = 32000, 1024, torch.float32, torch.device("cpu")
    forms = contrast_forms(*contrast_inputs(rows, vocab, dim, dtype, device), from_hidden=source == "hidden")
    summary = side_by_side(forms, subject="fused", baseline="plain", rounds=CPU_ROUNDS, device=device,
                           case={"op": f"contrastive_select from {source}", "T": rows, "V": vocab, "D": dim,
                                 "dtype": str(dtype)})
    memory_ratio = summary["vs_baseline"]["fused"]["memory_ratio"]
    if memory_ratio is not None:
        assert memory_ratio <= CPU_MEMORY_TARGET, summary


@needs_cuda
@pytest.mark.parametrize("source,rows", [("logits", 4096), ("logits", 64), ("hidden", 512)])
def test_bench_contrast_cuda(side_by_side, source, rows):
    vocab, dim, dtype, device = 32000, 4096, torch.bfloat16, torch.device("cuda")
    forms = contrast_forms(*contrast_inputs(rows, vocab, dim, dtype, device), from_hidden=source == "hidden")
    bandwidth = measured_copy_bandwidth(2**30)
    minimal_bytes = 2 * rows * vocab * dtype.itemsize  # from logits: each logit of both tensors read once

    def fraction_of_bandwidth(summary):
        return {"measured_copy_gbps": bandwidth / 1e9} | {
            name: {"fraction_of_copy_bandwidth": minimal_bytes / form["time_s"] / bandwidth}
            for name, form in summary["forms"].items()}

    side_by_side(forms, subject="fused", baseline="plain", rounds=CUDA_ROUNDS, device=device, warmup=True,
                 derived=(lambda summary: {"derived": fraction_of_bandwidth(summary)}) if source == "logits" else None,
                 case={"op": f"contrastive_select from {source}", "T": rows, "V": vocab, "D": dim, "dtype": str(dtype)})
