"""How stage 1 deprives the model of its image: the four perturbations the HSCR paper compares (its Table 5).

Each one hides `drop_ratio` of some unit of the image, the units chosen uniformly at random by the per-sample
generator of `visual_dropout` (seeded from (global seed, sample id)), so every run, rank and resume perturbs a sample
the same way. From the encoder's input towards the language model:

- `pixel`: of the H·W pixel positions of the image the vision encoder receives (after resizing and normalisation),
  `round(drop_ratio·H·W)` are set to 0 in every channel. 0 in normalised space is the processor's mean colour, the
  value LLaVA pads images with, so a hidden pixel carries no content. The encoder sees the whole grid.
- `patch`: of the P encoder patches (14 px for CLIP ViT-L/14), `round(drop_ratio·P)` are removed before the encoder:
  it encodes the class token and the kept patches alone, each with its own position embedding, and the projector
  maps only those, so the language model receives the kept patches' visual tokens (fewer tokens, no gaps).
- `latent`: the encoder's L×L attention mask over its L = 1 + P tokens (class token included) gets −∞ in
  `round(drop_ratio·(L² − L))` of its off-diagonal entries, the same entries in every layer and head. The diagonal is
  never masked, so every token still attends to itself and no softmax row is empty. All P visual tokens reach the
  language model.
- `visual-token` (default): after the projector, `round(drop_ratio·N)` of the N visual tokens are dropped
  (`models/dropout.py`; `dropout_mode` says whether they leave the sequence or are masked out of attention).

`pixel`, `patch` and `latent` need a vision encoder that sees one fixed grid of patches per image with a class token
(CLIP, as in LLaVA and LLaVA-Med). LLaVA-NeXT feeds the encoder several tiles of one image (a resized base view and
crops that overlap it), and Qwen2-VL feeds it flattened patches that are merged 2×2 after the encoder with windowed
rotary attention; neither has the single grid these definitions speak of, so `check_perturbation` refuses them rather
than approximate.
"""
from __future__ import annotations

import torch

from hscr_fast.models.dropout import visual_dropout
from hscr_fast.models.vlm import UnsupportedModelError

PERTURBATIONS = ("visual-token", "pixel", "patch", "latent")
ENCODER_PERTURBATIONS = ("pixel", "patch", "latent")  # the ones that re-run the vision encoder
_WHY_NOT = {
    "llava_next": "LLaVA-NeXT encodes each image as several tiles (a resized base view and crops that overlap it), "
                  "so there is no single patch grid to hide",
    "qwen2_vl": "Qwen2-VL encodes flattened patches and merges them 2×2 after its encoder, so there is no single "
                "CLIP patch grid with a class token to hide",
}
_WHY_NOT["qwen2_5_vl"] = _WHY_NOT["qwen2_vl"].replace("Qwen2-VL", "Qwen2.5-VL")


class PerturbationError(UnsupportedModelError):
    """A perturbation this model family cannot express."""


def check_perturbation(perturbation: str, family: str, vision_tower_class: str | None = None) -> None:
    """Raises PerturbationError unless `perturbation` is defined for this model family (transformers' model_type)
    and vision tower; say why."""
    if perturbation not in PERTURBATIONS:
        raise PerturbationError(f"unknown perturbation {perturbation!r}; expected one of {PERTURBATIONS}")
    if perturbation == "visual-token":
        return
    if family in _WHY_NOT:
        raise PerturbationError(f"--perturbation {perturbation} is not defined for this model: {_WHY_NOT[family]}; "
                                f"use --perturbation visual-token")
    if family != "llava" or (vision_tower_class is not None and vision_tower_class != "CLIPVisionModel"):
        raise PerturbationError(f"--perturbation {perturbation} needs a LLaVA model with a CLIP vision tower; this one "
                                f"is {family} with {vision_tower_class}; use --perturbation visual-token")


def kept_units(count: int, drop_ratio: float, *, global_seed: int, sample_id: str | int) -> torch.Tensor:
    """bool [count]: which units survive, `round(drop_ratio·count)` dropped, by the per-sample seeded generator."""
    return visual_dropout(count, drop_ratio, global_seed=global_seed, sample_id=sample_id).kept


def vision_modules(vision_tower):
    """The module holding CLIP's embeddings, pre_layrnorm and encoder (transformers 5 flattened `vision_model` into
    CLIPVisionModel itself; earlier versions nest it)."""
    return getattr(vision_tower, "vision_model", vision_tower)


