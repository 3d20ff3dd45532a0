"""generate → train → evaluate end to end on the families whose images give unequal numbers of visual tokens:
LLaVA-NeXT (anyres) and Qwen2-VL (dynamic resolution, 3D rotary positions), each a saved tiny checkpoint loaded
the way users load theirs. Batched answers must equal one-at-a-time answers although the rows' visual lengths differ.
(The numerics of each family are checked piece by piece in test_llava_next.py and test_qwen2_vl.py; LLaVA's own
end-to-end runs are in test_generate.py, test_train.py and test_evaluate.py.)"""
import json

import pytest
from helpers import make_images

from hscr_fast import evaluate, generate
from hscr_fast.models.tiny import TinyLlavaSpec, build_tiny_llava
from hscr_fast.models.vlm import load_vlm
from hscr_fast.runtime.io import read_jsonl

IMAGE_SIZES = ((60, 50), (41, 77), (120, 40), (90, 33), (56, 56), (33, 100))
QA = [("Is there a lesion in the left lung?", "yes", "CLOSED"),
      ("Where is the abnormality?", "The right upper lobe shows a small nodule.", "OPEN"),
      ("How many lesions are there?", "two lesions, left lung", "OPEN"),
      ("Is this a normal image?", "no", "CLOSED")]


@pytest.fixture(scope="module", params=["llava-next", "qwen2-vl"])
def model_dir(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"tiny-{request.param}")
    model, processor = build_tiny_llava(TinyLlavaSpec(family=request.param, seed=4))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def vqa_set(tmp_path_factory):
    """LLaVA-Med JSON: 12 questions on 6 images of different sizes (so different visual token counts)."""
    root = tmp_path_factory.mktemp("family-data")
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


def test_generate_train_evaluate_end_to_end(model_dir, vqa_set, tmp_path):
    from hscr_fast.training.config import TrainConfig
    from hscr_fast.training.loop import train

    vlm = load_vlm(model_dir)
    assert vlm.family in ("llava_next", "qwen2_vl")
    prefs = tmp_path / "prefs.jsonl"
    assert generate.main(["--model", str(model_dir), "--data", str(vqa_set / "data.json"),
                          "--image-folder", str(vqa_set / "images"), "--out", str(prefs), "--batch-size", "4"]) == 0
    written = read_jsonl(prefs)
    assert written and all(len(line["responses"]) >= 2 for line in written)
    # Stage 1's other settings: masked (not removed) visual tokens, and Eq. 4 read literally (one replacement per
    # re-scored pass).
    other = tmp_path / "prefs-mask-sequential.jsonl"
    assert generate.main(["--model", str(model_dir), "--data", str(vqa_set / "data.json"),
                          "--image-folder", str(vqa_set / "images"), "--out", str(other), "--batch-size", "4",
                          "--dropout-mode", "mask", "--mode", "sequential"]) == 0
    assert read_jsonl(other)

    result = train(TrainConfig(model=str(model_dir), preferences=str(prefs), image_folder=str(vqa_set / "images"),
                               out=str(tmp_path / "run"), epochs=1, learning_rate=2e-3, per_device_batch_size=2,
                               deepspeed="none", warmup_ratio=0.0))
    rows = read_jsonl(result.metrics_path)
    assert result.steps == len(written) // 2 == len(rows) and rows[0]["margin_explicit"] == pytest.approx(0, abs=1e-6)

    common = ["--model", str(model_dir), "--adapter", str(result.adapter_dir), "--data", str(vqa_set / "data.json"),
              "--image-folder", str(vqa_set / "images"), "--max-new-tokens", "6", "--no-progress"]
    assert evaluate.main(common + ["--out", str(tmp_path / "batched"), "--batch-size", "5"]) == 0
    assert evaluate.main(common + ["--out", str(tmp_path / "single"), "--batch-size", "1"]) == 0
    batched, single = (read_jsonl(tmp_path / name / "predictions.jsonl") for name in ("batched", "single"))
    assert len(batched) == 12 and [line["text"] for line in batched] == [line["text"] for line in single]
    assert json.loads((tmp_path / "batched" / "metrics.json").read_text())["num_closed"] == 6
