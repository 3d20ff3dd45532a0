"""`VisionLanguageModel`: a vision-language checkpoint seen as the separate pieces HSCR needs.

Three families:
- LLaVA (`LlavaForConditionalGeneration`: LLaVA-1.5, LLaVA-Med v1.5 after conversion): every image gives the same
  number of visual tokens;
- LLaVA-NeXT (`LlavaNextForConditionalGeneration`): "anyres" tiling gives a number that depends on the image's size;
- Qwen2-VL and Qwen2.5-VL: dynamic resolution (a size-dependent number too) and 3D rotary positions (M-RoPE), whose
  positions `visual_layouts` provides (see models/positions.py).
Everything downstream takes the visual tokens of one image as an [N_i, D] tensor, so it works for all of them.

- `preprocess_images(images)`: pixel values on the model's device ([B, 3, H, W] for LLaVA, `AnyResPixels` for
  LLaVA-NeXT, `GridPixels` for Qwen2-VL); `visual_token_counts(pixels)` says how many visual tokens each image will
  give;
- `encode_images(pixels)`: vision tower + projector → visual tokens in the language model's space, [B, N, D] for
  LLaVA and a list of [N_i, D] otherwise (index either by image);
- `visual_layouts(pixels)`: each image's 3D rotary layout (Qwen2-VL), else None;
- `embed_tokens(ids)`: text embeddings;
- `decoder_hidden_states(inputs_embeds, attention_mask, position_ids)`: the language model's final hidden states,
  never the logits (log-probs come from `hscr_fast.kernels.fused_linear_logprobs` over answer positions only);
- `lm_head_weight`: [V, D], for the fused kernels.

The wrapper holds a reference to the transformers model; when peft injects LoRA layers the module tree is edited in
place, so the same wrapper keeps working on the adapted model (`adapter_disabled()` gives the reference model).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from hscr_fast.models.positions import VisualLayout
from hscr_fast.models.prompting import (
    IMAGE_PLACEHOLDER,
    PROMPT_FORMATS,
    PromptTokens,
    format_prompt,
    tokenize_prompt,
)
from hscr_fast.models.wrapper import ModelWrapper, mask_for_attention, unwrapped
from hscr_fast.runtime.errors import HscrError
from hscr_fast.runtime.io import read_json_file

SUPPORTED_ARCHITECTURES = {
    "LlavaForConditionalGeneration": "llava",
    "LlavaNextForConditionalGeneration": "llava-next",
    "Qwen2VLForConditionalGeneration": "qwen2-vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2.5-vl",
}
# Families whose decoder takes 3D (temporal, height, width) rotary positions: see models/positions.py.
MROPE_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
# How the image sits in the prompt text (IMAGE_PLACEHOLDER is where the visual tokens go).
IMAGE_MARKUP = dict.fromkeys(MROPE_MODEL_TYPES, "<|vision_start|><image><|vision_end|>")
# Checkpoint layouts we can read after conversion, with the command that converts them.
CONVERTIBLE_ARCHITECTURES = {
    "LlavaMistralForCausalLM": "python -m hscr_fast.models.convert SRC DST",
    "LlavaLlamaForCausalLM": "python -m hscr_fast.models.convert SRC DST",
}
SIDECAR_NAME = "hscr_fast.json"


class UnsupportedModelError(HscrError):
    pass


@dataclass
class ModelOptions:
    """Per-checkpoint choices that transformers' config does not record (stored in `hscr_fast.json` beside it)."""

    # None: the family's default ("llava-med" for LLaVA and LLaVA-NeXT, "chat-template" for Qwen2-VL).
    prompt_format: str | None = None
    # LLaVA-Med pads images to a square with the mean colour before CLIP preprocessing ("pad"). "crop" leaves the
    # image to the processor: CLIP's resize + centre crop, or LLaVA-NeXT's anyres tiling. None: the family's default
    # ("pad" for LLaVA, "crop" for LLaVA-NeXT, which tiles the image as it is).
    image_aspect_ratio: str | None = None

    @classmethod
    def read(cls, model_dir: Path) -> "ModelOptions":
        """The options in `model_dir/hscr_fast.json` (the family's defaults when there is none). A file that cannot
        be used raises UnsupportedModelError naming the file, the field and the accepted values."""
        path = Path(model_dir) / SIDECAR_NAME
        if not path.is_file():
            return cls()
        values = read_json_file(path, UnsupportedModelError)
        if not isinstance(values, dict):
            raise UnsupportedModelError(f"{path}: expected a JSON object such as {{\"prompt_format\": \"llava-med\"}}")
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise UnsupportedModelError(f"{path}: unknown field(s) {unknown}; the fields are "
                                        f"{sorted(cls.__dataclass_fields__)}")
        options = cls(**values)
        if options.prompt_format not in (None, *PROMPT_FORMATS):
            raise UnsupportedModelError(f"{path}: unknown prompt_format {options.prompt_format!r}; expected one of "
                                        f"{list(PROMPT_FORMATS)}")
        if options.image_aspect_ratio not in (None, "pad", "crop"):
            raise UnsupportedModelError(f"{path}: unknown image_aspect_ratio {options.image_aspect_ratio!r}; "
                                        "expected 'pad' or 'crop'")
        return options

    def write(self, model_dir: Path) -> None:
        (Path(model_dir) / SIDECAR_NAME).write_text(json.dumps(self.__dict__, indent=2) + "\n")


