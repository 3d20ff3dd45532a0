"""Stage 1 (`hscr_fast.preferences.selfcontrast`) on the tiny LLaVA against plain references.

The references never use the packed forward: the full-image condition runs transformers' own Llava forward on
input_ids with expanded image tokens; the dropped condition splices the kept visual tokens by hand and runs the Llava
forward on inputs_embeds. Logits are full [T, V], in float64, and the rule of Stage 1 (docs/method.md) is restated
plainly.
"""
import copy
import math

import pytest
import torch
from helpers import make_images

from hscr_fast.models.dropout import visual_dropout
from hscr_fast.models.vlm import VisionLanguageModel
from hscr_fast.preferences.selfcontrast import (
    ContentTokens,
    SelfContrast,
    SelfContrastConfig,
    graded_counts,
    num_distinct,
    render_marked,
)

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # see conftest

SAMPLES = [
    ("a", "Is there a lesion in the left lung?", "yes"),
    ("b", "Where is the abnormality?", "The right upper lobe shows a small nodule."),
    ("c", "How many lesions are there?", "two lesions, left lung"),
    ("d", "What organ is shown in this image?", "chest"),
    ("e", "Describe the image.", "A large mass in the left lower lobe with effusion, no fracture seen."),
]


# -- plain references -------------------------------------------------------------------------------------------------
def reference_logits(vlm, question, answer_ids, image, dropout=None, deprived_visual=None):
    """[T, V] float64 logits predicting each answer token, from transformers' own forward. `deprived_visual`: visual
    tokens of an encoder-level perturbation, spliced in by hand."""
    llava, tokenizer = vlm.llava, vlm.tokenizer
    prompt = vlm.prompt_tokens(question)
    pixels = vlm.preprocess_images([image])
    with torch.no_grad():
        if deprived_visual is not None:
            embed = llava.get_input_embeddings()
            before = embed(torch.tensor(prompt.before_image))
            rest = embed(torch.tensor(list(prompt.after_image) + list(answer_ids[:-1])))
            logits = llava(inputs_embeds=torch.cat([before, deprived_visual, rest])[None]).logits[0]
        elif dropout is None:
            image_ids = [llava.config.image_token_id] * vlm.num_visual_tokens
            ids = list(prompt.before_image) + image_ids + list(prompt.after_image) + list(answer_ids[:-1])
            logits = llava(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0]
        else:
            visual = vlm.encode_images(pixels)[0]
            embed = llava.get_input_embeddings()
            if dropout.mode == "remove":
                visual, mask = visual[dropout.kept], None
            before = embed(torch.tensor(prompt.before_image))
            rest = embed(torch.tensor(list(prompt.after_image) + list(answer_ids[:-1])))
            embeds = torch.cat([before, visual, rest])[None]
            if dropout.mode == "mask":
                mask = torch.ones(1, embeds.shape[1], dtype=torch.long)
                mask[0, before.shape[0]:before.shape[0] + visual.shape[0]] = dropout.kept.long()
            logits = llava(inputs_embeds=embeds, attention_mask=mask).logits[0]
    del tokenizer
    return logits[-len(answer_ids):].double()


def reference_content(tokenizer, answer_ids):
    special = set(tokenizer.all_special_ids)
    return [t not in special and any(c.isalnum() for c in tokenizer.decode([t])) for t in answer_ids]


def reference_sensitivity(logits_full, logits_drop, labels, kind="logprob"):
    rows = torch.arange(len(labels))
    labels = torch.as_tensor(labels)
    if kind == "logit":
        return logits_full[rows, labels] - logits_drop[rows, labels]
    return (logits_full.log_softmax(-1)[rows, labels] - logits_drop.log_softmax(-1)[rows, labels])


def reference_top_n(sensitivity, eligible, top_n):
    positions = [t for t in range(len(eligible)) if eligible[t]]
    return sorted(positions, key=lambda t: (-float(sensitivity[t]), t))[:top_n]


