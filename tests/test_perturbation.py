"""The four stage-1 perturbations (`hscr_fast.models.perturbation`) against plain references on the tiny LLaVA.

- At drop ratio 0 the re-implemented encoder path equals transformers' own `get_image_features` (so the layer loop,
  the feature-layer pick and the class-token strategy are transformers').
- pixel: equals encoding, through transformers' path, an image whose dropped pixels were set to 0 one by one.
- patch: equals embedding each kept 14-px patch alone (a plain convolution of its crop), adding its own position
  embedding, and running the encoder layers on [class token, kept patches].
- latent: equals a hand-written attention (softmax(QKᵀ·scale + M)·V per head) with the −∞ entries of M where the
  mask says.
"""
import pytest
import torch
import torch.nn.functional as F
from helpers import make_images

from hscr_fast.models.perturbation import (
    ImagePerturbation,
    PerturbationError,
    check_perturbation,
    kept_units,
    latent_attention_bias,
    vision_modules,
)

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # see conftest

SEED, SAMPLE_IDS = 3, ["s0", "s1"]


@pytest.fixture(scope="module")
def pixels(tiny_vlm):
    return tiny_vlm.preprocess_images(make_images(2, seed=4))


def transformers_features(vlm, pixels):
    return vlm.encode_images(pixels)


@pytest.mark.parametrize("perturbation", ["pixel", "patch", "latent"])
def test_no_drop_equals_transformers_own_encoding(tiny_vlm, pixels, perturbation):
    ours = ImagePerturbation(tiny_vlm, perturbation, drop_ratio=0.0, global_seed=SEED)(pixels, SAMPLE_IDS)
    expected = transformers_features(tiny_vlm, pixels)
    for one, theirs in zip(ours, expected):
        torch.testing.assert_close(one, theirs, rtol=1e-5, atol=1e-6)


