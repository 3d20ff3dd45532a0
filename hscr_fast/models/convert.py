"""Convert an original LLaVA-Med v1.5 checkpoint (or another checkpoint in LLaVA's own layout) to transformers' Llava.

    python -m hscr_fast.models.convert SRC DST [--vision-tower DIR] [--dtype bfloat16]

The original layout is a causal LM with vision parts added: `LlavaMistralForCausalLM` (LLaVA-Med v1.5) or
`LlavaLlamaForCausalLM` (LLaVA-1.5 and its Vicuna/Llama-based fine-tunes). Its config carries `mm_vision_tower`,
`mm_projector_type`, `mm_vision_select_layer` and `mm_vision_select_feature`. Its weights add the projector,
`model.mm_projector.{0,2}.*` (`mlp2x_gelu`) or `model.mm_projector.*` (`linear`), and
`model.vision_tower.vision_tower.*` when the vision tower was saved with it.

A `linear` projector maps exactly onto transformers' two-layer projector: the first layer holds the weights, the
activation is the identity, and the second layer is an identity matrix with zero bias. Checkpoints that wrap the
image in `<im_start>`/`<im_end>` tokens (`mm_use_im_start_end`, LLaVA v1.0) are refused: the prompt formats here do
not add those tokens. The vision tower comes from the checkpoint when present, else from `--vision-tower` (a local CLIP
directory), else from `mm_vision_tower` (a local path, or a hub name when the hub is reachable).

The `<image>` placeholder becomes one extra token at the end of the vocabulary. hscr_fast never embeds it (visual
tokens are spliced in, as LLaVA's IMAGE_TOKEN_INDEX = -200 did), but transformers' own Llava forward looks the
placeholder up, so the row must exist. The new lm_head row is zero and only one row is added (no padding to a
multiple of 64), so the converted model's logits over the original vocabulary equal the original model's exactly.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from hscr_fast.models.prompting import IMAGE_PLACEHOLDER
from hscr_fast.models.vlm import ModelOptions
from hscr_fast.runtime.errors import HscrError, exit_code_of

SELECT_FEATURE_TO_STRATEGY = {"patch": "default", "cls_patch": "full"}
# Original architecture -> the transformers config class of its language model.
TEXT_CONFIG_CLASSES = {"LlavaMistralForCausalLM": "MistralConfig", "LlavaLlamaForCausalLM": "LlamaConfig"}
PROJECTOR_ACTIVATIONS = {"mlp2x_gelu": "gelu", "linear": "linear"}
VISION_PREFIX = "model.vision_tower.vision_tower."
PROJECTOR_PREFIX = "model.mm_projector."


class ConversionError(HscrError):
    pass


def read_original_state_dict(src: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: sharded or single safetensors, or PyTorch .bin files."""
    from safetensors.torch import load_file

    files = sorted(src.glob("*.safetensors")) or sorted(src.glob("pytorch_model*.bin"))
    if not files:
        raise ConversionError(f"{src}: no *.safetensors or pytorch_model*.bin weight files")
    state = {}
    for path in files:
        state.update(load_file(str(path)) if path.suffix == ".safetensors"
                     else torch.load(path, map_location="cpu", weights_only=True))
    return state