def reference_replacement(logits_full_row, logits_drop_row, label, *, beta, alpha, num_candidates,
                          replacement="pdiff-ascending-cut", excluded=()):
    """pdiff-ascending(-cut): candidates {top-k of the image-deprived distribution (with p_drop ≥ α·max p_drop for
    -cut)} ∪ {p_full ≥ α·max p_full}; the lowest P_diff = softmax((1+β)L − βL') wins. deprived-contrast(-uncut):
    candidates {top-k of the image-deprived distribution (with p_drop ≥ α·max p_drop unless -uncut)}; the highest
    (1+β)L' − βL wins. Never y_t nor an `excluded` id (special tokens)."""
    p_full, p_drop = logits_full_row.softmax(-1), logits_drop_row.softmax(-1)
    deprived_plausible = set(torch.nonzero(p_drop >= alpha * p_drop.max()).flatten().tolist())
    top = set(torch.topk(logits_drop_row, num_candidates).indices.tolist() if num_candidates else [])
    cut = replacement in ("pdiff-ascending-cut", "deprived-contrast")
    candidates = top & deprived_plausible if cut else top
    if replacement.startswith("pdiff"):
        candidates |= set(torch.nonzero(p_full >= alpha * p_full.max()).flatten().tolist())
    candidates -= {int(label), *excluded}
    if not candidates:
        return -1
    if replacement.startswith("deprived"):
        score = ((1 + beta) * logits_drop_row - beta * logits_full_row).softmax(-1)
        return min(candidates, key=lambda v: (-float(score[v]), v))
    p_diff = ((1 + beta) * logits_full_row - beta * logits_drop_row).softmax(-1)
    return min(candidates, key=lambda v: (float(p_diff[v]), v))


@pytest.fixture(scope="module")
def images():
    return make_images(len(SAMPLES), seed=3)


def run_stage1(vlm, config, samples=SAMPLES, images=None):
    contrast = SelfContrast(vlm, config)
    prepared = [contrast.prepare(sid, question, answer) for sid, question, answer in samples]
    return contrast, prepared, contrast.run(prepared, images)


# -- tests ------------------------------------------------------------------------------------------------------------
CASES = {
    "remove-logprob-cut": ("remove", "logprob", "pdiff-ascending-cut", None),
    "mask-logprob-cut": ("mask", "logprob", "pdiff-ascending-cut", None),
    "remove-logit-cut": ("remove", "logit", "pdiff-ascending-cut", None),
    "remove-logprob-uncut": ("remove", "logprob", "pdiff-ascending", None),
    "deprived-contrast": ("remove", "logprob", "deprived-contrast", None),
    "image-supported": ("remove", "logprob", "pdiff-ascending-cut", 0.0),
    "image-supported-deprived": ("mask", "logprob", "deprived-contrast", 0.0),
    "deprived-contrast-uncut": ("remove", "logprob", "deprived-contrast-uncut", 0.0),
}


@pytest.mark.parametrize("dropout_mode,sensitivity,replacement,min_sensitivity", CASES.values(), ids=CASES.keys())
def test_sensitive_positions_and_replacements_match_reference(tiny_vlm, images, dropout_mode, sensitivity,
                                                              replacement, min_sensitivity):
    config = SelfContrastConfig(seed=5, top_n=4, dropout_mode=dropout_mode, sensitivity=sensitivity,
                                replacement=replacement, min_sensitivity=min_sensitivity, num_alternatives=0)
    contrast, prepared, results = run_stage1(tiny_vlm, config, images=images)
    special = tiny_vlm.tokenizer.all_special_ids
    for (sid, question, _), sample, result, image in zip(SAMPLES, prepared, results, images):
        dropout = visual_dropout(tiny_vlm.num_visual_tokens, 0.7, global_seed=5, sample_id=sid, mode=dropout_mode)
        assert dropout.num_kept == tiny_vlm.num_visual_tokens - round(0.7 * tiny_vlm.num_visual_tokens)
        logits_full = reference_logits(tiny_vlm, question, sample.answer_ids, image)
        logits_drop = reference_logits(tiny_vlm, question, sample.answer_ids, image, dropout)
        s = reference_sensitivity(logits_full, logits_drop, sample.answer_ids, sensitivity)
        reference = [reference_replacement(logits_full[t], logits_drop[t], label, beta=config.beta,
                                           alpha=config.alpha, num_candidates=config.num_candidates,
                                           replacement=replacement, excluded=special)
                     for t, label in enumerate(sample.answer_ids)]
        # content tokens with a candidate, and (image-supported) s_t > 0
        eligible = [ok and reference[t] >= 0 and (min_sensitivity is None or s[t] > min_sensitivity)
                    for t, ok in enumerate(reference_content(tiny_vlm.tokenizer, sample.answer_ids))]
        expected = reference_top_n(s, eligible, config.top_n)
        assert [token.position for token in result.sensitive] == expected, sid
        for token in result.sensitive:
            assert token.token_id == sample.answer_ids[token.position]
            assert token.sensitivity == pytest.approx(float(s[token.position]), abs=2e-4)
            assert token.replacement_id == reference[token.position], (sid, token)
            assert token.replacement_id != token.token_id and token.replacement_id not in special
    if min_sensitivity is not None:
        assert all(token.sensitivity > 0 for result in results for token in result.sensitive)


