"""hscr_fast.kernels.contrastive_select(_from_hidden): torch and Triton forms against a float64 reference.

Without CUDA the Triton form runs in Triton's interpreter: TRITON_INTERPRET=1 is set by tests/kernel_backends.py, at
import time, before the first Triton-path call builds the kernels (the kernels module imports triton lazily). Random
inputs are drawn so that exact ties have probability ~0 and selections must equal the reference exactly; the tie rules
(lowest token id, lowest position) get their own constructed test.

Every reference comparison runs with the default candidate rule (deprived-side cut alpha_drop = alpha) and with
alpha_drop=0 (the paper's literal rule) in the torch form; the Triton form, slow in the interpreter, runs each test
once, with the cut in most tests and without it in a few (`cut_cases`).
"""
import importlib
import math

import pytest
import torch
from helpers import LargestTensor
from hscr_fast.kernels import ContrastiveSelection, contrastive_select, contrastive_select_from_hidden
from hscr_fast.kernels._common import linear_logits_fp32
from kernel_backends import BACKENDS, DEVICE, NEEDS_TRITON, NEEDS_TRITON_PACKAGE, assert_kernels_compile_for_hopper

CUT, LITERAL = None, 0.0  # alpha_drop: the default deprived-side cut (= alpha), and none (the paper's literal rule)


RULES = {"cut": CUT, "literal": LITERAL}


def cut_cases():
    """(backend, alpha_drop): torch with both rules, Triton with the default one."""
    return [pytest.param("torch", CUT, id="torch-cut"), pytest.param("torch", LITERAL, id="torch-literal"),
            pytest.param("triton", CUT, id="triton-cut", marks=NEEDS_TRITON)]


def rule_cases(settings: dict, triton_literal=()):
    """(backend, alpha_drop, setting) for each named setting: torch with both rules; Triton once per setting, with
    the literal rule for the names in `triton_literal` and the cut for the others (each rule still meets Triton,
    without doubling its slow interpreter cases)."""
    cases = []
    for name, setting in settings.items():
        for rule, alpha_drop in RULES.items():
            cases.append(pytest.param("torch", alpha_drop, setting, id=f"{name}-torch-{rule}"))
        rule = "literal" if name in triton_literal else "cut"
        cases.append(pytest.param("triton", RULES[rule], setting, id=f"{name}-triton-{rule}", marks=NEEDS_TRITON))
    return cases


def reference_contrastive_select(logits_full, logits_drop, labels, *, beta=0.9, top_n=10, alpha=0.1,
                                 alpha_drop=None, num_candidates=8, sensitivity="logprob", content_mask=None,
                                 ignore_index=-100, rule="pdiff", exclude=None, min_sensitivity=None):
    """Stage 1 steps 3-5 (docs/method.md) in float64, one position at a time, with the deprived-side cut
    p_drop(v) >= alpha_drop * max p_drop on the top-k (alpha_drop None: = alpha; 0: the literal rule).
    rule="deprived": the highest (1+β)·L' − β·L among the top-k of L' with p_drop(v) >= alpha_drop·max p_drop.
    `exclude` [T, E]:
    ids never chosen at row t (-1: none). min_sensitivity: positions need s_t > it."""
    full, drop = logits_full.double().cpu(), logits_drop.double().cpu()
    labels = labels.cpu()
    rows, vocab = full.shape
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)[:, None]
    logprob_full = torch.where(valid, torch.log_softmax(full, -1).gather(1, safe).squeeze(1), 0.0)
    logprob_drop = torch.where(valid, torch.log_softmax(drop, -1).gather(1, safe).squeeze(1), 0.0)
    if sensitivity == "logprob":
        score = logprob_full - logprob_drop
    else:
        score = full.gather(1, safe).squeeze(1) - drop.gather(1, safe).squeeze(1)
    eligible = valid if content_mask is None else valid & content_mask.cpu()
    selectable = [t for t in range(rows) if eligible[t] and (min_sensitivity is None or score[t] > min_sensitivity)]
    positions = sorted(selectable, key=lambda t: (-score[t].item(), t))[:top_n]
    replacement = torch.full((rows,), -1, dtype=torch.int64)
    alpha_drop = alpha if alpha_drop is None else alpha_drop
    for t in range(rows):
        if not valid[t]:
            continue
        log_p_drop = torch.log_softmax(drop[t], -1)
        candidate = torch.zeros(vocab, dtype=torch.bool)
        # top-k of the dropped distribution, ties to the lower id (a stable sort keeps id order among equals)
        candidate[torch.sort(drop[t], descending=True, stable=True).indices[:num_candidates]] = True
        # the cuts p >= alpha * max p and the order of P_diff, taken in log space: at logits of ±1e4 the
        # probabilities themselves underflow to 0 even in float64 and would tie everywhere
        candidate &= log_p_drop >= (math.log(alpha_drop) if alpha_drop > 0 else -math.inf) + log_p_drop.max()
        if rule != "deprived":  # the full side: tokens plausible with the image
            log_p_full = torch.log_softmax(full[t], -1)
            candidate |= log_p_full >= (math.log(alpha) if alpha > 0 else -math.inf) + log_p_full.max()
        candidate[labels[t]] = False
        if exclude is not None:
            for token in exclude[t].tolist():
                if token >= 0:
                    candidate[token] = False
        if candidate.any():
            ids = candidate.nonzero().squeeze(1)
            if rule == "deprived":  # highest deprived-side contrast, first (lowest id) of equal maxima
                score_v = torch.log_softmax((1 + beta) * drop[t] - beta * full[t], -1)[ids]
                replacement[t] = ids[(score_v == score_v.max()).nonzero()[0, 0]]
            else:
                log_p_diff = torch.log_softmax((1 + beta) * full[t] - beta * drop[t], -1)[ids]
                replacement[t] = ids[(log_p_diff == log_p_diff.min()).nonzero()[0, 0]]
    return ContrastiveSelection(
        sensitivity=torch.where(eligible, score, -math.inf),
        sensitive_positions=torch.tensor(positions, dtype=torch.int64),
        replacement=replacement,
        logprob_full=logprob_full,
        logprob_drop=logprob_drop,
    )