def hide_pixels(pixel_values: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """[3, H, W] normalised pixels with the positions where `kept` [H·W] is False set to 0 (the mean colour)."""
    _, height, width = pixel_values.shape
    return pixel_values * kept.view(1, height, width).to(pixel_values.device, pixel_values.dtype)


def latent_attention_bias(kept: torch.Tensor, num_tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive [L, L] mask (0 or −∞) from `kept` over the L² − L off-diagonal entries in row-major order."""
    off_diagonal = ~torch.eye(num_tokens, dtype=torch.bool)
    allowed = torch.ones(num_tokens, num_tokens, dtype=torch.bool)
    allowed[off_diagonal] = kept
    return torch.zeros(num_tokens, num_tokens, dtype=dtype).masked_fill(~allowed, float("-inf"))


class ImagePerturbation:
    """Deprived visual tokens for one LLaVA model under a perturbation of the vision encoder's input or attention.

        perturb = ImagePerturbation(vlm, "patch", drop_ratio=0.7, global_seed=0)
        tokens = perturb(pixel_values, sample_ids)  # one [N_i, D] tensor per image
    """

    def __init__(self, vlm, perturbation: str, *, drop_ratio: float, global_seed: int):
        if perturbation not in ENCODER_PERTURBATIONS:
            raise PerturbationError(f"ImagePerturbation handles {ENCODER_PERTURBATIONS}, got {perturbation!r} "
                                    f"(visual-token dropout acts after the projector: models/dropout.py)")
        check_perturbation(perturbation, vlm.family, type(vlm.llava.model.vision_tower).__name__)
        self.vlm, self.perturbation = vlm, perturbation
        self.drop_ratio, self.global_seed = drop_ratio, global_seed

    def kept(self, count: int, sample_id) -> torch.Tensor:
        return kept_units(count, self.drop_ratio, global_seed=self.global_seed, sample_id=sample_id)

    @torch.inference_mode()
    def __call__(self, pixel_values: torch.Tensor, sample_ids) -> list[torch.Tensor]:
        if pixel_values.shape[0] != len(sample_ids):
            raise ValueError(f"{pixel_values.shape[0]} images but {len(sample_ids)} sample ids")
        if self.perturbation == "pixel":
            height, width = pixel_values.shape[-2:]
            hidden = torch.stack([hide_pixels(pixels, self.kept(height * width, sample_id))
                                  for pixels, sample_id in zip(pixel_values, sample_ids)])
            return list(self.vlm.encode_images(hidden))
        return [self._encode_one(pixels, sample_id) for pixels, sample_id in zip(pixel_values, sample_ids)]

    def _encode_one(self, pixels: torch.Tensor, sample_id) -> torch.Tensor:
        """The CLIP tower's forward, with patches left out (`patch`) or an attention mask (`latent`), then the
        feature-layer selection and the projector as `LlavaModel.get_image_features` does them."""
        llava, config = self.vlm.llava.model, self.vlm.config
        vision = vision_modules(llava.vision_tower)
        embeddings = vision.embeddings(pixels[None].to(self.vlm.device, self.vlm.dtype))  # [1, 1 + P, D]
        num_tokens = embeddings.shape[1]
        attention_bias = None
        if self.perturbation == "patch":
            keep = torch.cat([torch.ones(1, dtype=torch.bool), self.kept(num_tokens - 1, sample_id)])
            embeddings = embeddings[:, keep.to(embeddings.device)]
        else:
            kept = self.kept(num_tokens * num_tokens - num_tokens, sample_id)
            attention_bias = latent_attention_bias(kept, num_tokens, embeddings.dtype).to(embeddings.device)
            attention_bias = attention_bias[None, None]
        hidden = vision.pre_layrnorm(embeddings)
        states = [hidden]  # transformers' hidden_states: the encoder's input, then every layer's output
        for layer in vision.encoder.layers:
            hidden = layer(hidden, attention_bias)
            states.append(hidden)
        layers = config.vision_feature_layer
        selected = [states[index] for index in ([layers] if isinstance(layers, int) else layers)]
        if config.vision_feature_select_strategy == "default":  # the class token is not a visual token
            selected = [state[:, 1:] for state in selected]
        return llava.multi_modal_projector(torch.cat(selected, dim=-1))[0]


__all__ = ["ENCODER_PERTURBATIONS", "PERTURBATIONS", "ImagePerturbation", "PerturbationError", "check_perturbation",
           "hide_pixels", "kept_units", "latent_attention_bias", "vision_modules"]