def read_architecture(model_dir: str | Path) -> str:
    """The `architectures[0]` entry of a checkpoint's config.json, with a one-line error for anything unusable."""
    config_path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"model directory not found: {model_dir}")
    if not config_path.is_file():
        raise UnsupportedModelError(f"{model_dir}: no config.json; expected a transformers checkpoint directory")
    config = read_json_file(config_path, UnsupportedModelError)
    architectures = config.get("architectures") or []
    if not architectures:
        raise UnsupportedModelError(f"{config_path}: no 'architectures' entry; cannot tell which model class to use")
    architecture = architectures[0]
    if architecture in CONVERTIBLE_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{model_dir}: architecture {architecture} is the original LLaVA-Med layout; convert it first with "
            f"`{CONVERTIBLE_ARCHITECTURES[architecture]}`")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{model_dir}: unsupported architecture {architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}, "
            "and for training any text-only ...ForCausalLM class of transformers")
    return architecture


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def check_weight_files(model_dir: str | Path) -> None:
    """Before the weights load: the checkpoint has weight files, and every safetensors file among them is complete
    (its header covers the file), so a missing or truncated download fails at once, naming the file."""
    from safetensors import SafetensorError, safe_open

    model_dir = Path(model_dir)
    present = [name for name in WEIGHT_FILES if (model_dir / name).is_file()]
    if not present:
        raise UnsupportedModelError(f"{model_dir}: config.json but no weights ({', '.join(WEIGHT_FILES[:3])}, ...); "
                                    f"the download or conversion is incomplete")
    shards = []
    if "model.safetensors.index.json" in present:
        index = read_json_file(model_dir / "model.safetensors.index.json", UnsupportedModelError)
        shards = sorted(set((index.get("weight_map") or {}).values()))
        missing = [name for name in shards if not (model_dir / name).is_file()]
        if missing:
            raise UnsupportedModelError(f"{model_dir / 'model.safetensors.index.json'}: names {len(missing)} shard(s) "
                                        f"that are not there, e.g. {missing[0]}; the download is incomplete")
    elif "model.safetensors" in present:
        shards = ["model.safetensors"]
    for name in shards:
        try:
            with safe_open(str(model_dir / name), "pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise UnsupportedModelError(f"{model_dir / name}: not a complete safetensors file ({error}); it is "
                                        f"truncated or corrupt — download or convert it again") from None


def preflight_model(model_dir: str | Path) -> None:
    """Everything about a local checkpoint that can be checked without loading it (config, options, weight files):
    the commands call this first, so that a bad --model fails in a second, not after the data and minutes of work."""
    if Path(model_dir).exists():
        read_architecture(model_dir)
        ModelOptions.read(Path(model_dir))
        check_weight_files(model_dir)


def _image_indices(rows, count: int) -> list[int]:
    """Image indices selected by an int, a slice or a sequence of ints, as a tensor's rows would be."""
    if isinstance(rows, slice):
        return list(range(count))[rows]
    return [int(rows)] if isinstance(rows, int) else [int(row) for row in rows]


@dataclass
class AnyResPixels:
    """LLaVA-NeXT's preprocessed images: the tiles of each image (padded to the batch's largest tile count), each
    image's original size, and how many visual tokens each will give. Indexing selects images, like a tensor's rows."""

    pixel_values: torch.Tensor  # [B, tiles, 3, H, W]
    image_sizes: torch.Tensor  # [B, 2]: (height, width) before preprocessing
    token_counts: list[int]

    def __len__(self) -> int:
        return len(self.token_counts)

    def __getitem__(self, rows) -> "AnyResPixels":
        indices = _image_indices(rows, len(self))
        return AnyResPixels(self.pixel_values[indices], self.image_sizes[indices],
                            [self.token_counts[i] for i in indices])