def make_logits(rows, vocab, *, scale=3.0, seed=0, dtype=torch.float32):
    """Peaked full-image logits and a noisy image-deprived copy, as from a real model; continuous, so no ties."""
    generator = torch.Generator().manual_seed(seed)
    full = torch.randn(rows, vocab, generator=generator) * scale
    drop = full + torch.randn(rows, vocab, generator=generator) * scale / 2
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    # make some labels the full-image favourite, as in teacher forcing, so y_t is often in the candidate sets
    labels[::3] = full[::3].argmax(-1)
    return full.to(DEVICE, dtype), drop.to(DEVICE, dtype), labels.to(DEVICE)


def assert_same_selection(ours: ContrastiveSelection, expected: ContrastiveSelection, *, atol=1e-4):
    assert ours.sensitivity.dtype == torch.float32 and ours.logprob_full.dtype == torch.float32
    assert ours.sensitive_positions.dtype == torch.int64 and ours.replacement.dtype == torch.int64
    ours_sensitivity = ours.sensitivity.double().cpu()
    assert torch.equal(torch.isinf(ours_sensitivity), torch.isinf(expected.sensitivity))
    finite = torch.isfinite(expected.sensitivity)
    torch.testing.assert_close(ours_sensitivity[finite], expected.sensitivity[finite], atol=atol, rtol=1e-5)
    torch.testing.assert_close(ours.logprob_full.double().cpu(), expected.logprob_full, atol=atol, rtol=1e-5)
    torch.testing.assert_close(ours.logprob_drop.double().cpu(), expected.logprob_drop, atol=atol, rtol=1e-5)
    assert ours.sensitive_positions.cpu().tolist() == expected.sensitive_positions.tolist()
    assert ours.replacement.cpu().tolist() == expected.replacement.tolist()


def count_logit_chunks(monkeypatch) -> list[int]:
    """From now on, the vocabulary width of every logit chunk contrastive_select_from_hidden computes, in order."""
    module = importlib.import_module("hscr_fast.kernels.contrastive_select")
    logit_chunks = []

    def counting_linear_logits(hidden, head):
        logit_chunks.append(head.shape[0])
        return linear_logits_fp32(hidden, head)

    monkeypatch.setattr(module, "linear_logits_fp32", counting_linear_logits)
    return logit_chunks


@pytest.mark.parametrize("backend,alpha_drop,sensitivity",
                         rule_cases({"logprob": "logprob", "logit": "logit"}, triton_literal={"logit"}))
