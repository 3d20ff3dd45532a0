"""LLaVA-NeXT (anyres tiling): each image gives its own number of visual tokens.

- Our pieces give the logits of transformers' own forward, and the token counts announced before encoding are the
  counts the vision tower then gives.
- The three commands run end to end on a tiny LLaVA-NeXT checkpoint: generate (stages 1-2), train (MLPO) and
  evaluate. Batched answers equal one-at-a-time answers although the rows' visual lengths differ.
(The listwise forward's equality with independent forwards, values and gradients, is in test_listwise.py.)
"""
import json

import pytest
import torch

from hscr_fast import evaluate, generate
from hscr_fast.io import read_jsonl
from hscr_fast.models.tiny import TinyLlavaSpec, build_tiny_llava
from hscr_fast.models.vlm import AnyResPixels, load_vlm

IMAGE_SIZES = ((60, 50), (41, 77), (120, 40), (90, 33), (56, 56), (33, 100))
QA = [("Is there a lesion in the left lung?", "yes", "CLOSED"),
      ("Where is the abnormality?", "The right upper lobe shows a small nodule.", "OPEN"),
      ("How many lesions are there?", "two lesions, left lung", "OPEN"),
      ("Is this a normal image?", "no", "CLOSED")]


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


@pytest.fixture(scope="module")
def vqa_set(tmp_path_factory, make_images):
    """LLaVA-Med JSON: 12 questions on 6 images of different sizes (so different visual token counts)."""
    root = tmp_path_factory.mktemp("next-data")
    (root / "images").mkdir()
    for index, image in enumerate(make_images(len(IMAGE_SIZES), seed=9, sizes=IMAGE_SIZES)):
        image.save(root / "images" / f"img{index}.png")
    entries = []
    for index in range(12):
        question, answer, answer_type = QA[index % len(QA)]
        entries.append({"id": f"q{index}", "image": f"img{index % len(IMAGE_SIZES)}.png", "answer_type": answer_type,
                        "conversations": [{"from": "human", "value": "<image>\n" + question},
                                          {"from": "gpt", "value": answer}]})
    (root / "data.json").write_text(json.dumps(entries))
    return root


def test_pieces_agree_with_transformers_and_counts_are_announced(next_vlm, make_images):
    vlm = next_vlm
    assert vlm.is_anyres and vlm.options.image_aspect_ratio == "crop"  # anyres tiles the image as it is
    with pytest.raises(TypeError, match="visual_token_counts"):
        vlm.num_visual_tokens
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


def test_generate_train_evaluate_end_to_end(next_model_dir, vqa_set, tmp_path):
    from hscr_fast.train import TrainConfig, train

    prefs = tmp_path / "prefs.jsonl"
    assert generate.main(["--model", str(next_model_dir), "--data", str(vqa_set / "data.json"),
                          "--image-folder", str(vqa_set / "images"), "--out", str(prefs), "--batch-size", "4"]) == 0
    written = read_jsonl(prefs)
    assert written and all(len(line["responses"]) >= 2 for line in written)
    assert {line["image"] for line in written} == {f"img{i}.png" for i in range(len(IMAGE_SIZES))}

    result = train(TrainConfig(model=str(next_model_dir), preferences=str(prefs),
                               image_folder=str(vqa_set / "images"), out=str(tmp_path / "run"), epochs=1,
                               learning_rate=2e-3, per_device_batch_size=2, deepspeed="none", warmup_ratio=0.0))
    rows = read_jsonl(result.metrics_path)
    assert result.steps == len(written) // 2 == len(rows) and rows[0]["margin_explicit"] == pytest.approx(0, abs=1e-6)

    common = ["--model", str(next_model_dir), "--adapter", str(result.adapter_dir), "--data",
              str(vqa_set / "data.json"), "--image-folder", str(vqa_set / "images"), "--max-new-tokens", "6",
              "--no-progress"]
    assert evaluate.main(common + ["--out", str(tmp_path / "batched"), "--batch-size", "5"]) == 0
    assert evaluate.main(common + ["--out", str(tmp_path / "single"), "--batch-size", "1"]) == 0
    batched, single = (read_jsonl(tmp_path / name / "predictions.jsonl") for name in ("batched", "single"))
    assert len(batched) == 12
    assert [line["answer"] for line in batched] == [line["answer"] for line in single]
    assert json.loads((tmp_path / "batched" / "metrics.json").read_text())["num_closed"] == 6
