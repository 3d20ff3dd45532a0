"""LLaVA-NeXT (anyres tiling): each image gives its own number of visual tokens. Loaded from a saved checkpoint, our
pieces give the logits of transformers' own forward, and the token counts announced before encoding are the counts
the vision tower then gives. (The listwise forward's equality with independent forwards, values and gradients, is in
test_listwise.py; generate → train → evaluate in test_model_families.py.)
"""
import pytest
import torch
from helpers import make_images

from hscr_fast.models.tiny import TinyLlavaSpec, build_tiny_llava
from hscr_fast.models.vlm import AnyResPixels, load_vlm

IMAGE_SIZES = ((60, 50), (41, 77), (120, 40), (90, 33), (56, 56), (33, 100))


@pytest.fixture(scope="module")
def next_model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-llava-next")
    model, processor = build_tiny_llava(TinyLlavaSpec(family="llava-next", seed=4))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def next_vlm(next_model_dir):
    return load_vlm(next_model_dir)


def test_pieces_agree_with_transformers_and_counts_are_announced(next_vlm):
    vlm = next_vlm
    assert vlm.is_anyres and vlm.options.image_aspect_ratio == "crop"  # anyres tiles the image as it is
    with pytest.raises(TypeError, match="visual_token_counts"):
        _ = vlm.num_visual_tokens
    images = make_images(len(IMAGE_SIZES), seed=1, sizes=IMAGE_SIZES)
    pixels = vlm.preprocess_images(images)
    assert isinstance(pixels, AnyResPixels) and len(pixels) == len(IMAGE_SIZES)
    visual = vlm.encode_images(pixels)
    counts = vlm.visual_token_counts(pixels)
    assert [v.shape[0] for v in visual] == counts and len(set(counts)) >= 3
    prompt = vlm.prompt_tokens("Is there a lesion in the left lung?")
    before, after = torch.tensor(prompt.before_image), torch.tensor(prompt.after_image)
    with torch.no_grad():
        for index in range(len(images)):
            alone = vlm.encode_images(pixels[index:index + 1])[0]  # batching never changes an image's tokens
            torch.testing.assert_close(alone, visual[index], rtol=1e-5, atol=1e-5)
            ids = torch.tensor([prompt.before_image + (vlm.config.image_token_id,) * counts[index]
                                + prompt.after_image])
            theirs = vlm.llava(input_ids=ids, pixel_values=pixels.pixel_values[index:index + 1],
                               image_sizes=pixels.image_sizes[index:index + 1]).logits[0]
            embeds = torch.cat([vlm.embed_tokens(before), visual[index], vlm.embed_tokens(after)])[None]
            ours = vlm.decoder_hidden_states(embeds)[0] @ vlm.lm_head_weight.T
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
