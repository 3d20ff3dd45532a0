"""Token-level alignment pieces: marked clinical spans, minimally edited pairs, and the token-wise KL term."""
import json

import pytest
from helpers import make_images

from hscr_fast.models.prompting import split_marked_spans
from hscr_fast.preferences.minimal_edits import main as minimal_edits_main
from hscr_fast.preferences.minimal_edits import mark_differences


def test_split_marked_spans():
    assert split_marked_spans("a <mask>left</mask> lobe") == ("a left lobe", [(2, 6)])
    assert split_marked_spans("no marks") == ("no marks", [])
    for bad in ("<mask>open", "close</mask>", "<mask><mask>x</mask></mask>"):
        with pytest.raises(ValueError):
            split_marked_spans(bad)


def test_marked_tokens_are_exactly_the_span_tokens(tiny_vlm):
    prompt = tiny_vlm.prompt_tokens("Where is the lesion?")
    ids, flags = tiny_vlm.marked_answer_tokens(prompt, "the <mask>right lower</mask> lobe")
    assert ids == tiny_vlm.answer_tokens(prompt, "the right lower lobe")
    marked_text = tiny_vlm.tokenizer.decode([t for t, f in zip(ids, flags) if f])
    assert marked_text.strip() == "right lower"
    assert flags[-1] is False  # EOS


def test_mark_differences():
    a, b, edited = mark_differences("a small lesion in the left lung", "a large lesion in the right lung")
    assert a == "a <mask>small</mask> lesion in the <mask>left</mask> lung"
    assert b == "a <mask>large</mask> lesion in the <mask>right</mask> lung"
    assert edited == 2
    assert mark_differences("yes", "yes")[2] == 0


def test_minimal_edit_command(tmp_path):
    source = tmp_path / "prefs.jsonl"
    source.write_text(json.dumps({"id": "p1", "image": "x.png", "prompt": "q",
                                  "responses": ["the left upper lobe", "the right upper lobe", "the left upper lobe",
                                                "a very different long answer here"]}) + "\n")
    out = tmp_path / "pairs.jsonl"
    assert minimal_edits_main(["--preferences", str(source), "--out", str(out), "--max-edited-words", "2"]) == 0
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["id"] for p in pairs] == ["p1-edit1"]
    assert pairs[0]["responses"] == ["the <mask>left</mask> upper lobe", "the <mask>right</mask> upper lobe"]
    assert minimal_edits_main(["--preferences", str(source), "--out", str(out)]) == 0  # resumable: no duplicates
    assert len(out.read_text().splitlines()) == 1


def test_token_kl_term_in_training(tiny_model_dir, tmp_path):
    from hscr_fast.training.config import TrainConfig
    from hscr_fast.training.loop import train

    (tmp_path / "images").mkdir()
    lines = []
    for index, image in enumerate(make_images(6, seed=4)):
        image.save(tmp_path / "images" / f"i{index}.png")
        side, other = ("left", "right") if index % 2 else ("right", "left")
        lines.append(json.dumps({"id": f"e{index}", "image": f"i{index}.png", "prompt": "Where is the lesion?",
                                 "responses": [f"the <mask>{side}</mask> upper lobe",
                                               f"the <mask>{other}</mask> upper lobe"], "kind": "minimal-edit"}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    common = dict(model=str(tiny_model_dir), preferences=str(tmp_path / "pairs.jsonl"),
                  image_folder=str(tmp_path / "images"), deepspeed="none", learning_rate=5e-3, epochs=2,
                  per_device_batch_size=2, save_steps=100, loss="dpo")
    train(TrainConfig(out=str(tmp_path / "kl"), token_kl_weight=0.01, token_kl_scope="marked", **common))
    train(TrainConfig(out=str(tmp_path / "plain"), **common))
    kl_rows = [json.loads(line) for line in (tmp_path / "kl" / "metrics.jsonl").read_text().splitlines()]
    plain_rows = [json.loads(line) for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    # Step 1: policy = reference, so the KL is 0 and the loss is plain DPO's.
    assert kl_rows[0]["token_kl"] == pytest.approx(0.0, abs=1e-6)
    assert kl_rows[0]["loss"] == pytest.approx(plain_rows[0]["loss"], rel=1e-6)
    # Later: the policy has moved, the KL is positive and is part of the loss.
    assert kl_rows[-1]["token_kl"] > 0
    assert kl_rows[-1]["loss"] == pytest.approx(kl_rows[-1]["loss_explicit"] + 0.01 * kl_rows[-1]["token_kl"],
                                                rel=1e-5)
