"""Stage 1 of HSCR: token-level self-contrastive rewarding (paper §3.1, DESIGN.md Stage 1).

For a batch of samples (image, question, ground-truth answer y_w):

1. the vision tower runs once; each sample's visual tokens are also dropped (`drop_ratio`, seeded per (seed, sample
   id) by `hscr_fast.models.dropout.visual_dropout`, mode `remove` or `mask`);
2. two teacher-forced forwards score y_w, one per condition (full image, dropped image), each ONE packed forward for
   the whole batch (`hscr_fast.listwise`, one response per prompt): only the answer positions' final hidden states are
   kept, never [T, V] logits;
3. per sample, `hscr_fast.kernels.contrastive_select_from_hidden` computes s_t, the contrast, the sensitive
   positions and each position's replacement straight from the hidden states and the lm_head weight;
4. graded variants: variant m of M replaces the ⌈m·n/M⌉ most sensitive positions (n = sensitive positions found).

Content tokens. Special tokens (BOS, EOS, pad, ...) are never sensitive. Tokens whose text has no letter or digit
(whitespace, punctuation, partial UTF-8 bytes) are excluded too unless `include_punctuation=True`.

Choices made here that the paper leaves open:
- Candidates (the kernel's rule): the image-deprived top-`num_candidates` tokens that are also plausible without the
  image (p_drop(v) ≥ `alpha_drop`·max p_drop; `alpha_drop=None` means the same as `alpha`), together with the tokens
  plausible with it (p_full(v) ≥ `alpha`·max p_full), minus y_t. DESIGN.md takes the deprived top-k uncut
  (`alpha_drop=0`); on a peaked answer that lets in junk the full model rejects hardest ("yes" → "left",
  "small" → "and"), so the default cuts it (`hscr_fast.kernels.contrastive_select` explains).
- The sensitive positions are the top-n by s_t among content positions *that have a replacement candidate*. Under
  DESIGN.md's literal rule (`alpha_drop=0`, `num_candidates ≥ 1`) every position has one; with the default cut a
  position where y_t dominates both distributions has none (nothing plausible argues against the image there) and
  is passed over, as is any position when `num_candidates=0` and nothing but y_t is plausible.
- Modes of Eq. 4:
  * `parallel` (default): one pass. The replacements are all chosen from the scores of y_w itself, and variant m
    applies the first ⌈m·n/M⌉ of them.
  * `sequential` (Eq. 4 read literally): the first pass on y_w fixes n (as in parallel) and makes the first
    replacement (its most sensitive position). Each later step re-scores the *current* modified answer under both
    conditions (two batched forwards) and replaces the most sensitive position not yet replaced, with the replacement
    chosen in that pass; the recorded s_t is the one from the pass that chose the position. After n steps, variant m
    is the answer after ⌈m·n/M⌉ replacements. Cost: n + 1 pairs of forwards instead of one.
- A replacement may be a special token (EOS, when the image-deprived model would stop there). Variant text is decoded
  with special tokens skipped, so such a replacement deletes the word; a variant that becomes empty or equal to y_w
  is dropped by Stage 2.
- When n < M several variants are equal (⌈m·n/M⌉ repeats); Stage 2 collapses duplicates.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hscr_fast.listwise import ListwiseExample, answer_hidden_states, pack_examples
from hscr_fast.models.dropout import DROPOUT_MODES, VisualDropout, visual_dropout
from hscr_fast.models.prompting import PromptTokens

CONTRAST_MODES = ("parallel", "sequential")
SENSITIVITY_KINDS = ("logprob", "logit")


@dataclass(frozen=True)
class SelfContrastConfig:
    """Stage 1 settings; defaults are the paper's (DESIGN.md Stage 1)."""

    seed: int = 0
    drop_ratio: float = 0.7
    dropout_mode: str = "remove"
    sensitivity: str = "logprob"
    beta: float = 0.9
    top_n: int = 10
    alpha: float = 0.1
    alpha_drop: float | None = None  # deprived-side cut; None: = alpha; 0: DESIGN.md's literal candidate rule
    num_candidates: int = 8
    num_variants: int = 5
    mode: str = "parallel"
    include_punctuation: bool = False
    backend: str = "auto"  # of the contrastive_select kernel

    def __post_init__(self):
        if self.dropout_mode not in DROPOUT_MODES:
            raise ValueError(f"dropout_mode must be one of {DROPOUT_MODES}, got {self.dropout_mode!r}")
        if self.mode not in CONTRAST_MODES:
            raise ValueError(f"mode must be one of {CONTRAST_MODES}, got {self.mode!r}")
        if self.sensitivity not in SENSITIVITY_KINDS:
            raise ValueError(f"sensitivity must be one of {SENSITIVITY_KINDS}, got {self.sensitivity!r}")
        if not 0.0 <= self.drop_ratio < 1.0:
            raise ValueError(f"drop_ratio must be in [0, 1), got {self.drop_ratio}")
        if self.top_n < 1 or self.num_variants < 1:
            raise ValueError(f"top_n and num_variants must be >= 1, got {self.top_n} and {self.num_variants}")
        if self.num_candidates < 0 or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"need num_candidates >= 0 and alpha in [0, 1], got {self.num_candidates}, {self.alpha}")
        if self.alpha_drop is not None and not 0.0 <= self.alpha_drop <= 1.0:
            raise ValueError(f"alpha_drop must be None (= alpha) or in [0, 1] (0: DESIGN.md's literal candidate "
                             f"rule), got {self.alpha_drop}")