@pytest.mark.parametrize("rows,vocab,chunk_size", [(29, 1031, 300), (6, 32000, None)], ids=["T29-V1031", "T6-V32000"])
def test_matches_reference_on_random_logits(backend, alpha_drop, sensitivity, rows, vocab, chunk_size):
    full, drop, labels = make_logits(rows, vocab, seed=rows)
    labels[[1, rows - 1]] = -100
    content_mask = torch.ones(rows, dtype=torch.bool, device=DEVICE)
    content_mask[[2, 3]] = False
    kwargs = dict(sensitivity=sensitivity, content_mask=content_mask, top_n=4, alpha_drop=alpha_drop)
    ours = contrastive_select(full, drop, labels, backend=backend, chunk_size=chunk_size, **kwargs)
    expected = reference_contrastive_select(full, drop, labels, **kwargs)
    assert_same_selection(ours, expected)
    eligible = set(range(rows)) - {1, 2, 3, rows - 1}
    assert set(expected.sensitive_positions.tolist()) <= eligible
    assert len(expected.sensitive_positions) == min(4, len(eligible))
    assert (expected.replacement[[1, rows - 1]] == -1).all() and (expected.replacement[[0, 2]] >= 0).all()


@pytest.mark.parametrize("alpha_drop", [CUT, LITERAL], ids=["cut", "literal"])
@pytest.mark.parametrize("chunk_size", [None, 100], ids=["row-blocks", "row-blocks-and-vocab-chunks"])
def test_torch_form_tiles_agree_with_reference(monkeypatch, chunk_size, alpha_drop):
    # a tile budget of 4 whole rows: several row blocks, the last one partial
    monkeypatch.setattr(importlib.import_module("hscr_fast.kernels.contrastive_select"), "_TILE_ELEMENTS", 4 * 1031)
    full, drop, labels = make_logits(15, 1031, seed=4)
    labels[6] = -100
    ours = contrastive_select(full, drop, labels, top_n=6, alpha_drop=alpha_drop, backend="torch",
                              chunk_size=chunk_size)
    assert_same_selection(ours, reference_contrastive_select(full, drop, labels, top_n=6, alpha_drop=alpha_drop))


OPTION_EDGE_CASES = {
    "beta-alpha-k": dict(beta=0.5, alpha=0.3, num_candidates=3, top_n=100),
    "no-top-k": dict(num_candidates=0, alpha=0.05),
    "all-plausible": dict(alpha=0.0, num_candidates=2),
    "max-only": dict(alpha=1.0, num_candidates=1, top_n=0),
    "k-above-V": dict(num_candidates=2000),  # with the cut, the deprived side is the cut alone (no top-k kept)
}


@pytest.mark.parametrize("backend,alpha_drop,options",
                         rule_cases(OPTION_EDGE_CASES, triton_literal={"beta-alpha-k", "all-plausible", "k-above-V"}))
def test_option_edge_cases_match_reference(backend, alpha_drop, options):
    full, drop, labels = make_logits(13, 1031, seed=7)
    labels[5] = -100
    options = dict(options, alpha_drop=alpha_drop)
    ours = contrastive_select(full, drop, labels, backend=backend, chunk_size=200, **options)
    assert_same_selection(ours, reference_contrastive_select(full, drop, labels, **options))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "options",
    [dict(alpha=1.0, alpha_drop=0.02, num_candidates=2000), dict(alpha=0.0, alpha_drop=0.05, num_candidates=40),
     dict(alpha=1.0, alpha_drop=1.0, num_candidates=5)],
    ids=["k-above-V-drop-cut-only", "wide-top-k-partly-cut", "both-max-only"],
)
def test_alpha_drop_apart_from_alpha_matches_reference(backend, options):
    """The deprived-side cut on its own: the full side reduced to its argmax (alpha=1) or to everything (alpha=0)."""
    full, drop, labels = make_logits(13, 1031, seed=8)
    labels[3] = -100
    ours = contrastive_select(full, drop, labels, backend=backend, chunk_size=200, **options)
    expected = reference_contrastive_select(full, drop, labels, **options)
    assert_same_selection(ours, expected)
    literal = reference_contrastive_select(full, drop, labels, **dict(options, alpha_drop=0.0))
    if options["alpha"] == 1.0:  # the cut changed some choices: the test can tell the rules apart
        assert expected.replacement.tolist() != literal.replacement.tolist()


@pytest.mark.parametrize("backend,alpha_drop,chunk_size",
                         rule_cases({"one-chunk": None, "chunks": 300}, triton_literal={"chunks"}))
