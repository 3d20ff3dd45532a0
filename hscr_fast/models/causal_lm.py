"""`CausalLanguageModel`: a text-only transformers causal language model (Llama, Mistral, Qwen2 and the like, as
`AutoModelForCausalLM` loads them) behind the same small interface as `VisionLanguageModel`, so that the listwise
forward, the reference cache and the trainer serve both with one code path. A text-only prompt is a prefix without
visual tokens.

- `prompt_tokens(prompt)` / `answer_tokens(prompt_tokens, answer)`: the prompt in the tokenizer's chat template when
  it has one (else as given), and each answer as the continuation the model would generate, EOS included;
- `embed_tokens(ids)`, `decoder_hidden_states(inputs_embeds, attention_mask, position_ids)` (final hidden states,
  never logits) and `lm_head_weight` [V, D]: what the listwise forward needs;
- `adapter_disabled()`: the reference model when peft's LoRA is attached.

`as_listwise_model(model)` wraps a stock transformers model on the fly, so `listwise_logprobs(model, batch)` takes one
as it is; `text_example(tokenizer, prompt, responses)` tokenises one ranked list into a `ListwiseExample`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from hscr_fast.models.prompting import (
    TEXT_PROMPT_FORMATS,
    PromptTokens,
    format_text_prompt,
    tokenize_text_prompt,
)
from hscr_fast.models.wrapper import ModelWrapper, mask_for_attention, unwrapped
from hscr_fast.runtime.errors import HscrError
from hscr_fast.runtime.io import read_json_file

SIDECAR_NAME = "hscr_fast.json"


class UnsupportedTextModelError(HscrError):
    pass


@dataclass
class TextModelOptions:
    """Per-checkpoint choices transformers' config does not record (in `hscr_fast.json` beside the weights)."""

    prompt_format: str | None = None  # None: "chat-template" when the tokenizer has one, else "plain"

    @classmethod
    def read(cls, model_dir: Path) -> "TextModelOptions":
        path = Path(model_dir) / SIDECAR_NAME
        if not path.is_file():
            return cls()
        values = read_json_file(path, UnsupportedTextModelError)
        if not isinstance(values, dict) or set(values) - {"prompt_format"}:
            raise UnsupportedTextModelError(f"{path}: a text-only model's options are {{\"prompt_format\": one of "
                                            f"{list(TEXT_PROMPT_FORMATS)}}}, got {values!r}")
        options = cls(**values)
        if options.prompt_format not in (None, *TEXT_PROMPT_FORMATS):
            raise UnsupportedTextModelError(f"{path}: unknown prompt_format {options.prompt_format!r}; expected one "
                                            f"of {list(TEXT_PROMPT_FORMATS)}")
        return options

    def write(self, model_dir: Path) -> None:
        (Path(model_dir) / SIDECAR_NAME).write_text(json.dumps(self.__dict__, indent=2) + "\n")


class CausalLanguageModel(ModelWrapper):
    def __init__(self, model, tokenizer=None, options: TextModelOptions | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.processor = tokenizer  # what a merged checkpoint saves beside the weights
        self.options = options or TextModelOptions()
        if self.options.prompt_format is None and tokenizer is not None:
            self.options.prompt_format = "chat-template" if getattr(tokenizer, "chat_template", None) else "plain"

    # -- the underlying modules (looked up on every call, so peft's in-place edits are seen) -----------------------
    @property
    def base_model(self):
        """The `...ForCausalLM` module, also when wrapped by peft."""
        return unwrapped(self.model)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.base_model.get_output_embeddings().weight

    @property
    def config(self):
        return self.base_model.config

    @property
    def family(self) -> str:
        return self.config.model_type

    def _tokenize_prompt(self, prompt: str) -> PromptTokens:
        text = format_text_prompt(prompt, self.tokenizer, self.options.prompt_format)
        return tokenize_text_prompt(self.tokenizer, text, self.answer_separator)

    # -- the pieces of the listwise forward -------------------------------------------------------------------------
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.base_model.get_input_embeddings()(input_ids.to(self.device))

    def decoder_hidden_states(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                              position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states [B, L, D] (after the decoder's last norm); a 4D bool mask (True = attend) goes to the
        attention kernel as it is, which is how the listwise forward gives each response its own view."""
        attention_mask = mask_for_attention(attention_mask, inputs_embeds.dtype, self.config._attn_implementation)
        outputs = self.base_model.get_decoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                                position_ids=position_ids, use_cache=False, return_dict=True)
        return outputs.last_hidden_state


def as_listwise_model(model):
    """`model` itself when it already offers `decoder_hidden_states` and `lm_head_weight` (our wrappers); a
    `CausalLanguageModel` around it when it is a transformers causal LM (peft-wrapped or not)."""
    if hasattr(model, "decoder_hidden_states") and hasattr(model, "lm_head_weight"):
        return model
    base = unwrapped(model)
    if hasattr(base, "get_decoder") and hasattr(base, "get_output_embeddings") \
            and base.get_output_embeddings() is not None:
        return CausalLanguageModel(model)
    raise TypeError(f"{type(model).__name__} is neither a transformers causal language model nor a model with "
                    "decoder_hidden_states and lm_head_weight; run its decoder on the packed batch yourself and call "
                    "hscr_fast.listwise.response_logprobs(hidden_states, head_weight, batch)")


def text_example(tokenizer, prompt: str, responses: list[str], *, prompt_format: str | None = None):
    """One ranked list (responses best first) as a text-only `ListwiseExample`: the prompt in the tokenizer's chat
    template when it has one (or `prompt_format`: "chat-template" / "plain"), each response with EOS."""
    from hscr_fast.listwise import ListwiseExample

    wrapper = CausalLanguageModel(None, tokenizer, TextModelOptions(prompt_format))
    prompt_tokens = wrapper.prompt_tokens(prompt)
    return ListwiseExample(prompt_tokens, [wrapper.answer_tokens(prompt_tokens, text) for text in responses])


def is_text_only_checkpoint(model_dir: str | Path) -> bool:
    """The checkpoint's first architecture is a `...ForCausalLM` class of transformers (not a vision-language
    layout)."""
    import transformers

    config = read_json_file(Path(model_dir) / "config.json", UnsupportedTextModelError)
    architectures = (config.get("architectures") or []) if isinstance(config, dict) else []
    return bool(architectures) and architectures[0].endswith("ForCausalLM") and hasattr(transformers,
                                                                                         architectures[0])


def load_causal_lm(model_dir: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                   attn_implementation: str | None = None) -> CausalLanguageModel:
    """A text-only checkpoint and its tokenizer from a local directory, with its `hscr_fast.json` options."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    options = TextModelOptions.read(Path(model_dir))  # before the weights: a bad sidecar fails at once
    kwargs = {"dtype": dtype or torch.float32}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs).to(device).eval()
    return CausalLanguageModel(model, AutoTokenizer.from_pretrained(str(model_dir)), options)