def test_variant_m_replaces_ceil_m_n_over_M_positions(tiny_vlm, images):
    for top_n, num_variants in [(3, 5), (10, 4), (2, 2)]:
        config = SelfContrastConfig(top_n=top_n, num_variants=num_variants, min_sensitivity=None, num_alternatives=0)
        _, prepared, results = run_stage1(tiny_vlm, config, images=images)
        for sample, result in zip(prepared, results):
            n = len(result.sensitive)
            assert n == min(top_n, sum(reference_content(tiny_vlm.tokenizer, sample.answer_ids)))
            assert len(result.variants) == num_variants
            for m, variant in enumerate(result.variants, start=1):
                count = math.ceil(m * n / num_variants)
                assert variant.replaced_positions == [t.position for t in result.sensitive[:count]]
                changed = [i for i, (a, b) in enumerate(zip(sample.answer_ids, variant.token_ids)) if a != b]
                assert sorted(changed) == sorted(variant.replaced_positions)
                assert all(variant.token_ids[t.position] == t.replacement_id for t in result.sensitive[:count])
                assert variant.text == tiny_vlm.tokenizer.decode(variant.token_ids, skip_special_tokens=True).strip()
            assert num_distinct(result.variants) == len(set(graded_counts(n, num_variants)))


def test_graded_counts_is_ceiling():
    for n in range(0, 25):
        for m_total in range(1, 9):
            assert graded_counts(n, m_total) == [math.ceil(m * n / m_total) for m in range(1, m_total + 1)]


def test_sequential_mode_rescores_after_each_replacement(tiny_vlm, images):
    config = SelfContrastConfig(seed=1, top_n=3, num_variants=3, mode="sequential", min_sensitivity=None,
                                num_alternatives=0)
    _, prepared, results = run_stage1(tiny_vlm, config, images=images)
    for (sid, question, _), sample, result, image in zip(SAMPLES, prepared, results, images):
        dropout = visual_dropout(tiny_vlm.num_visual_tokens, 0.7, global_seed=1, sample_id=sid)
        eligible = reference_content(tiny_vlm.tokenizer, sample.answer_ids)
        current, expected = list(sample.answer_ids), []
        for _ in range(min(config.top_n, sum(eligible))):  # Eq. 4 literally: re-score the modified answer each step
            logits_full = reference_logits(tiny_vlm, question, current, image)
            logits_drop = reference_logits(tiny_vlm, question, current, image, dropout)
            s = reference_sensitivity(logits_full, logits_drop, current)
            replaced = {position for position, _ in expected}
            position = reference_top_n(s, [ok and t not in replaced for t, ok in enumerate(eligible)], 1)[0]
            replacement = reference_replacement(logits_full[position], logits_drop[position], current[position],
                                                beta=config.beta, alpha=config.alpha,
                                                num_candidates=config.num_candidates,
                                                replacement=config.replacement,
                                                excluded=tiny_vlm.tokenizer.all_special_ids)
            expected.append((position, replacement))
            current[position] = replacement
        assert [(t.position, t.replacement_id) for t in result.sensitive] == expected, sid
        assert result.variants[-1].token_ids == current
    # The first replacement of a sequential run is the parallel run's first one.
    _, _, parallel = run_stage1(tiny_vlm, SelfContrastConfig(seed=1, top_n=3, num_variants=3, min_sensitivity=None,
                                                                num_alternatives=0),
                                images=images)
    assert [r.sensitive[0] for r in results] == [r.sensitive[0] for r in parallel]


def test_batch_composition_does_not_change_results(tiny_vlm, images):
    config = SelfContrastConfig(top_n=5)
    _, _, together = run_stage1(tiny_vlm, config, images=images)
    for index in (0, 4):
        _, _, alone = run_stage1(tiny_vlm, config, samples=SAMPLES[index:index + 1], images=images[index:index + 1])
        assert [(t.position, t.replacement_id) for t in alone[0].sensitive] == \
               [(t.position, t.replacement_id) for t in together[index].sensitive]
        for a, b in zip(alone[0].sensitive, together[index].sensitive):
            assert a.sensitivity == pytest.approx(b.sensitivity, abs=1e-5)


