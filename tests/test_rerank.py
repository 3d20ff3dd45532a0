"""Stage 2 re-ranking: the selection rule (hand and random cases vs an independent implementation), candidate
filtering, model resolution, and real embeddings from the bundled all-MiniLM-L6-v2 (loaded once per session)."""
import random

import numpy as np
import pytest

from hscr_fast.preferences.rerank import (
    BUNDLED_MODEL_NAME,
    RerankResult,
    SentenceSimilarity,
    bundled_model_path,
    rerank,
    rerank_batch,
    resolve_model_source,
    select_dispreferred,
)


def reference_selection(similarities, num_dispreferred, min_gap):
    """The rule restated: each next kept variant is the most similar one at least min_gap below the last kept."""
    values = np.asarray(similarities, dtype=float)
    kept = []
    eligible = np.ones(len(values), dtype=bool)
    while eligible.any() and len(kept) < num_dispreferred:
        # Highest similarity among eligible; np.argmax returns the first (lowest index) of a tie.
        choice = int(np.argmax(np.where(eligible, values, -np.inf)))
        kept.append(choice)
        eligible &= values[choice] - values >= min_gap
        eligible[choice] = False  # with min_gap 0 it would otherwise stay eligible
    return kept


# ---------------------------------------------------------------------------------------------- the selection rule


@pytest.mark.parametrize(
    "similarities,num_dispreferred,min_gap,expected",
    [
        ([0.95, 0.90, 0.80, 0.70, 0.50], 3, 0.1, [0, 2, 3]),  # 0.90 is only 0.05 below 0.95
        ([0.50, 0.95, 0.70, 0.90, 0.80], 3, 0.1, [1, 4, 2]),  # order of input does not matter
        ([0.9, 0.85, 0.84, 0.83], 3, 0.1, [0]),  # everything too close to the top: k = 1
        ([0.9, 0.7, 0.5, 0.3, 0.1], 3, 0.1, [0, 1, 2]),  # stop at j
        ([0.9, 0.7, 0.5, 0.3, 0.1], 5, 0.1, [0, 1, 2, 3, 4]),
        ([0.8, 0.8, 0.6], 3, 0.1, [0, 2]),  # a tie: lower index wins, its twin is 0 below it
        ([0.8, 0.8, 0.6], 3, 0.0, [0, 1, 2]),  # min_gap 0 keeps ties
        ([0.7], 3, 0.1, [0]),
        ([], 3, 0.1, []),
        ([0.5, 0.375, -0.25], 3, 0.125, [0, 1, 2]),  # negative cosine is fine
        ([1.0, 0.5, 0.0], 3, 0.5, [0, 1, 2]),  # a gap of exactly min_gap is enough
    ],
)
def test_selection_hand_cases(similarities, num_dispreferred, min_gap, expected):
    assert select_dispreferred(similarities, num_dispreferred=num_dispreferred, min_gap=min_gap) == expected


@pytest.mark.parametrize("seed", range(200))
def test_selection_random_cases_match_reference(seed):
    rng = random.Random(seed)
    count = rng.randint(0, 8)
    # Rounded values make exact ties and exact gaps common.
    similarities = [round(rng.uniform(-0.2, 1.0), rng.choice([1, 2, 6])) for _ in range(count)]
    num_dispreferred = rng.randint(1, 5)
    min_gap = rng.choice([0.0, 0.05, 0.1, 0.25])
    kept = select_dispreferred(similarities, num_dispreferred=num_dispreferred, min_gap=min_gap)
    assert kept == reference_selection(similarities, num_dispreferred, min_gap)
    assert len(kept) <= num_dispreferred and len(set(kept)) == len(kept)
    assert all(similarities[a] - similarities[b] >= min_gap for a, b in zip(kept, kept[1:]))
    if similarities:
        assert similarities[kept[0]] == max(similarities)


def test_selection_rejects_bad_arguments():
    with pytest.raises(ValueError, match="finite; variants \\[1\\]"):
        select_dispreferred([0.5, float("nan")])
    with pytest.raises(ValueError, match="num_dispreferred"):
        select_dispreferred([0.5], num_dispreferred=0)
    with pytest.raises(ValueError, match="min_gap"):
        select_dispreferred([0.5], min_gap=-0.1)


# ------------------------------------------------------------------------------- candidate filtering, no model


class TableSimilarity:
    """A stand-in embedding model: similarities from a table, and a record of what it was asked."""

    def __init__(self, table):
        self.table = table
        self.calls = []

    def similarities(self, preferred, variants):
        self.calls.append((list(preferred), [list(v) for v in variants]))
        return [[self.table[(answer, text)] for text in texts] for answer, texts in zip(preferred, variants)]


def test_identical_duplicate_and_empty_variants_are_not_dispreferred():
    table = {("No effusion.", "Small effusion."): 0.6, ("No effusion.", "Large effusion."): 0.45}
    model = TableSimilarity(table)
    variants = ["No effusion.", "  no  EFFUSION. ", "Small effusion.", "small effusion.", "", "Large effusion."]
    result = rerank("No effusion.", variants, model, num_dispreferred=3, min_gap=0.1)
    assert result == RerankResult(["Small effusion.", "Large effusion."], [0.6, 0.45], [2, 5], None)
    # Only the distinct candidates reach the model.
    assert model.calls == [(["No effusion."], [["Small effusion.", "Large effusion."]])]