def test_from_hidden_matches_reference_and_never_forms_full_logits(backend, alpha_drop, chunk_size):
    rows, vocab, dim = 21, 1031, 45
    generator = torch.Generator().manual_seed(3)
    weight = (torch.randn(vocab, dim, generator=generator) * 0.5).to(DEVICE)
    hidden_full = torch.randn(rows, dim, generator=generator).to(DEVICE)
    hidden_drop = hidden_full + 0.5 * torch.randn(rows, dim, generator=generator).to(DEVICE)
    labels = torch.randint(0, vocab, (rows,), generator=generator).to(DEVICE)
    labels[4] = -100
    expected = reference_contrastive_select(hidden_full.double() @ weight.double().T,
                                            hidden_drop.double() @ weight.double().T, labels, alpha_drop=alpha_drop)
    with LargestTensor() as largest:
        ours = contrastive_select_from_hidden(hidden_full, hidden_drop, weight, labels, alpha_drop=alpha_drop,
                                              backend=backend, chunk_size=chunk_size)
    assert_same_selection(ours, expected)
    if chunk_size is not None:
        # at most a [T, chunk] tile of int64 keys or a [chunk, D] slice of the weight; [T, V] fp32 logits are larger
        assert largest.nbytes <= max(rows * chunk_size * 8, chunk_size * dim * 4) < rows * vocab * 4


FROM_HIDDEN_SPREADS = {"peaked-one-pass": (3.0, 1), "flat-two-passes": (0.01, 2)}


@pytest.mark.parametrize("alpha_drop", [CUT, LITERAL], ids=["cut", "literal"])
@pytest.mark.parametrize("spread", FROM_HIDDEN_SPREADS.values(), ids=FROM_HIDDEN_SPREADS.keys())
def test_from_hidden_torch_keeps_candidates_in_pass_one_or_falls_back(monkeypatch, spread, alpha_drop):
    # Peaked rows: pass 1 keeps the few possible candidates and no chunk's logits are computed twice. Flat rows:
    # nearly every token is plausible, too many to keep, so each chunk is recomputed for pass 2. Both must choose
    # what the float64 reference and the logits form (always two passes) choose.
    weight_scale, passes = spread
    rows, vocab, dim, chunk_size = 23, 2053, 64, 700
    generator = torch.Generator().manual_seed(11)
    weight = torch.randn(vocab, dim, generator=generator) * weight_scale / dim**0.5
    hidden_full = torch.randn(rows, dim, generator=generator)
    hidden_drop = hidden_full + 0.5 * torch.randn(rows, dim, generator=generator)
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    logits_full, logits_drop = hidden_full @ weight.T, hidden_drop @ weight.T
    labels[::3] = logits_full[::3].argmax(-1)
    labels[5] = -100
    logit_chunks = count_logit_chunks(monkeypatch)
    ours = contrastive_select_from_hidden(hidden_full, hidden_drop, weight, labels, alpha_drop=alpha_drop,
                                          backend="torch", chunk_size=chunk_size)
    assert sum(logit_chunks) == passes * 2 * vocab  # both sides, each chunk once per pass
    expected = reference_contrastive_select(hidden_full.double() @ weight.double().T,
                                            hidden_drop.double() @ weight.double().T, labels, alpha_drop=alpha_drop)
    assert_same_selection(ours, expected)
    two_passes = contrastive_select(logits_full, logits_drop, labels, alpha_drop=alpha_drop, backend="torch",
                                    chunk_size=chunk_size)
    assert torch.equal(ours.replacement, two_passes.replacement)
    assert (ours.replacement >= 0).sum() > rows // 2  # most positions have a replacement to compare


TIE_LAYOUTS = {f"{dtype_name}-{chunks_name}": (dtype, chunk_size)
               for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
               for chunks_name, chunk_size in (("whole-rows", None), ("vocab-chunks", 128))}


@pytest.mark.parametrize("backend,alpha_drop,layout",
                         rule_cases(TIE_LAYOUTS, triton_literal={"fp32-vocab-chunks", "bf16-whole-rows"}))