def test_content_tokens_exclude_special_and_punctuation(tiny_vlm):
    tokenizer = tiny_vlm.tokenizer
    prompt = tiny_vlm.prompt_tokens("Where?")
    ids = tiny_vlm.answer_tokens(prompt, "two lesions, left lung")
    words = ContentTokens(tokenizer).mask(ids)
    assert words == reference_content(tokenizer, ids)
    pieces = [tokenizer.decode([t]) for t in ids]
    assert [p for p, ok in zip(pieces, words) if ok] == ["two", "lesions", "left", "lung"]
    everything = ContentTokens(tokenizer, include_punctuation=True).mask(ids)
    assert everything == [t not in tokenizer.all_special_ids for t in ids]
    assert not everything[-1]  # EOS is never sensitive


def test_answers_without_content_have_no_variants(tiny_vlm, images):
    _, _, results = run_stage1(tiny_vlm, SelfContrastConfig(), samples=[("p", "What?", "?!")], images=images[:1])
    assert results[0].sensitive == [] and results[0].variants == []


def test_closed_yes_answer_turns_into_no(tiny_llava, images):
    """Edit the tiny model's lm_head so that, at the answer position, "no" is plausible with the full image and what
    the model would say without it: the candidate rule must then replace "yes" by "no"."""
    model, processor = tiny_llava
    vlm = VisionLanguageModel(copy.deepcopy(model), processor)
    tokenizer = vlm.tokenizer
    yes, no = (tokenizer(" " + word, add_special_tokens=False)["input_ids"][0] for word in ("yes", "no"))
    config = SelfContrastConfig(top_n=1, num_variants=1)
    contrast = SelfContrast(vlm, config)
    sample = contrast.prepare("closed", "Is there a lesion in the left lung?", "yes")
    assert sample.answer_ids == [yes, tokenizer.eos_token_id]
    visual = vlm.encode_images(vlm.preprocess_images(images[:1]))
    (h_full, h_drop), = contrast.answer_hidden_pairs([sample], [sample.answer_ids], visual)
    weight = vlm.lm_head_weight
    with torch.no_grad():
        full_logits, drop_logits = weight @ h_full[0], weight @ h_drop[0]
        # w_no · h_full = max full logit − 0.5 (plausible), w_no · h_drop = max dropped logit + 8 (the dropped image's
        # favourite): the least-norm solution of these two linear equations.
        hidden = torch.stack([h_full[0], h_drop[0]])
        targets = torch.stack([full_logits.max() - 0.5, drop_logits.max() + 8.0])
        weight[no] = torch.linalg.lstsq(hidden.double(), targets.double()[:, None]).solution[:, 0].float()
    result = contrast.run([sample], images[:1])[0]
    assert [(t.position, t.token_id, t.replacement_id) for t in result.sensitive] == [(0, yes, no)]
    assert result.sensitive[0].sensitivity > 2  # without the image "yes" lost most of its probability
    assert [variant.text for variant in result.variants] == ["no"]
    # The plain rule agrees on the edited model.
    logits_full = reference_logits(vlm, "Is there a lesion in the left lung?", sample.answer_ids, images[0])
    dropout = contrast.dropout_for("closed", vlm.num_visual_tokens)
    logits_drop = reference_logits(vlm, "Is there a lesion in the left lung?", sample.answer_ids, images[0], dropout)
    for rule in ("pdiff-ascending-cut", "deprived-contrast-uncut"):
        assert reference_replacement(logits_full[0], logits_drop[0], yes, beta=0.9, alpha=0.1, num_candidates=8,
                                     replacement=rule) == no


