"""`ModelWrapper`: what the text-only and the vision-language wrappers share, written once.

Both wrap a transformers model that peft may edit in place, read their device and dtype off the output head, tokenise
a prompt and its answers the same way (only how a prompt is formatted and split around the image differs), hand the
listwise forward's boolean 4D mask to eager attention as an additive one, and give the reference model by switching
LoRA off.
"""
from __future__ import annotations

import contextlib

import torch

from hscr_fast.models.prompting import PromptTokens, answer_separator, tokenize_answer, tokenize_marked_answer


class ModelWrapper:
    """Subclasses set `model`, `tokenizer` and `options` (with a `prompt_format`), and define `lm_head_weight` and
    `_tokenize_prompt(prompt)`, which formats one prompt and splits it into `PromptTokens` using `answer_separator`."""

    _answer_separator: str | None = None  # read off the prompt format on first use

    @property
    def lm_head_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return self.lm_head_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head_weight.dtype

    # -- text -------------------------------------------------------------------------------------------------------
    @property
    def answer_separator(self) -> str:
        """What the prompt format puts between a prompt and its answer (an answer is tokenised after it)."""
        if self._answer_separator is None:
            self._answer_separator = answer_separator(self.tokenizer, self.options.prompt_format)
        return self._answer_separator

    def prompt_tokens(self, prompt: str) -> PromptTokens:
        """The prompt (a question, for a vision-language model) in this checkpoint's prompt format, tokenised."""
        if self.tokenizer is None:
            raise TypeError(f"this {type(self).__name__} was built without a tokenizer; pass one to tokenise text")
        return self._tokenize_prompt(prompt)

    def _tokenize_prompt(self, prompt: str) -> PromptTokens:
        raise NotImplementedError

    def answer_tokens(self, prompt: PromptTokens, answer: str) -> list[int]:
        """Answer tokens (EOS included) exactly as the model would generate them after `prompt`."""
        return tokenize_answer(self.tokenizer, prompt, answer)

    def marked_answer_tokens(self, prompt: PromptTokens, answer: str) -> tuple[list[int], list[bool]]:
        """Answer tokens and, per token, whether it lies in a `<mask>…</mask>` span (the marks are not tokens)."""
        return tokenize_marked_answer(self.tokenizer, prompt, answer)

    # -- the reference model ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def adapter_disabled(self):
        """The reference model: the base model with every LoRA adapter switched off (a no-op without peft)."""
        if hasattr(self.model, "disable_adapter"):
            with self.model.disable_adapter():
                yield
        else:
            yield


def unwrapped(model):
    """The transformers module under peft's wrapper (the model itself without peft)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def mask_for_attention(attention_mask, dtype: torch.dtype, attn_implementation: str):
    """A 4D boolean mask (True = attend) as the decoder's attention kernel takes it: sdpa takes it as it is, and flex
    attention a BlockMask (listwise_attention.py), but eager attention adds the mask to the scores."""
    if (attn_implementation != "eager" or not isinstance(attention_mask, torch.Tensor)
            or attention_mask.dim() != 4 or attention_mask.dtype != torch.bool):
        return attention_mask
    return torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device).masked_fill(
        ~attention_mask, torch.finfo(dtype).min)