@dataclass
class PreparedSample:
    """A sample tokenised for scoring: the prompt around its image and y_w's tokens (EOS included)."""

    sample_id: str
    prompt: PromptTokens
    answer_ids: list[int]


@dataclass(frozen=True)
class SensitiveToken:
    """A replaced position of y_w: its index in `answer_ids`, the original and replacement token, and s_t."""

    position: int
    token_id: int
    replacement_id: int
    sensitivity: float


@dataclass
class Variant:
    """One dispreferred candidate: y_w with `replaced_positions` (in replacement order) swapped."""

    token_ids: list[int]
    replaced_positions: list[int]
    text: str


@dataclass
class SelfContrastResult:
    """Stage 1 output for one sample. `sensitive` is in replacement order (descending s_t in parallel mode);
    `variants[m-1]` replaces the first ⌈m·n/M⌉ of them. Both are empty when no position is sensitive."""

    sample_id: str
    answer_ids: list[int]
    sensitive: list[SensitiveToken] = field(default_factory=list)
    variants: list[Variant] = field(default_factory=list)


def graded_counts(num_sensitive: int, num_variants: int) -> list[int]:
    """How many positions variant m = 1..M replaces: ⌈m·n/M⌉ (Eq. 4), in exact integer arithmetic."""
    return [-(-m * num_sensitive // num_variants) for m in range(1, num_variants + 1)]


class ContentTokens:
    """Which token ids can be sensitive: never special tokens; by default only tokens whose text has a letter or digit.

    The decision is per token id (cached), from the token decoded on its own, so it works for SentencePiece ("▁left")
    and byte-level BPE ("Ġleft") vocabularies alike.
    """

    def __init__(self, tokenizer, *, include_punctuation: bool = False):
        self.tokenizer = tokenizer
        self.include_punctuation = include_punctuation
        self._special = set(tokenizer.all_special_ids)
        self._cache: dict[int, bool] = {}

    def is_content(self, token_id: int) -> bool:
        if token_id not in self._cache:
            if token_id in self._special:
                self._cache[token_id] = False
            elif self.include_punctuation:
                self._cache[token_id] = True
            else:
                text = self.tokenizer.decode([token_id])
                self._cache[token_id] = any(character.isalnum() for character in text)
        return self._cache[token_id]

    def mask(self, token_ids: list[int]) -> list[bool]:
        return [self.is_content(token) for token in token_ids]


def decode_answer(tokenizer, token_ids: list[int]) -> str:
    """Answer tokens → text as a response is stored: special tokens (EOS, or a special replacement) dropped."""
    return tokenizer.decode(token_ids, skip_special_tokens=True).strip()


def render_marked(tokenizer, token_ids: list[int], marked_positions, *, open_mark: str = "[",
                  close_mark: str = "]") -> str:
    """The answer's text with the tokens at `marked_positions` wrapped in marks, for people (`--show`).

    Each token's text is what it adds to the incremental decoding, so word boundaries stay as the tokenizer puts them;
    a leading space stays outside the marks. Special tokens show as their token string ("</s>").
    """
    marked, special = set(marked_positions), set(tokenizer.all_special_ids)
    pieces, previous = [], ""
    for index, token in enumerate(token_ids):
        if token in special:
            piece = tokenizer.convert_ids_to_tokens(token) if index in marked else ""
        else:
            current = tokenizer.decode([t for t in token_ids[:index + 1] if t not in special])
            piece = current[len(previous):] if current.startswith(previous) else tokenizer.decode([token])
            previous = current
        if index in marked:
            stripped = piece.lstrip()
            piece = piece[:len(piece) - len(stripped)] + open_mark + stripped + close_mark
        pieces.append(piece)
    return "".join(pieces).strip()


class SelfContrast:
    """Runs Stage 1 on batches of samples with one VLM.

        contrast = SelfContrast(vlm, SelfContrastConfig())
        prepared = contrast.prepare(sample_id, question, answer)
        results = contrast.run([prepared, ...], [pil_image, ...])
    """

    def __init__(self, vlm, config: SelfContrastConfig | None = None):
        self.vlm = vlm
        self.config = config or SelfContrastConfig()
        self.content = ContentTokens(vlm.tokenizer, include_punctuation=self.config.include_punctuation)

    # -- inputs -------------------------------------------------------------------------------------------------------
    def prepare(self, sample_id: str, question: str, answer: str) -> PreparedSample:
        prompt = self.vlm.prompt_tokens(question)
        return PreparedSample(str(sample_id), prompt, self.vlm.answer_tokens(prompt, answer))

    @staticmethod
    def sequence_length(sample: PreparedSample, num_visual_tokens: int) -> int:
        """Tokens of prompt (with every visual token of its image) + answer (EOS included): what must fit the model's
        positions."""
        return sample.prompt.num_text_tokens + num_visual_tokens + len(sample.answer_ids)

    def dropout_for(self, sample_id: str, num_visual_tokens: int) -> VisualDropout:
        config = self.config
        return visual_dropout(num_visual_tokens, config.drop_ratio, global_seed=config.seed, sample_id=sample_id,
                              mode=config.dropout_mode)

    # -- scoring ------------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def answer_hidden_pairs(self, samples: list[PreparedSample], answers: list[list[int]], visual_tokens,
                            layouts=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(hidden_full [T, D], hidden_drop [T, D]) per sample: the final hidden states predicting each token of
        `answers[i]`, from one packed forward per condition for the whole batch."""
        full, dropped = [], []
        for index, (sample, answer, visual) in enumerate(zip(samples, answers, visual_tokens)):
            layout = None if layouts is None else layouts[index]
            full.append(ListwiseExample(sample.prompt, [answer], visual, visual_layout=layout))
            dropout = self.dropout_for(sample.sample_id, visual.shape[0])
            kept_tokens, attendable = dropout.apply(visual)
            dropped.append(ListwiseExample(sample.prompt, [answer], kept_tokens,
                                           attendable if self.config.dropout_mode == "mask" else None,
                                           visual_layout=dropout.apply_layout(layout)))
        lengths = [len(answer) for answer in answers]
        hidden_full = answer_hidden_states(self.vlm, pack_examples(self.vlm.embed_tokens, full)).split(lengths)
        hidden_drop = answer_hidden_states(self.vlm, pack_examples(self.vlm.embed_tokens, dropped)).split(lengths)
        return list(zip(hidden_full, hidden_drop))

    @torch.inference_mode()
    def select(self, hidden_full: torch.Tensor, hidden_drop: torch.Tensor, labels: list[int],
               eligible: list[bool]):
        """The kernel's selection for one answer, ranking every eligible position (top_n = T) so callers can skip
        positions without a replacement."""
        from hscr_fast.kernels.contrastive_select import contrastive_select_from_hidden

        config = self.config
        device = hidden_full.device
        return contrastive_select_from_hidden(
            hidden_full, hidden_drop, self.vlm.lm_head_weight, torch.tensor(labels, dtype=torch.long, device=device),
            beta=config.beta, top_n=len(labels), alpha=config.alpha, alpha_drop=config.alpha_drop,
            num_candidates=config.num_candidates,
            sensitivity=config.sensitivity, content_mask=torch.tensor(eligible, dtype=torch.bool, device=device),
            backend=config.backend)

    @staticmethod
    def _ranked(selection, limit: int) -> list[tuple[int, int, float]]:
        """(position, replacement, s_t) of the `limit` most sensitive positions that have a replacement."""
        positions = selection.sensitive_positions.tolist()
        replacements = selection.replacement[selection.sensitive_positions].tolist() if positions else []
        sensitivities = selection.sensitivity[selection.sensitive_positions].tolist() if positions else []
        ranked = [(p, r, s) for p, r, s in zip(positions, replacements, sensitivities) if r >= 0]
        return ranked[:limit]

    # -- the stage ----------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, samples: list[PreparedSample], images) -> list[SelfContrastResult]:
        """Stage 1 for a batch. `images`: one per sample, in order, as PIL RGB images or as their pixel values from
        `vlm.preprocess_images` (so a loader thread can prepare the next batch)."""
        if len(samples) != len(images):
            raise ValueError(f"SelfContrast.run: {len(samples)} samples but {len(images)} images")
        if not samples:
            return []
        pixel_values = self.vlm.preprocess_images(list(images)) if isinstance(images, (list, tuple)) else images
        visual_tokens, layouts = self.vlm.encode_images(pixel_values), self.vlm.visual_layouts(pixel_values)
        answers = [list(sample.answer_ids) for sample in samples]
        content = [self.content.mask(answer) for answer in answers]
        first_pass = [self._ranked(self.select(h_full, h_drop, answer, mask), self.config.top_n)
                      for (h_full, h_drop), answer, mask
                      in zip(self.answer_hidden_pairs(samples, answers, visual_tokens, layouts), answers, content)]
        if self.config.mode == "parallel":
            chosen = first_pass
        else:
            chosen = self._sequential(samples, answers, content, visual_tokens, layouts, first_pass)
        return [self._result(sample, picks) for sample, picks in zip(samples, chosen)]

    def _sequential(self, samples, answers, content, visual_tokens, layouts, first_pass):
        """Eq. 4 literally: one replacement per pass, each pass re-scoring the answer as modified so far."""
        targets = [len(ranked) for ranked in first_pass]  # n per sample, fixed by the pass on y_w
        chosen = [ranked[:1] for ranked in first_pass]
        current = [list(answer) for answer in answers]
        for answer, picks in zip(current, chosen):
            for position, replacement, _ in picks:
                answer[position] = replacement
        while True:
            active = [i for i in range(len(samples)) if len(chosen[i]) < targets[i]]
            if not active:
                return chosen
            pairs = self.answer_hidden_pairs([samples[i] for i in active], [current[i] for i in active],
                                             [visual_tokens[i] for i in active],
                                             None if layouts is None else [layouts[i] for i in active])
            for i, (h_full, h_drop) in zip(active, pairs):
                replaced = {position for position, _, _ in chosen[i]}
                eligible = [ok and position not in replaced for position, ok in enumerate(content[i])]
                ranked = self._ranked(self.select(h_full, h_drop, current[i], eligible), 1)
                if not ranked:  # nothing replaceable is left; this sample stops with fewer replacements
                    targets[i] = len(chosen[i])
                    continue
                position, replacement, sensitivity = ranked[0]
                chosen[i].append((position, replacement, sensitivity))
                current[i][position] = replacement

    def _result(self, sample: PreparedSample, picks: list[tuple[int, int, float]]) -> SelfContrastResult:
        tokenizer = self.vlm.tokenizer
        answer = list(sample.answer_ids)
        sensitive = [SensitiveToken(position, answer[position], replacement, float(sensitivity))
                     for position, replacement, sensitivity in picks]
        variants = []
        for count in (graded_counts(len(picks), self.config.num_variants) if picks else []):
            token_ids = list(answer)
            for token in sensitive[:count]:
                token_ids[token.position] = token.replacement_id
            variants.append(Variant(token_ids, [token.position for token in sensitive[:count]],
                                    decode_answer(tokenizer, token_ids)))
        return SelfContrastResult(sample.sample_id, answer, sensitive, variants)


def num_distinct(variants: list[Variant]) -> int:
    """How many different token sequences the variants hold (when n < M some variants repeat)."""
    return len({tuple(variant.token_ids) for variant in variants})


__all__ = [
    "CONTRAST_MODES", "ContentTokens", "PreparedSample", "SelfContrast", "SelfContrastConfig", "SelfContrastResult",
    "SensitiveToken", "Variant", "decode_answer", "graded_counts", "num_distinct", "render_marked",
]