@dataclass
class GridPixels:
    """Qwen2-VL's preprocessed images: every image's patches in one [patches, C·T·P·P] tensor, each image's (t, h, w)
    patch grid, and how many visual tokens each gives after the spatial merge. Indexing selects images."""

    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor  # long [B, 3]
    token_counts: list[int]

    def __len__(self) -> int:
        return len(self.token_counts)

    def __getitem__(self, rows) -> "GridPixels":
        indices = _image_indices(rows, len(self))
        patches = self.image_grid_thw.prod(-1).tolist()
        starts = [sum(patches[:i]) for i in range(len(patches))]
        pieces = [self.pixel_values[starts[i]:starts[i] + patches[i]] for i in indices]
        return GridPixels(torch.cat(pieces) if pieces else self.pixel_values[:0], self.image_grid_thw[indices],
                          [self.token_counts[i] for i in indices])


class TextAndImageProcessor:
    """A tokenizer and an image processor, for checkpoints whose combined processor cannot be built here (Qwen2-VL's
    needs a video processor, which needs torchvision). Saves both like a processor would."""

    def __init__(self, tokenizer, image_processor):
        self.tokenizer, self.image_processor = tokenizer, image_processor

    def save_pretrained(self, directory) -> None:
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)


class VisionLanguageModel(ModelWrapper):
    def __init__(self, model, processor, options: ModelOptions | None = None):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.options = options or ModelOptions()
        if self.options.image_aspect_ratio is None:
            self.options.image_aspect_ratio = "pad" if self.family == "llava" else "crop"
        if self.options.prompt_format is None:
            self.options.prompt_format = "chat-template" if self.uses_mrope else "llava-med"

    # -- the underlying modules (looked up on every call, so peft's in-place edits are seen) -----------------------
    @property
    def llava(self):
        """The `...ForConditionalGeneration` module, also when wrapped by peft."""
        return unwrapped(self.model)

    @property
    def language_model(self):
        return self.llava.model.language_model

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.llava.lm_head.weight

    @property
    def config(self):
        return self.llava.config

    @property
    def hidden_size(self) -> int:
        return self.config.text_config.hidden_size

    @property
    def family(self) -> str:
        """transformers' model_type: llava, llava_next, qwen2_vl or qwen2_5_vl."""
        return self.config.model_type

    @property
    def is_anyres(self) -> bool:
        """LLaVA-NeXT: the number of visual tokens depends on the image's size."""
        return self.family == "llava_next"

    @property
    def uses_mrope(self) -> bool:
        """Qwen2-VL: 3D rotary positions, and a number of visual tokens that depends on the image's size."""
        return self.family in MROPE_MODEL_TYPES

    @property
    def num_visual_tokens(self) -> int:
        """Visual tokens per image (576 for CLIP ViT-L/14@336 with the CLS token dropped). LLaVA only: for LLaVA-NeXT
        the count depends on the image (`visual_token_counts`)."""
        if self.family != "llava":
            raise TypeError(f"{self.family} gives each image its own number of visual tokens; use "
                            "visual_token_counts()")
        vision = self.config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        return patches + (1 if self.config.vision_feature_select_strategy == "full" else 0)

    # -- text -------------------------------------------------------------------------------------------------------
    def _tokenize_prompt(self, question: str) -> PromptTokens:
        """The question around its image placeholder, in the family's image markup."""
        text = format_prompt(question, self.tokenizer, self.options.prompt_format,
                             image_markup=IMAGE_MARKUP.get(self.family, IMAGE_PLACEHOLDER + "\n"))
        return tokenize_prompt(self.tokenizer, text, self.answer_separator)

    # -- the pieces -------------------------------------------------------------------------------------------------
    def preprocess_images(self, images) -> torch.Tensor | AnyResPixels | GridPixels:
        """PIL RGB images → pixel values on the model's device and dtype: [B, 3, H, W] for LLaVA, `AnyResPixels` for
        LLaVA-NeXT, `GridPixels` for Qwen2-VL."""
        if self.options.image_aspect_ratio == "pad":
            images = [pad_to_square(image, self.image_processor.image_mean) for image in images]
        processed = self.image_processor(images=images, return_tensors="pt")
        pixels = processed["pixel_values"].to(self.device, self.dtype)
        if self.uses_mrope:
            grid = processed["image_grid_thw"]
            merge = self.config.vision_config.spatial_merge_size
            return GridPixels(pixels, grid.to(self.device), (grid.prod(-1) // merge ** 2).tolist())
        if not self.is_anyres:
            return pixels
        sizes = processed["image_sizes"]
        counts = self.processor._get_num_multimodal_tokens(image_sizes=sizes.tolist())["num_image_tokens"]
        return AnyResPixels(pixels, sizes.to(self.device), list(counts))

    def visual_token_counts(self, pixels: torch.Tensor | AnyResPixels | GridPixels) -> list[int]:
        """How many visual tokens each preprocessed image gives."""
        if isinstance(pixels, (AnyResPixels, GridPixels)):
            return list(pixels.token_counts)
        return [self.num_visual_tokens] * pixels.shape[0]

    def visual_layouts(self, pixels) -> list[VisualLayout] | None:
        """Qwen2-VL: each image's 3D rotary positions, from transformers' own `get_vision_position_ids`; None for the
        families with 1D positions (see models/positions.py)."""
        if not isinstance(pixels, GridPixels):
            return None
        merge = self.config.vision_config.spatial_merge_size
        return [VisualLayout(self.llava.model.get_vision_position_ids(0, grid, 1, merge).cpu(),
                             int(max(grid[1], grid[2])) // merge) for grid in pixels.image_grid_thw.cpu()]

    def encode_images(self, pixels) -> torch.Tensor | list[torch.Tensor]:
        """Vision tower + projector: visual tokens in the language model's embedding space, [B, N, D] for LLaVA and
        a list of [N_i, D] for LLaVA-NeXT and Qwen2-VL (row or item i: image i)."""
        if isinstance(pixels, GridPixels):
            features = self.llava.model.get_image_features(
                pixel_values=pixels.pixel_values.to(self.device, self.dtype), image_grid_thw=pixels.image_grid_thw,
                return_dict=True).pooler_output
            return list(features)
        options = dict(vision_feature_layer=self.config.vision_feature_layer,
                       vision_feature_select_strategy=self.config.vision_feature_select_strategy, return_dict=True)
        if isinstance(pixels, AnyResPixels):
            features = self.llava.model.get_image_features(
                pixel_values=pixels.pixel_values.to(self.device, self.dtype), image_sizes=pixels.image_sizes,
                **options).pooler_output
            return list(features)
        features = self.llava.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype),
                                                       **options).pooler_output
        return torch.stack(list(features)) if isinstance(features, (list, tuple)) else features

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_input_embeddings()(input_ids.to(self.device))

    def decoder_hidden_states(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                              position_ids: torch.Tensor | None = None, past_key_values=None,
                              use_cache: bool = False):
        """Final hidden states [B, L, D] of the language model (after its last norm), logits never computed.

        `attention_mask` may be 2D (padding) or a prepared 4D mask (bool, True = attend), which transformers passes
        to the attention kernel unchanged; that is how the listwise forward gives each response its own view.
        With `use_cache`, returns (hidden, past_key_values)."""
        attention_mask = mask_for_attention(attention_mask, inputs_embeds.dtype,
                                            self.config.text_config._attn_implementation)
        outputs = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                      position_ids=position_ids, past_key_values=past_key_values,
                                      use_cache=use_cache, return_dict=True)
        if use_cache:
            return outputs.last_hidden_state, outputs.past_key_values
        return outputs.last_hidden_state


def pad_to_square(image, background_rgb_mean):
    """LLaVA's `expand2square`: centre the image on a square canvas filled with the processor's mean colour."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    fill = tuple(int(round(channel * 255)) for channel in background_rgb_mean)
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def load_vlm(model_dir: str | Path, *, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
             attn_implementation: str | None = None) -> VisionLanguageModel:
    """Loads a LLaVA-family checkpoint and its processor from a local directory (or a hub name when online)."""
    import transformers
    from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer

    model_path = Path(model_dir)
    if model_path.exists():
        architecture = read_architecture(model_path)
        options = ModelOptions.read(model_path)  # before the weights: a bad hscr_fast.json fails at once
        check_weight_files(model_path)
    else:
        options = ModelOptions()
        architecture = (AutoConfig.from_pretrained(str(model_dir)).architectures or [""])[0]
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(f"{model_dir}: unsupported architecture {architecture!r}; supported: "
                                        f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16}[dtype]
    kwargs = {"dtype": dtype or torch.float32}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model_class = getattr(transformers, architecture)
    model = model_class.from_pretrained(str(model_dir), **kwargs).to(device).eval()
    if model.config.model_type in MROPE_MODEL_TYPES:
        # Only the tokenizer and the image processor are used; the combined processor also needs a video
        # processor, which needs torchvision.
        processor = TextAndImageProcessor(AutoTokenizer.from_pretrained(str(model_dir)),
                                          AutoImageProcessor.from_pretrained(str(model_dir)))
    else:
        processor = AutoProcessor.from_pretrained(str(model_dir))
    return VisionLanguageModel(model, processor, options)