def test_tie_rules_lowest_token_id_and_lowest_position(backend, alpha_drop, layout):
    dtype, chunk_size = layout
    vocab, k = 1031, 2
    full = torch.zeros(6, vocab)
    drop = torch.zeros(6, vocab)
    labels = torch.full((6,), 50)
    full[:, 50] = 10.0  # y_t dominates p_full: the plausible set is {y_t} alone
    drop[:, [700, 9, 300, 17]] = 5.0  # a four-way tie for the top of L': with k=2 the lower ids 9 and 17 win
    full[:, 300] = -1.0  # 300 has the lowest contrast: chosen in rows 0-2 only if the top-k tie went the wrong way
    full[1, 50], full[4, 50] = 4.0, 4.0  # rows 1 and 4: smaller s_t, equal to each other
    drop[3, 9], drop[3, 17] = 6.0, 0.0  # row 3: top 2 = {9, 300} (300 beats 700 at 5.0 by its lower id), and
    # 300 has the lowest contrast; its lse' also moves, giving row 3 the largest s_t
    labels[5] = 9  # row 5: y_t = 9 is removed after the top-k is taken: candidates {17} and the plausible {50}
    full, drop, labels = full.to(DEVICE, dtype), drop.to(DEVICE, dtype), labels.to(DEVICE)
    ours = contrastive_select(full, drop, labels, num_candidates=k, top_n=5, alpha_drop=alpha_drop, backend=backend,
                              chunk_size=chunk_size)
    expected = reference_contrastive_select(full, drop, labels, num_candidates=k, top_n=5, alpha_drop=alpha_drop)
    assert_same_selection(ours, expected)
    # the same under both rules: the tied tokens at 5.0 (and 6.0) all pass the cut p_drop >= 0.1 max p_drop
    assert ours.replacement.cpu().tolist() == [9, 9, 9, 300, 9, 17]
    # rows 0 and 2 are identical, as are rows 1 and 4: equal sensitivities, lower position first
    assert ours.sensitive_positions.cpu().tolist() == [3, 0, 2, 1, 4]


@pytest.mark.parametrize("backend", BACKENDS)
def test_deprived_side_cut_replaces_yes_by_no_not_by_junk(backend):
    """The case found in the demo ("Is there a lesion?" → "yes"): without the image the model says "yes" 0.5, "no"
    0.4 and spreads the rest flat over junk ("lower", "and", ...). The full model is sure of "yes" and rejects the
    junk hardest, so under the paper's literal rule (alpha_drop=0) a junk token from the deprived top-8 has the lowest
    P_diff and replaces "yes"; the default cut (p_drop >= 0.1 max p_drop) keeps only "yes" and "no" on the deprived
    side, and "no" replaces "yes"."""
    vocab, yes, no = 1031, 500, 501  # every other id is junk
    drop = torch.full((1, vocab), math.log(0.1 / (vocab - 2)))  # the junk shares the last 0.1 evenly
    drop[0, yes], drop[0, no] = math.log(0.5), math.log(0.4)
    full = torch.full((1, vocab), -4.0)  # the full model rejects the junk hardest of all
    full[0, yes], full[0, no] = 12.0, 3.0  # "yes" wins by far; "no" is unlikely with the image, yet not junk
    labels = torch.tensor([yes])
    full, drop, labels = full.to(DEVICE), drop.to(DEVICE), labels.to(DEVICE)

    literal = contrastive_select(full, drop, labels, alpha_drop=0.0, backend=backend, chunk_size=256)
    # the top-8 of p_drop: yes, no and six junk tokens (ids 0-5: equal p_drop, ties to lower ids); the junk's P_diff
    # (contrast 1.9·(−4) − 0.9·log(0.1/1029) ≈ 0.7) is far below that of "no" (1.9·3 − 0.9·log 0.4 ≈ 6.5), and among
    # the tied junk the lowest id wins
    assert literal.replacement.cpu().tolist() == [0]
    assert_same_selection(literal, reference_contrastive_select(full, drop, labels, alpha_drop=0.0))
    default = contrastive_select(full, drop, labels, backend=backend, chunk_size=256)
    assert default.replacement.cpu().tolist() == [no]
    assert_same_selection(default, reference_contrastive_select(full, drop, labels))
    # None means "the same as alpha"
    same = contrastive_select(full, drop, labels, alpha=0.3, alpha_drop=None, backend=backend)
    assert same.replacement.tolist() == contrastive_select(full, drop, labels, alpha=0.3, alpha_drop=0.3,
                                                           backend=backend).replacement.tolist()


DEPRIVED_LAYOUTS = {"whole-rows": None, "vocab-chunks": 200}


DEPRIVED_OPTIONS = {"cut-top8": {}, "uncut-top5": {"alpha_drop": 0.0, "num_candidates": 5},
                    "cut-k-above-V": {"num_candidates": 2000}}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", DEPRIVED_LAYOUTS.values(), ids=DEPRIVED_LAYOUTS.keys())
@pytest.mark.parametrize("options", DEPRIVED_OPTIONS.values(), ids=DEPRIVED_OPTIONS.keys())
def test_deprived_rule_matches_reference_and_differs_from_pdiff(backend, chunk_size, options):
    full, drop, labels = make_logits(13, 1031, seed=21)
    labels[4] = -100
    ours = contrastive_select(full, drop, labels, rule="deprived", backend=backend, chunk_size=chunk_size, **options)
    expected = reference_contrastive_select(full, drop, labels, rule="deprived", **options)
    assert_same_selection(ours, expected)
    pdiff = reference_contrastive_select(full, drop, labels)
    assert ours.replacement.cpu().tolist() != pdiff.replacement.tolist()  # the rules can be told apart
    # most rows have a deprived-plausible token besides y_t; a row where y_t is the only one has none (-1)
    assert (expected.replacement >= 0).sum() >= 8