def test_confident_model_replacements_obey_candidate_rule(tiny_llava, images):
    """The regime of a trained model: y_t is the top token with and without the image, so the candidates are the
    image-deprived top-k minus y_t under the paper's literal rule (alpha_drop=0; the random tiny model's flat rows
    rarely test this). The lm_head rows of the answer tokens are solved exactly so that, at every answer position and
    in both conditions, the label's logit is the old row maximum + 4 and every other answer token's logit is that
    maximum − 1. Under the default deprived-side cut (p_drop ≥ 0.1·max p_drop) nothing but y_t is plausible in either
    condition (e^-4 < 0.1), so no position has a candidate and the answer gets no variants."""
    model, processor = tiny_llava
    vlm = VisionLanguageModel(copy.deepcopy(model), processor)
    config = SelfContrastConfig(seed=2, top_n=10, replacement="pdiff-ascending", min_sensitivity=None)
    contrast = SelfContrast(vlm, config)
    samples, images = SAMPLES[:3], images[:3]  # 17 answer positions × 2 conditions ≤ 64 unknowns per row
    prepared = [contrast.prepare(sid, question, answer) for sid, question, answer in samples]
    visual = vlm.encode_images(vlm.preprocess_images(images))
    pairs = contrast.answer_hidden_pairs(prepared, [p.answer_ids for p in prepared], visual)
    weight = vlm.lm_head_weight
    with torch.no_grad():
        points = [(hidden, label) for sample, (h_full, h_drop) in zip(prepared, pairs)
                  for t, label in enumerate(sample.answer_ids) for hidden in (h_full[t], h_drop[t])]
        hidden = torch.stack([h for h, _ in points]).double()
        row_max = (hidden @ weight.double().T).max(-1).values
        assert hidden.shape[0] <= hidden.shape[1]
        for token in {label for _, label in points}:
            targets = torch.stack([row_max[i] + (4.0 if label == token else -1.0)
                                   for i, (_, label) in enumerate(points)])
            weight[token] = torch.linalg.lstsq(hidden, targets[:, None]).solution[:, 0].float()
    results = contrast.run(prepared, images)
    for (sid, question, _), sample, result, image in zip(samples, prepared, results, images):
        logits_full = reference_logits(vlm, question, sample.answer_ids, image)
        logits_drop = reference_logits(vlm, question, sample.answer_ids, image,
                                       contrast.dropout_for(sid, vlm.num_visual_tokens))
        labels = torch.tensor(sample.answer_ids)
        assert (logits_full.argmax(-1) == labels).all() and (logits_drop.argmax(-1) == labels).all()
        s = reference_sensitivity(logits_full, logits_drop, sample.answer_ids)
        eligible = reference_content(vlm.tokenizer, sample.answer_ids)
        assert [t.position for t in result.sensitive] == reference_top_n(s, eligible, config.top_n)
        for token in result.sensitive:
            assert token.replacement_id == reference_replacement(
                logits_full[token.position], logits_drop[token.position], token.token_id, beta=config.beta,
                alpha=config.alpha, num_candidates=config.num_candidates, replacement="pdiff-ascending"), (sid, token)
        assert all(reference_replacement(logits_full[t], logits_drop[t], label, beta=config.beta, alpha=config.alpha,
                                         num_candidates=config.num_candidates) == -1
                   for t, label in enumerate(sample.answer_ids))
    default_cut = SelfContrast(vlm, SelfContrastConfig(seed=2, top_n=10, replacement="pdiff-ascending-cut",
                                                       min_sensitivity=None)).run(prepared, images)
    assert all(result.sensitive == [] and result.variants == [] for result in default_cut)


def test_render_marked(tiny_vlm):
    tokenizer = tiny_vlm.tokenizer
    prompt = tiny_vlm.prompt_tokens("Where?")
    ids = tiny_vlm.answer_tokens(prompt, "two lesions, left lung")
    assert render_marked(tokenizer, ids, [0, 3]) == "[two] lesions, [left] lung"
    assert render_marked(tokenizer, ids, []) == "two lesions, left lung"


def test_replacement_rule_and_threshold_reach_the_kernel(tiny_vlm, images, monkeypatch):
    """Each named rule is the kernel's (rule, alpha_drop); min_sensitivity and the special tokens go with it."""
    import importlib

    # the module, not the function hscr_fast.kernels re-exports under the same name
    kernel_module = importlib.import_module("hscr_fast.kernels.contrastive_select")
    seen = []
    kernel = kernel_module.contrastive_select_from_hidden

    def recording_kernel(*args, **kwargs):
        seen.append((kwargs["rule"], kwargs["alpha_drop"], kwargs["min_sensitivity"],
                     set(kwargs["exclude"].flatten().tolist())))
        return kernel(*args, **kwargs)

    monkeypatch.setattr(kernel_module, "contrastive_select_from_hidden", recording_kernel)
    special = set(tiny_vlm.tokenizer.all_special_ids)
    for replacement, rule, alpha_drop in (("pdiff-ascending", "pdiff", 0.0), ("pdiff-ascending-cut", "pdiff", None),
                                          ("deprived-contrast", "deprived", None),
                                          ("deprived-contrast-uncut", "deprived", 0.0)):
        seen.clear()
        run_stage1(tiny_vlm, SelfContrastConfig(replacement=replacement, min_sensitivity=0.5, num_alternatives=0),
                   samples=SAMPLES[:2], images=images[:2])
        assert seen and {(r, a, m) for r, a, m, _ in seen} == {(rule, alpha_drop, 0.5)}
        assert all(special <= excluded for *_, excluded in seen)


