"""Prompt formats and tokenisation, as LLaVA trains and evaluates.

A prompt holds exactly one image placeholder. Like LLaVA's `tokenizer_image_token`, the text is split at the
placeholder and each chunk is tokenised on its own (BOS only on the first); the visual tokens are spliced in between
at embedding time, so the placeholder never needs an embedding and any number of visual tokens fits (visual token
dropout in `remove` mode shortens the sequence).

The answer is tokenised as a continuation of the text after the image, then EOS is appended, so the tokens the model
is scored on are exactly the tokens it would generate. What separates the prompt from the answer is the format's own:
a space after LLaVA's "ASSISTANT:", and for a chat template whatever the template itself puts between the generation
prompt and the assistant's text (nothing after Qwen's "assistant\n", a space after Mistral's "[/INST]"). That is read
off the template by rendering a conversation with a sentinel answer (`answer_separator`).
"""
from __future__ import annotations

from dataclasses import dataclass

IMAGE_PLACEHOLDER = "<image>"
# LLaVA's `conv_vicuna_v1`, the conversation format LLaVA-Med v1.5's Med-VQA evaluation uses.
VICUNA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the human's questions.")
PROMPT_FORMATS = ("llava-med", "chat-template")
# Text-only models: the tokenizer's chat template, or the prompt text as given.
TEXT_PROMPT_FORMATS = ("chat-template", "plain")
# Marks around the clinical span of a minimally edited response (token-level alignment); never shown to the model.
MARK_OPEN, MARK_CLOSE = "<mask>", "</mask>"


@dataclass(frozen=True)
class PromptTokens:
    """A tokenised prompt: text before the image (with BOS) and after it (up to where the answer starts)."""

    before_image: tuple[int, ...]
    after_image: tuple[int, ...]
    text: str
    answer_separator: str = " "  # the text the format puts between the prompt and the answer

    @property
    def num_text_tokens(self) -> int:
        return len(self.before_image) + len(self.after_image)


def strip_image_tag(question: str) -> str:
    """The question text without LLaVA's `<image>` tag and the newline that follows it."""
    return question.replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "").strip()