@pytest.mark.parametrize("backend", BACKENDS)
def test_deprived_rule_from_hidden_matches_reference(backend):
    rows, vocab, dim = 11, 1031, 40
    generator = torch.Generator().manual_seed(5)
    weight = (torch.randn(vocab, dim, generator=generator) * 0.5).to(DEVICE)
    hidden_full = torch.randn(rows, dim, generator=generator).to(DEVICE)
    hidden_drop = hidden_full + 0.5 * torch.randn(rows, dim, generator=generator).to(DEVICE)
    labels = torch.randint(0, vocab, (rows,), generator=generator).to(DEVICE)
    ours = contrastive_select_from_hidden(hidden_full, hidden_drop, weight, labels, rule="deprived", alpha_drop=0.05,
                                          backend=backend, chunk_size=300)
    expected = reference_contrastive_select(hidden_full.double() @ weight.double().T,
                                            hidden_drop.double() @ weight.double().T, labels, rule="deprived",
                                            alpha_drop=0.05)
    assert_same_selection(ours, expected)


def next_best_exclusions(first: ContrastiveSelection, vocab: int, seed: int) -> torch.Tensor:
    """[T, 3]: each row's first choice (so the next-best must come out), a random id, and padding (-1)."""
    generator = torch.Generator().manual_seed(seed)
    random_ids = torch.randint(0, vocab, (first.replacement.shape[0],), generator=generator)
    padding = torch.full_like(random_ids, -1)
    return torch.stack([first.replacement.cpu(), random_ids, padding], dim=1).to(DEVICE)


EXCLUDE_RULES = {"pdiff-cut": dict(), "pdiff-literal": dict(alpha_drop=0.0), "deprived": dict(rule="deprived")}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", EXCLUDE_RULES.values(), ids=EXCLUDE_RULES.keys())
def test_exclude_gives_the_next_best_candidate(backend, rule):
    full, drop, labels = make_logits(13, 1031, seed=9)
    labels[6] = -100
    first = reference_contrastive_select(full, drop, labels, **rule)
    exclude = next_best_exclusions(first, 1031, seed=1)
    ours = contrastive_select(full, drop, labels, exclude=exclude, backend=backend, chunk_size=300, **rule)
    expected = reference_contrastive_select(full, drop, labels, exclude=exclude, **rule)
    assert_same_selection(ours, expected)
    chosen = first.replacement >= 0
    assert chosen.sum() >= 6 and (expected.replacement[chosen] != first.replacement[chosen]).all()
    torch.testing.assert_close(ours.sensitivity.cpu(), contrastive_select(full, drop, labels, backend=backend,
                                                                          **rule).sensitivity.cpu())


@pytest.mark.parametrize("rule", EXCLUDE_RULES.values(), ids=EXCLUDE_RULES.keys())
def test_exclude_from_hidden_in_the_one_pass_record(monkeypatch, rule):
    """The torch from-hidden form decides candidacy from its pass-1 record (peaked rows): `exclude` must hold there
    too."""
    rows, vocab, dim, chunk_size = 17, 2053, 64, 700
    generator = torch.Generator().manual_seed(13)
    weight = torch.randn(vocab, dim, generator=generator) * 3.0 / dim**0.5
    hidden_full = torch.randn(rows, dim, generator=generator)
    hidden_drop = hidden_full + 0.5 * torch.randn(rows, dim, generator=generator)
    labels = (hidden_full @ weight.T).argmax(-1)
    logits_full, logits_drop = hidden_full.double() @ weight.double().T, hidden_drop.double() @ weight.double().T
    first = reference_contrastive_select(logits_full, logits_drop, labels, **rule)
    exclude = next_best_exclusions(first, vocab, seed=2).cpu()
    logit_chunks = count_logit_chunks(monkeypatch)
    ours = contrastive_select_from_hidden(hidden_full, hidden_drop, weight, labels, exclude=exclude, backend="torch",
                                          chunk_size=chunk_size, **rule)
    # the pdiff rule keeps its candidates in pass 1 (one pass); the deprived rule has no full-side cut to bound the
    # record and takes the two-pass path
    assert sum(logit_chunks) == (2 if rule.get("rule") == "deprived" else 1) * 2 * vocab
    assert_same_selection(ours, reference_contrastive_select(logits_full, logits_drop, labels, exclude=exclude,
                                                             **rule))