def test_samples_with_nothing_to_keep_get_a_skip_reason_and_cost_no_encoding():
    model = TableSimilarity({("yes", "no"): 0.3})
    results = rerank_batch(["yes", "Yes", "  ", "yes"], [["no"], ["yes", " YES"], ["no"], []], model)
    assert results[0].kept_texts == ["no"] and results[0].skip_reason is None
    assert [r.skip_reason for r in results[1:]] == [
        "no_variant_differs_from_preferred", "empty_preferred_answer", "no_variants"]
    assert all(r.kept_texts == [] and r.kept_variant_indices == [] for r in results[1:])
    assert len(model.calls) == 1 and model.calls[0][0] == ["yes"]


def test_rerank_batch_validates_before_encoding():
    model = TableSimilarity({})
    with pytest.raises(ValueError, match="2 preferred answers but 1"):
        rerank_batch(["a", "b"], [["c"]], model)
    with pytest.raises(TypeError, match="sample 0"):
        rerank_batch(["a"], ["not a list"], model)
    with pytest.raises(ValueError, match="min_gap"):
        rerank_batch(["a"], [["b"]], model, min_gap=-1)
    assert model.calls == []


# ------------------------------------------------------------------------------------------- model resolution


def test_model_resolution_without_loading(tmp_path):
    bundled = bundled_model_path()
    assert (bundled / "modules.json").is_file() and (bundled / "model.safetensors").is_file()
    assert resolve_model_source(None) == str(bundled)
    assert resolve_model_source(BUNDLED_MODEL_NAME) == str(bundled)
    assert resolve_model_source(str(bundled)) == str(bundled)
    assert resolve_model_source("someone/some-sentence-model") == "someone/some-sentence-model"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_source(str(tmp_path / "missing_model"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_source(tmp_path / "missing_model")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="is a file"):
        resolve_model_source(str(tmp_path / "weights.bin"))


def test_unknown_hub_name_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="(?s)not a local directory.*Hugging Face Hub.*bundled"):
        SentenceSimilarity("hscr-fast-tests/no-such-sentence-model")


# --------------------------------------------------------------------------------------------- real embeddings


@pytest.fixture(scope="session")
def minilm():
    return SentenceSimilarity(device="cpu")


def test_bundled_model_embeddings_are_unit_vectors(minilm):
    embeddings = minilm.embed(["The heart is enlarged.", "yes"])
    assert embeddings.shape == (2, 384)
    np.testing.assert_allclose(embeddings.norm(dim=1).numpy(), 1.0, atol=1e-5)


def test_paraphrase_scores_higher_than_unrelated(minilm):
    (scores,) = minilm.similarities(
        ["There is no pneumothorax."],
        [["No pneumothorax is seen.", "The patient enjoys playing the guitar.", "There is no pneumothorax."]])
    paraphrase, unrelated, identical = scores
    assert paraphrase > 0.8 > 0.2 > unrelated
    assert identical == pytest.approx(1.0, abs=1e-5)


def test_batched_similarities_equal_one_sample_at_a_time(minilm):
    preferred = ["The lesion is in the left lower lobe.", "yes", "The liver appears normal."]
    variants = [
        ["The lesion is in the right lower lobe.", "The lesion is in the right upper lobe.", "no"],
        ["no", "yes, there is"],
        ["The liver appears enlarged.", "The kidney appears enlarged.", "The spleen is absent.", "yes"],
    ]
    batched = minilm.similarities(preferred, variants)
    for answer, sample_variants, batch_scores in zip(preferred, variants, batched):
        (single,) = minilm.similarities([answer], [sample_variants])
        np.testing.assert_allclose(batch_scores, single, atol=1e-5)


def test_rerank_with_real_embeddings_obeys_the_rule(minilm):
    preferred = ["The mass is located in the left lung.", "The heart size is normal.", "yes"]
    variants = [
        ["The mass is located in the right lung.", "The mass is located in the right liver.",
         "A mass is located in the left lung.", "The cat is located in the right kitchen.",
         "The mass is located in the left lung."],
        ["The heart size is enlarged.", "The brain size is enlarged.", "The heart size is normal!"],
        ["no", "yes"],
    ]
    results = rerank_batch(preferred, variants, minilm, num_dispreferred=3, min_gap=0.1)
    for answer, sample_variants, result in zip(preferred, variants, results):
        assert result.skip_reason is None
        assert 1 <= len(result.kept_texts) <= 3
        assert result.kept_texts == [sample_variants[i] for i in result.kept_variant_indices]
        assert answer not in result.kept_texts
        gaps = np.diff(result.kept_similarities)
        assert np.all(-gaps >= 0.1), result
        # The kept similarities are the true cosine to y_w, and the top one is the most similar distinct variant.
        (scores,) = minilm.similarities([answer], [[sample_variants[i] for i in result.kept_variant_indices]])
        np.testing.assert_allclose(result.kept_similarities, scores, atol=1e-5)
    # "... normal!" differs from y_w only by punctuation, so it is a legitimate (if weak) variant; the exact copy
    # of y_w (index 4 of sample 0, index 1 of sample 2) never is.
    assert 4 not in results[0].kept_variant_indices
    assert results[2].kept_texts == ["no"]