def _load_vision_tower(config: dict, state: dict, vision_tower_dir: str | None, src: Path):
    """(CLIPVisionConfig, state dict under `vision_model.*`, image processor settings source or None)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    embedded = {k[len(VISION_PREFIX):]: v for k, v in state.items() if k.startswith(VISION_PREFIX)}
    source = vision_tower_dir or config.get("mm_vision_tower")
    if embedded:
        if source is None or not (Path(source) / "config.json").is_file():
            raise ConversionError(
                f"{src}: the checkpoint holds vision tower weights but its CLIP config is unknown; pass "
                f"--vision-tower DIR (the CLIP directory named by mm_vision_tower={config.get('mm_vision_tower')!r})")
        return CLIPVisionConfig.from_pretrained(source), embedded, source
    if source is None:
        raise ConversionError(f"{src}: no vision tower weights in the checkpoint and no mm_vision_tower in its "
                              "config; pass --vision-tower DIR")
    try:
        tower = CLIPVisionModel.from_pretrained(source)
    except OSError as error:
        raise ConversionError(
            f"cannot load the vision tower {source!r} ({error.__class__.__name__}); it is not a local directory and "
            "the hub is unreachable: download it and pass --vision-tower DIR") from None
    return tower.config, tower.state_dict(), source


def convert_llava_med(src: str | Path, dst: str | Path, *, vision_tower_dir: str | None = None,
                      dtype: torch.dtype | None = None) -> Path:
    import transformers
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessorPil,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    src, dst = Path(src), Path(dst)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{src}: no config.json")
    config = json.loads(config_path.read_text())
    architecture = (config.get("architectures") or ["?"])[0]
    if architecture not in TEXT_CONFIG_CLASSES:
        raise ConversionError(f"{src}: architecture {architecture!r} is not an original LLaVA layout this converter "
                              f"reads ({', '.join(TEXT_CONFIG_CLASSES)})")
    text_config_class = getattr(transformers, TEXT_CONFIG_CLASSES[architecture])
    projector_type = config.get("mm_projector_type", "linear")
    if projector_type not in PROJECTOR_ACTIVATIONS:
        raise ConversionError(f"{src}: mm_projector_type {projector_type!r} is not supported; supported: "
                              f"{', '.join(PROJECTOR_ACTIVATIONS)}")
    if config.get("mm_use_im_start_end"):
        raise ConversionError(f"{src}: mm_use_im_start_end is true (image wrapped in <im_start>/<im_end> tokens, "
                              "LLaVA v1.0 style); the prompt formats of hscr_fast do not add those tokens")
    select_feature = config.get("mm_vision_select_feature", "patch")
    if select_feature not in SELECT_FEATURE_TO_STRATEGY:
        raise ConversionError(f"{src}: mm_vision_select_feature {select_feature!r} is not supported")

    state = read_original_state_dict(src)
    vision_config, vision_state, vision_source = _load_vision_tower(config, state, vision_tower_dir, src)
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    if IMAGE_PLACEHOLDER not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_PLACEHOLDER]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    vocab_size = max(config["vocab_size"], image_token_id + 1)

    text_keys = {k: v for k, v in config.items() if k in text_config_class().to_dict() and k not in
                 ("architectures", "model_type", "transformers_version", "_name_or_path", "torch_dtype", "dtype")}
    text_keys["vocab_size"] = vocab_size
    text_config = text_config_class(**text_keys)
    dtype = dtype or getattr(torch, config.get("torch_dtype") or config.get("dtype") or "float32")
    llava_config = LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=image_token_id,
        image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2,
        projector_hidden_act=PROJECTOR_ACTIVATIONS[projector_type],
        vision_feature_select_strategy=SELECT_FEATURE_TO_STRATEGY[select_feature],
        vision_feature_layer=config.get("mm_vision_select_layer", -2), tie_word_embeddings=False,
    )

    mapped = {}
    for key, tensor in state.items():
        if key.startswith(VISION_PREFIX):
            continue
        if key.startswith(PROJECTOR_PREFIX):
            mapped.update(_projector_weight(key, tensor, projector_type, src))
        elif key.startswith("model."):
            mapped["model.language_model." + key[len("model."):]] = tensor
        elif key.startswith("lm_head."):
            mapped[key] = tensor
        else:
            raise ConversionError(f"{src}: unexpected weight {key}")
    if projector_type == "linear":  # the second layer of transformers' projector passes the first one's output on
        width = text_config.hidden_size
        reference = mapped.get("model.multi_modal_projector.linear_1.weight", torch.empty(0))
        mapped["model.multi_modal_projector.linear_2.weight"] = torch.eye(width, dtype=reference.dtype)
        mapped["model.multi_modal_projector.linear_2.bias"] = torch.zeros(width, dtype=reference.dtype)
    for key, tensor in vision_state.items():
        mapped["model.vision_tower." + key] = tensor
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        if name not in mapped:
            raise ConversionError(f"{src}: missing weight {name.replace('language_model.', '')}")
        rows = mapped[name]
        if rows.shape[0] < vocab_size:
            # Embedding: the mean row (a neutral input); lm_head: zero (see the module docstring).
            fill = rows.float().mean(0, keepdim=True) if "embed" in name else torch.zeros(1, rows.shape[1])
            mapped[name] = torch.cat([rows, fill.to(rows.dtype).expand(vocab_size - rows.shape[0], -1)])

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(llava_config)
    mapped = {k: v.to(dtype) for k, v in mapped.items()}
    missing, unexpected = model.load_state_dict(mapped, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ConversionError(f"{src}: weights do not match the Llava layout; missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")

    processor_source = Path(vision_source) if vision_source and Path(vision_source).is_dir() else None
    if processor_source is not None and (processor_source / "preprocessor_config.json").is_file():
        image_processor = CLIPImageProcessorPil.from_pretrained(str(processor_source))
    else:
        size = vision_config.image_size
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                                image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=vision_config.patch_size,
                               vision_feature_select_strategy=llava_config.vision_feature_select_strategy,
                               num_additional_image_tokens=1)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    processor.save_pretrained(dst)
    ModelOptions(prompt_format="llava-med",
                 image_aspect_ratio="pad" if config.get("image_aspect_ratio", "pad") == "pad" else "crop").write(dst)
    return dst


def _projector_weight(key: str, tensor: torch.Tensor, projector_type: str, src: Path) -> dict[str, torch.Tensor]:
    """One original projector tensor under its transformers name."""
    index, _, leaf = key[len(PROJECTOR_PREFIX):].partition(".")
    if projector_type == "linear" and index in ("weight", "bias") and not leaf:
        return {f"model.multi_modal_projector.linear_1.{index}": tensor}
    if projector_type == "mlp2x_gelu" and index in ("0", "2"):
        return {f"model.multi_modal_projector.linear_{1 if index == '0' else 2}.{leaf}": tensor}
    raise ConversionError(f"{src}: unexpected weight {key} for mm_projector_type {projector_type!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hscr_fast.models.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="checkpoint directory in LLaVA's original layout (LlavaMistralForCausalLM, as "
                                    "LLaVA-Med v1.5, or LlavaLlamaForCausalLM)")
    parser.add_argument("dst", help="output directory (transformers LlavaForConditionalGeneration layout)")
    parser.add_argument("--vision-tower", help="local CLIP vision directory, when the checkpoint has no vision weights")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the checkpoint's own")
    args = parser.parse_args(argv)

    def body() -> None:
        out = convert_llava_med(args.src, args.dst, vision_tower_dir=args.vision_tower,
                                dtype=getattr(torch, args.dtype) if args.dtype else None)
        print(f"converted {args.src} -> {out}")

    return exit_code_of(body)


if __name__ == "__main__":
    sys.exit(main())