@pytest.mark.parametrize("backend", BACKENDS)
def test_min_sensitivity_keeps_only_image_supported_positions(backend):
    full, drop, labels = make_logits(19, 1031, seed=17)
    labels[2] = -100
    literal = contrastive_select(full, drop, labels, top_n=19, backend=backend)
    supported = contrastive_select(full, drop, labels, top_n=19, min_sensitivity=0.0, backend=backend)
    expected = reference_contrastive_select(full, drop, labels, top_n=19, min_sensitivity=0.0)
    assert_same_selection(supported, expected)
    positive = (literal.sensitivity > 0).sum().item()
    assert 0 < positive < 18  # both signs occur, so the threshold changes the positions
    assert supported.sensitive_positions.tolist() == literal.sensitive_positions[:positive].tolist()
    threshold = literal.sensitivity[literal.sensitive_positions[2]].item()
    top_two = contrastive_select(full, drop, labels, top_n=19, min_sensitivity=threshold, backend=backend)
    assert top_two.sensitive_positions.tolist() == literal.sensitive_positions[:2].tolist()
    torch.testing.assert_close(supported.sensitivity, literal.sensitivity)  # s_t itself is reported unchanged


def test_deprived_rule_replaces_yes_by_no():
    """The "yes"/"no" case above under the deprived rule: the junk is implausible without the image (p_drop far
    below 0.1 max p_drop), so only "no" is a candidate."""
    vocab, yes, no = 1031, 500, 501
    drop = torch.full((1, vocab), math.log(0.1 / (vocab - 2)))
    drop[0, yes], drop[0, no] = math.log(0.5), math.log(0.4)
    full = torch.full((1, vocab), -4.0)
    full[0, yes], full[0, no] = 12.0, 3.0
    ours = contrastive_select(full, drop, torch.tensor([yes]), rule="deprived", backend="torch")
    assert ours.replacement.tolist() == [no]
    # without the cut the junk of the deprived top-8 competes, and loses: its p_drop is far below that of "no"
    uncut = contrastive_select(full, drop, torch.tensor([yes]), rule="deprived", alpha_drop=0.0, backend="torch")
    assert uncut.replacement.tolist() == [no]


@pytest.mark.parametrize("backend,alpha_drop", cut_cases())
def test_extreme_logits_give_finite_outputs(backend, alpha_drop):
    full, drop, labels = make_logits(17, 1031, seed=11)
    full, drop = full * 3e3, drop * 3e3  # entries around ±1e4
    assert full.abs().max() > 1e4
    ours = contrastive_select(full, drop, labels, alpha_drop=alpha_drop, backend=backend, chunk_size=256)
    expected = reference_contrastive_select(full, drop, labels, alpha_drop=alpha_drop)
    for value in (ours.logprob_full, ours.logprob_drop, ours.sensitivity):
        assert torch.isfinite(value).all()
    # fp32 carries ~1e-3 absolute rounding at 1e4
    assert_same_selection(ours, expected, atol=5e-2)


@pytest.mark.parametrize("backend,alpha_drop", cut_cases())
def test_bf16_logits_error_is_within_a_small_multiple_of_pytorchs_own(backend, alpha_drop):
    """Same bf16 logits for everyone; fp64 reference on them; PyTorch's bf16 log-softmax is the yardstick."""
    full, drop, labels = make_logits(24, 1031, seed=5, dtype=torch.bfloat16)
    ours = contrastive_select(full, drop, labels, alpha_drop=alpha_drop, backend=backend)
    expected = reference_contrastive_select(full, drop, labels, alpha_drop=alpha_drop)
    safe = labels[:, None]
    plain_sensitivity = (torch.log_softmax(full, -1).gather(1, safe)
                         - torch.log_softmax(drop, -1).gather(1, safe)).squeeze(1)
    ours_error = (ours.sensitivity.double().cpu() - expected.sensitivity).abs().max().item()
    plain_error = (plain_sensitivity.double().cpu() - expected.sensitivity).abs().max().item()
    assert ours_error <= 2 * plain_error + 1e-6
    # the discrete outputs are exact: the arithmetic is fp32 on exactly representable inputs
    assert ours.sensitive_positions.cpu().tolist() == expected.sensitive_positions.tolist()
    assert ours.replacement.cpu().tolist() == expected.replacement.tolist()