def format_prompt(question: str, tokenizer, prompt_format: str = "llava-med",
                  image_markup: str = IMAGE_PLACEHOLDER + "\n") -> str:
    """The full prompt text with one `<image>` placeholder, ending where the assistant's answer begins.
    `image_markup` is how the image precedes the question (Qwen2-VL: `<|vision_start|><image><|vision_end|>`)."""
    question = strip_image_tag(question)
    if prompt_format == "llava-med":
        return f"{VICUNA_V1_SYSTEM} USER: {image_markup}{question} ASSISTANT:"
    if prompt_format == "chat-template":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt format 'chat-template' needs a tokenizer with a chat_template; this tokenizer "
                             "has none: set \"prompt_format\": \"llava-med\" in the model directory's hscr_fast.json")
        messages = [{"role": "user", "content": f"{image_markup}{question}"}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    raise ValueError(f"unknown prompt format {prompt_format!r}; expected one of {PROMPT_FORMATS}")


_SENTINEL_ANSWER = "HSCRSENTINELANSWER"


def answer_separator(tokenizer, prompt_format: str = "llava-med") -> str:
    """The text between the end of a prompt and the start of its answer in this format (see the module docstring)."""
    if prompt_format != "chat-template":
        return " "
    question = [{"role": "user", "content": "Q"}]
    prompt = tokenizer.apply_chat_template(question, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(question + [{"role": "assistant", "content": _SENTINEL_ANSWER}],
                                         tokenize=False)
    if not full.startswith(prompt) or _SENTINEL_ANSWER not in full[len(prompt):]:
        raise ValueError("this chat template does not render an assistant answer as a continuation of its "
                         "generation prompt: set \"prompt_format\": \"llava-med\" in the model directory's "
                         "hscr_fast.json, or give the tokenizer a template that does")
    return full[len(prompt):].split(_SENTINEL_ANSWER)[0]


def _encode(tokenizer, text: str, *, with_bos: bool) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if with_bos and bos is not None and not (ids and ids[0] == bos):
        ids = [bos] + ids
    return ids


def tokenize_prompt(tokenizer, prompt_text: str, answer_separator: str = " ") -> PromptTokens:
    before, sep, after = prompt_text.partition(IMAGE_PLACEHOLDER)
    if not sep or IMAGE_PLACEHOLDER in after:
        raise ValueError(f"a prompt must contain exactly one {IMAGE_PLACEHOLDER} placeholder: {prompt_text!r}")
    # The template may already spell out BOS as text (chat templates often do); never add a second one.
    bos_text = tokenizer.bos_token or ""
    has_bos_text = bool(bos_text) and before.startswith(bos_text)
    return PromptTokens(tuple(_encode(tokenizer, before, with_bos=not has_bos_text)),
                        tuple(_encode(tokenizer, after, with_bos=False)), prompt_text, answer_separator)


def format_text_prompt(prompt: str, tokenizer, prompt_format: str) -> str:
    """A text-only prompt as the model sees it: the user turn of the tokenizer's chat template followed by its
    generation prompt ("chat-template"), or the text as given ("plain")."""
    if prompt_format == "chat-template":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt format 'chat-template' needs a tokenizer with a chat_template; this tokenizer has "
                             "none: use the 'plain' prompt format")
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
    if prompt_format == "plain":
        return prompt
    raise ValueError(f"unknown text prompt format {prompt_format!r}; expected one of {TEXT_PROMPT_FORMATS}")


def tokenize_text_prompt(tokenizer, prompt_text: str, answer_separator: str = " ") -> PromptTokens:
    """A prompt without an image, in the same two parts as an image prompt so that one packing serves both: BOS (when
    the tokenizer has one) before the absent image, the rest of the prompt after it. A BOS the text already spells
    out (chat templates often do) is not added twice."""
    if IMAGE_PLACEHOLDER in prompt_text:
        raise ValueError(f"a text-only prompt cannot hold the image placeholder {IMAGE_PLACEHOLDER}: {prompt_text!r}")
    rest = _without_bos_text(tokenizer, prompt_text)
    before = (tokenizer.bos_token_id,) if tokenizer.bos_token_id is not None else ()
    return PromptTokens(before, tuple(_encode(tokenizer, rest, with_bos=False)), prompt_text, answer_separator)


def _without_bos_text(tokenizer, text: str) -> str:
    bos_text = tokenizer.bos_token or ""
    return text[len(bos_text):] if bos_text and text.startswith(bos_text) else text


def _continued_text(tokenizer, prompt: PromptTokens) -> str:
    """The prompt text whose tokens are `prompt.after_image`: what an answer is tokenised as a continuation of."""
    _before, placeholder, after = prompt.text.partition(IMAGE_PLACEHOLDER)
    return after if placeholder else _without_bos_text(tokenizer, prompt.text)


def tokenize_answer(tokenizer, prompt: PromptTokens, answer: str, *, add_eos: bool = True) -> list[int]:
    """Answer tokens as a continuation of the prompt text after the image, plus EOS.

    Tokenising `after + separator + answer` and removing the prompt's own tokens keeps the word-initial marker the
    model saw in training ("▁yes", not "yes", after LLaVA's "ASSISTANT:"). If the tokenizer merged across the
    boundary, the split falls back to character offsets.
    """
    return tokenize_marked_answer(tokenizer, prompt, answer, add_eos=add_eos)[0]


def split_marked_spans(text: str) -> tuple[str, list[tuple[int, int]]]:
    """"a <mask>left</mask> lobe" → ("a left lobe", [(2, 6)]): the text without marks and the marked character
    spans in it. Unbalanced or nested marks raise ValueError."""
    clean, spans, cursor, start = [], [], 0, None
    length = 0
    while cursor < len(text):
        if text.startswith(MARK_OPEN, cursor):
            if start is not None:
                raise ValueError(f"nested {MARK_OPEN} in {text!r}")
            start, cursor = length, cursor + len(MARK_OPEN)
        elif text.startswith(MARK_CLOSE, cursor):
            if start is None:
                raise ValueError(f"{MARK_CLOSE} without {MARK_OPEN} in {text!r}")
            spans.append((start, length))
            start, cursor = None, cursor + len(MARK_CLOSE)
        else:
            clean.append(text[cursor])
            length, cursor = length + 1, cursor + 1
    if start is not None:
        raise ValueError(f"{MARK_OPEN} without {MARK_CLOSE} in {text!r}")
    return "".join(clean), spans


def tokenize_marked_answer(tokenizer, prompt: PromptTokens, answer: str, *,
                           add_eos: bool = True) -> tuple[list[int], list[bool]]:
    """Like `tokenize_answer` for an answer that may hold `<mask>…</mask>` marks: (token ids, per-token flag that
    the token overlaps a marked span). The marks are removed before tokenising; EOS is never marked."""
    clean, spans = split_marked_spans(answer)
    lead = len(clean) - len(clean.lstrip())
    clean = clean.strip()
    after_text = _continued_text(tokenizer, prompt)
    separator = prompt.answer_separator
    base = len(after_text) + len(separator) - lead  # offset of the answer's first character in the continuation
    encoded = tokenizer(after_text + separator + clean, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    n_prompt = len(prompt.after_image)
    keep = range(n_prompt, len(ids)) if list(ids[:n_prompt]) == list(prompt.after_image) else \
        [i for i, (start, _end) in enumerate(offsets) if start >= len(after_text)]
    answer_ids = [ids[i] for i in keep]
    flags = [any(offsets[i][0] < base + end and offsets[i][1] > base + start for start, end in spans) for i in keep]
    if add_eos:
        answer_ids.append(tokenizer.eos_token_id)
        flags.append(False)
    return answer_ids, flags