def test_pixel_level_equals_encoding_the_hidden_image(tiny_vlm, pixels):
    ours = ImagePerturbation(tiny_vlm, "pixel", drop_ratio=0.7, global_seed=SEED)(pixels, SAMPLE_IDS)
    height, width = pixels.shape[-2:]
    hidden = pixels.clone()
    for image, sample_id in enumerate(SAMPLE_IDS):
        kept = kept_units(height * width, 0.7, global_seed=SEED, sample_id=sample_id)
        assert int((~kept).sum()) == round(0.7 * height * width)
        for index in (~kept).nonzero().squeeze(1).tolist():
            hidden[image, :, index // width, index % width] = 0.0
    for one, theirs in zip(ours, transformers_features(tiny_vlm, hidden)):
        torch.testing.assert_close(one, theirs, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours[0], transformers_features(tiny_vlm, pixels)[0], atol=1e-3)


def reference_patch_tokens(vlm, image_pixels, kept):
    """Each kept patch embedded alone from its pixel crop, with its own position embedding, then the layers."""
    vision = vision_modules(vlm.llava.model.vision_tower)
    embeddings = vision.embeddings
    size = embeddings.patch_size
    per_row = image_pixels.shape[-1] // size
    rows = [embeddings.class_embedding + embeddings.position_embedding.weight[0]]
    for patch in kept.nonzero().squeeze(1).tolist():
        y, x = divmod(patch, per_row)
        crop = image_pixels[None, :, y * size:(y + 1) * size, x * size:(x + 1) * size]
        embedded = F.conv2d(crop, embeddings.patch_embedding.weight).flatten()  # CLIP's patch conv has no bias
        rows.append(embedded + embeddings.position_embedding.weight[1 + patch])
    hidden = vision.pre_layrnorm(torch.stack(rows)[None])
    states = [hidden]
    for layer in vision.encoder.layers:
        states.append(layer(states[-1], None))
    features = states[vlm.config.vision_feature_layer][:, 1:]
    return vlm.llava.model.multi_modal_projector(features)[0]


def test_patch_level_equals_encoding_the_kept_patches_alone(tiny_vlm, pixels):
    ours = ImagePerturbation(tiny_vlm, "patch", drop_ratio=0.7, global_seed=SEED)(pixels, SAMPLE_IDS)
    num_patches = tiny_vlm.num_visual_tokens
    for image, sample_id in enumerate(SAMPLE_IDS):
        kept = kept_units(num_patches, 0.7, global_seed=SEED, sample_id=sample_id)
        assert ours[image].shape[0] == int(kept.sum()) == num_patches - round(0.7 * num_patches)
        with torch.no_grad():
            expected = reference_patch_tokens(tiny_vlm, pixels[image], kept)
        torch.testing.assert_close(ours[image], expected, rtol=1e-5, atol=1e-5)


def reference_masked_layer(layer, hidden, bias):
    """One CLIP encoder layer written out: pre-norm attention with an additive mask, then the MLP."""
    attention = layer.self_attn
    normed = layer.layer_norm1(hidden)
    tokens, heads = hidden.shape[1], attention.num_heads
    def split(x):
        return x.view(1, tokens, heads, -1).transpose(1, 2)
    q, k, v = split(attention.q_proj(normed)), split(attention.k_proj(normed)), split(attention.v_proj(normed))
    weights = torch.softmax(q @ k.transpose(-1, -2) * attention.scale + bias, dim=-1)
    mixed = (weights @ v).transpose(1, 2).reshape(1, tokens, -1)
    hidden = hidden + attention.out_proj(mixed)
    return hidden + layer.mlp(layer.layer_norm2(hidden))


def test_latent_level_equals_a_plain_masked_attention(tiny_vlm, pixels):
    ours = ImagePerturbation(tiny_vlm, "latent", drop_ratio=0.7, global_seed=SEED)(pixels, SAMPLE_IDS)
    vision = vision_modules(tiny_vlm.llava.model.vision_tower)
    tokens = tiny_vlm.num_visual_tokens + 1
    for image, sample_id in enumerate(SAMPLE_IDS):
        kept = kept_units(tokens * tokens - tokens, 0.7, global_seed=SEED, sample_id=sample_id)
        bias = latent_attention_bias(kept, tokens, torch.float32)
        masked = torch.isinf(bias)
        assert int(masked.sum()) == round(0.7 * (tokens * tokens - tokens)) and not masked.diagonal().any()
        with torch.no_grad():
            hidden = vision.pre_layrnorm(vision.embeddings(pixels[image][None]))
            states = [hidden]
            for layer in vision.encoder.layers:
                states.append(reference_masked_layer(layer, states[-1], bias))
            expected = tiny_vlm.llava.model.multi_modal_projector(
                states[tiny_vlm.config.vision_feature_layer][:, 1:])[0]
        assert ours[image].shape == expected.shape == (tiny_vlm.num_visual_tokens, tiny_vlm.hidden_size)
        torch.testing.assert_close(ours[image], expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours[0], transformers_features(tiny_vlm, pixels)[0], atol=1e-3)


def test_same_sample_same_choice_other_sample_other_choice():
    first = kept_units(100, 0.7, global_seed=0, sample_id="a")
    assert torch.equal(first, kept_units(100, 0.7, global_seed=0, sample_id="a"))
    assert not torch.equal(first, kept_units(100, 0.7, global_seed=0, sample_id="b"))
    assert not torch.equal(first, kept_units(100, 0.7, global_seed=1, sample_id="a"))


@pytest.mark.parametrize("family,reason", [("llava_next", "several tiles"), ("qwen2_vl", "merges them 2×2"),
                                           ("qwen2_5_vl", "Qwen2.5-VL")])
@pytest.mark.parametrize("perturbation", ["pixel", "patch", "latent"])
def test_families_without_one_patch_grid_are_refused_with_the_reason(family, reason, perturbation):
    with pytest.raises(PerturbationError, match=reason):
        check_perturbation(perturbation, family)
    check_perturbation("visual-token", family)  # always defined


def test_unknown_perturbation_and_non_clip_tower_are_refused():
    with pytest.raises(PerturbationError, match="unknown perturbation"):
        check_perturbation("noise", "llava")
    with pytest.raises(PerturbationError, match="CLIP vision tower"):
        check_perturbation("patch", "llava", "SiglipVisionModel")