@pytest.mark.parametrize("backend,alpha_drop", cut_cases())
def test_top_n_larger_than_eligible_and_all_ignored(backend, alpha_drop):
    full, drop, labels = make_logits(9, 1031, seed=2)
    content_mask = torch.zeros(9, dtype=torch.bool, device=DEVICE)
    content_mask[[2, 6, 7]] = True
    kwargs = dict(top_n=10, content_mask=content_mask, alpha_drop=alpha_drop)
    ours = contrastive_select(full, drop, labels, backend=backend, **kwargs)
    assert sorted(ours.sensitive_positions.tolist()) == [2, 6, 7]
    assert_same_selection(ours, reference_contrastive_select(full, drop, labels, **kwargs))

    ignored = torch.full_like(labels, -100)
    ours = contrastive_select(full, drop, ignored, backend=backend)
    assert ours.sensitive_positions.numel() == 0
    assert (ours.replacement == -1).all() and torch.isneginf(ours.sensitivity).all()
    assert (ours.logprob_full == 0).all() and (ours.logprob_drop == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_sequence(backend):
    empty = torch.empty(0, 1031, device=DEVICE)
    ours = contrastive_select(empty, empty, torch.empty(0, dtype=torch.int64, device=DEVICE), backend=backend)
    assert ours.sensitivity.shape == ours.replacement.shape == ours.sensitive_positions.shape == (0,)


def test_bad_inputs_raise_specific_errors():
    full, drop, labels = make_logits(5, 1031)
    with pytest.raises(ValueError, match=r"labels\[2\] = -1 is outside the vocabulary"):
        contrastive_select(full, drop, torch.tensor([0, 1, -1, 3, 4], device=DEVICE))
    with pytest.raises(ValueError, match="content_mask must be a bool tensor of shape \\[5\\]"):
        contrastive_select(full, drop, labels, content_mask=torch.ones(5, device=DEVICE))
    with pytest.raises(ValueError, match="alpha"):
        contrastive_select(full, drop, labels, alpha=1.5)
    with pytest.raises(ValueError, match="alpha_drop is the deprived-side cut"):
        contrastive_select(full, drop, labels, alpha_drop=-0.1)
    with pytest.raises(ValueError, match="sensitivity must be"):
        contrastive_select(full, drop, labels, sensitivity="prob")
    with pytest.raises(ValueError, match="rule must be one of"):
        contrastive_select(full, drop, labels, rule="ascending")
    with pytest.raises(ValueError, match=r"exclude must be an int64 tensor \[5, E\]"):
        contrastive_select(full, drop, labels, exclude=torch.zeros(4, 2, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="exclude holds token ids"):
        contrastive_select(full, drop, labels, exclude=torch.full((5, 1), 1031, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="min_sensitivity must be a finite number"):
        contrastive_select(full, drop, labels, min_sensitivity=math.nan)
    with pytest.raises(ValueError, match="must both be \\[T, V\\]"):
        contrastive_select(full, drop[:, :5], labels)
    with pytest.raises(TypeError, match="share one floating dtype"):
        contrastive_select_from_hidden(full[:, :8], drop[:, :8], torch.zeros(11, 8, dtype=torch.float64), labels % 11)


@NEEDS_TRITON_PACKAGE
def test_triton_kernels_compile_for_hopper():
    common = {"drop_row_stride": "i64", "full_row_stride": "i64", "n_cols": "i32", "span": "i32",
              "vocab_offset": "i32", "num_splits": "i32"}
    stats = {"max_full_ptr": "*fp32", "sumexp_full_ptr": "*fp32", "max_drop_ptr": "*fp32",
             "sumexp_drop_ptr": "*fp32", "top_keys_ptr": "*i64"}
    candidates = {"labels_ptr": "*i64", "exclude_ptr": "*i64", "max_full_ptr": "*fp32", "max_drop_ptr": "*fp32",
                  "kth_key_ptr": "*i64", "best_ptr": "*i64", "log_alpha": "fp32", "log_alpha_drop": "fp32",
                  "coef_full": "fp32", "coef_drop": "fp32"}
    builds = []
    for dtype in ("bf16", "fp32"):
        inputs = {"full_ptr": "*" + dtype, "drop_ptr": "*" + dtype, **common}
        builds += [("stats_kernel", {**inputs, **stats}, {"K": 8, "K_PAD": 8, "BLOCK_V": 2048}),
                   ("candidates_kernel", {**inputs, **candidates}, {"NUM_EXCLUDED": 3, "BLOCK_V": 2048})]
    assert_kernels_compile_for_hopper("hscr_fast.kernels._triton.contrastive_select", builds)