def test_short_answers_get_next_best_single_swaps(tiny_vlm, images):
    """n < M: after the cumulative variants, single swaps by the 2nd-, then 3rd-best replacement at each sensitive
    position, each the plain rule's choice once the better ones are excluded."""
    config = SelfContrastConfig(seed=4, top_n=2, num_variants=5, num_alternatives=2, min_sensitivity=None)
    contrast, prepared, results = run_stage1(tiny_vlm, config, images=images)
    special = tiny_vlm.tokenizer.all_special_ids
    checked = 0
    for (sid, question, _), sample, result, image in zip(SAMPLES, prepared, results, images):
        logits_full = reference_logits(tiny_vlm, question, sample.answer_ids, image)
        logits_drop = reference_logits(tiny_vlm, question, sample.answer_ids, image,
                                       contrast.dropout_for(sid, tiny_vlm.num_visual_tokens))
        cumulative = [variant for variant in result.variants if variant.alternative == 0]
        assert len(cumulative) == config.num_variants
        for token in result.sensitive:
            taken = [token.replacement_id]
            for alternative in token.alternative_ids:
                expected = reference_replacement(logits_full[token.position], logits_drop[token.position],
                                                 token.token_id, beta=config.beta, alpha=config.alpha,
                                                 num_candidates=config.num_candidates, excluded=[*special, *taken],
                                                 replacement=config.replacement)
                assert alternative == expected, (sid, token)
                taken.append(alternative)
                checked += 1
        singles = [variant for variant in result.variants if variant.alternative]
        expected_singles = []
        for rank in (1, 2):
            for token in result.sensitive:
                if len(token.alternative_ids) >= rank:
                    ids = list(sample.answer_ids)
                    ids[token.position] = token.alternative_ids[rank - 1]
                    expected_singles.append(ids)
        distinct_cumulative = num_distinct(cumulative)
        assert [variant.token_ids for variant in singles] == \
            expected_singles[:config.num_variants - distinct_cumulative]
        assert num_distinct(result.variants) == len(result.variants) - (len(cumulative) - distinct_cumulative)
    assert checked >= 6


def test_patch_perturbation_scores_the_deprived_condition_with_the_kept_patches(tiny_vlm, images):
    from hscr_fast.models.perturbation import ImagePerturbation

    config = SelfContrastConfig(seed=6, top_n=3, perturbation="patch", min_sensitivity=None, num_alternatives=0)
    contrast, prepared, results = run_stage1(tiny_vlm, config, samples=SAMPLES[:3], images=images[:3])
    pixels = tiny_vlm.preprocess_images(images[:3])
    deprived = ImagePerturbation(tiny_vlm, "patch", drop_ratio=0.7, global_seed=6)(pixels, ["a", "b", "c"])
    for (_sid, question, _), sample, result, image, visual in zip(SAMPLES, prepared, results, images, deprived):
        assert visual.shape[0] == tiny_vlm.num_visual_tokens - round(0.7 * tiny_vlm.num_visual_tokens)
        logits_full = reference_logits(tiny_vlm, question, sample.answer_ids, image)
        logits_drop = reference_logits(tiny_vlm, question, sample.answer_ids, image, deprived_visual=visual)
        s = reference_sensitivity(logits_full, logits_drop, sample.answer_ids)
        for token in result.sensitive:
            assert token.sensitivity == pytest.approx(float(s[token.position]), abs=2e-4)


def test_config_rejects_bad_values():
    for bad in [dict(mode="both"), dict(dropout_mode="zero"), dict(sensitivity="prob"), dict(drop_ratio=1.0),
                dict(top_n=0), dict(num_variants=0), dict(alpha=2.0), dict(num_candidates=-1),
                dict(replacement="lowest"), dict(perturbation="noise"), dict(num_alternatives=-1)]:
        with pytest.raises(ValueError):
            SelfContrastConfig(**bad)
