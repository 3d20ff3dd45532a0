"""Model layer: tiny factory, loading, prompt tokenisation, the exposed pieces, visual token dropout."""
import json
from re import escape as re_escape

import pytest
import torch
from helpers import make_images

from hscr_fast.models.dropout import sample_seed, visual_dropout
from hscr_fast.models.prompting import format_prompt, strip_image_tag, tokenize_answer, tokenize_prompt
from hscr_fast.models.vlm import UnsupportedModelError, load_vlm, read_architecture


def test_prompt_tokens_match_whole_text_tokenisation(tiny_vlm):
    tokenizer = tiny_vlm.tokenizer
    text = format_prompt("<image>\nIs there a lesion in the left lung?", tokenizer)
    assert text.count("<image>") == 1 and "left lung?" in text
    prompt = tokenize_prompt(tokenizer, text)
    assert prompt.before_image[0] == tokenizer.bos_token_id
    assert tokenizer.bos_token_id not in prompt.after_image
    answer = tokenize_answer(tokenizer, prompt, "yes")
    assert answer[-1] == tokenizer.eos_token_id
    # The answer tokens are what the whole (after-image) text tokenises to beyond the prompt.
    after = text.partition("<image>")[2]
    whole = tokenizer(after + " yes", add_special_tokens=False)["input_ids"]
    assert whole == list(prompt.after_image) + answer[:-1]
    assert tokenizer.decode(answer[:-1]).strip() == "yes"


QWEN_LIKE_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                      "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MISTRAL_LIKE_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} "
                         "[/INST]{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")


@pytest.mark.parametrize("template, separator", [(QWEN_LIKE_TEMPLATE, ""), (MISTRAL_LIKE_TEMPLATE, " ")],
                         ids=["answer-right-after-the-prompt", "space-before-the-answer"])
def test_chat_template_answers_are_tokenised_as_the_template_renders_them(tiny_model_dir, template, separator):
    """The tokens scored for an answer are the ones the template's own rendering of the whole conversation gives."""
    from transformers import AutoTokenizer

    from hscr_fast.models.prompting import answer_separator

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = template
    assert answer_separator(tokenizer, "chat-template") == separator
    assert answer_separator(tokenizer, "llava-med") == " "
    prompt_text = format_prompt("What organ is shown?", tokenizer, "chat-template")
    prompt = tokenize_prompt(tokenizer, prompt_text, answer_separator(tokenizer, "chat-template"))
    answer = tokenize_answer(tokenizer, prompt, "left lung")
    conversation = tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\nWhat organ is shown?"}, {"role": "assistant", "content": "left lung"}],
        tokenize=False)
    rendered_answer = conversation.partition("<image>")[2][len(prompt_text.partition("<image>")[2]):]
    assert rendered_answer.startswith(separator + "left lung")
    whole = tokenizer(prompt_text.partition("<image>")[2] + separator + "left lung", add_special_tokens=False)
    assert whole["input_ids"] == list(prompt.after_image) + answer[:-1]
    other = tokenize_answer(tokenizer, type(prompt)(prompt.before_image, prompt.after_image, prompt.text,
                                                    " " if separator == "" else ""), "left lung")
    assert other != answer  # with the metaspace tokenizer the separator changes the first answer token


def test_a_chat_template_that_does_not_continue_its_prompt_is_refused(tiny_model_dir):
    from transformers import AutoTokenizer

    from hscr_fast.models.prompting import answer_separator

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}Answer briefly.\nassistant:{% endif %}")
    with pytest.raises(ValueError, match="does not render an assistant answer as a continuation"):
        answer_separator(tokenizer, "chat-template")


def test_prompt_requires_exactly_one_image(tiny_vlm):
    with pytest.raises(ValueError, match="exactly one"):
        tokenize_prompt(tiny_vlm.tokenizer, "no image here")
    with pytest.raises(ValueError, match="exactly one"):
        tokenize_prompt(tiny_vlm.tokenizer, "<image> and <image>")
    assert strip_image_tag("<image>\nWhat is shown?") == "What is shown?"


def test_encode_images_shape_and_batch_independence(tiny_vlm):
    images = make_images(3)
    pixels = tiny_vlm.preprocess_images(images)
    visual = tiny_vlm.encode_images(pixels)
    assert visual.shape == (3, tiny_vlm.num_visual_tokens, tiny_vlm.hidden_size)
    single = tiny_vlm.encode_images(pixels[1:2])
    torch.testing.assert_close(visual[1:2], single, rtol=1e-5, atol=1e-5)


def test_decoder_hidden_states_match_llava_logits(tiny_vlm):
    """Our pieces (splice visual tokens, hidden states, lm_head) reproduce transformers' own Llava forward."""
    model, tokenizer = tiny_vlm.llava, tiny_vlm.tokenizer
    prompt = tokenize_prompt(tokenizer, format_prompt("What organ is shown?", tokenizer))
    pixels = tiny_vlm.preprocess_images(make_images(1))
    visual = tiny_vlm.encode_images(pixels)[0]
    embeds = torch.cat([tiny_vlm.embed_tokens(torch.tensor(prompt.before_image)), visual,
                        tiny_vlm.embed_tokens(torch.tensor(prompt.after_image))])[None]
    ours = tiny_vlm.decoder_hidden_states(embeds) @ tiny_vlm.lm_head_weight.T
    image_id = model.config.image_token_id
    input_ids = torch.tensor([list(prompt.before_image) + [image_id] * visual.shape[0] + list(prompt.after_image)])
    with torch.no_grad():
        theirs = model(input_ids=input_ids, pixel_values=pixels).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_load_vlm_roundtrip(tiny_model_dir, tiny_vlm):
    loaded = load_vlm(tiny_model_dir)
    pixels = loaded.preprocess_images(make_images(2))
    torch.testing.assert_close(loaded.encode_images(pixels), tiny_vlm.encode_images(pixels))
    assert loaded.tokenizer("left lung")["input_ids"] == tiny_vlm.tokenizer("left lung")["input_ids"]


def test_unsupported_and_broken_model_dirs(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_architecture(tmp_path / "missing")
    with pytest.raises(UnsupportedModelError, match="no config.json"):
        read_architecture(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"]}))
    with pytest.raises(UnsupportedModelError, match="BertForMaskedLM"):
        read_architecture(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlavaMistralForCausalLM"]}))
    with pytest.raises(UnsupportedModelError, match="hscr_fast.models.convert"):
        read_architecture(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UnsupportedModelError, match="not valid JSON"):
        read_architecture(tmp_path)


def test_visual_dropout_is_seeded_per_sample_and_drops_the_ratio():
    first = visual_dropout(576, 0.7, global_seed=0, sample_id="rad-17")
    again = visual_dropout(576, 0.7, global_seed=0, sample_id="rad-17")
    other_sample = visual_dropout(576, 0.7, global_seed=0, sample_id="rad-18")
    other_seed = visual_dropout(576, 0.7, global_seed=1, sample_id="rad-17")
    assert torch.equal(first.kept, again.kept)
    assert not torch.equal(first.kept, other_sample.kept) and not torch.equal(first.kept, other_seed.kept)
    assert first.num_kept == 576 - round(0.7 * 576)
    assert sample_seed(0, "a") == sample_seed(0, "a") != sample_seed(0, "b")


def test_visual_dropout_is_uniform_over_positions():
    counts = torch.zeros(64)
    for sample in range(2000):
        counts += visual_dropout(64, 0.7, global_seed=3, sample_id=sample).kept.float()
    expected = 2000 * (64 - round(0.7 * 64)) / 64
    # Binomial sd ≈ sqrt(2000·0.3·0.7) ≈ 20: 5 sd is a real bound, not a loose constant.
    assert (counts - expected).abs().max() < 5 * (2000 * 0.3 * 0.7) ** 0.5


def test_visual_dropout_modes():
    visual = torch.randn(10, 4)
    removed = visual_dropout(10, 0.7, global_seed=0, sample_id=1, mode="remove")
    tokens, attendable = removed.apply(visual)
    assert tokens.shape == (3, 4) and attendable.all()
    torch.testing.assert_close(tokens, visual[removed.kept])
    masked = visual_dropout(10, 0.7, global_seed=0, sample_id=1, mode="mask")
    tokens, attendable = masked.apply(visual)
    assert tokens.shape == (10, 4) and torch.equal(attendable, masked.kept)
    with pytest.raises(ValueError, match="mode"):
        visual_dropout(10, 0.5, global_seed=0, sample_id=1, mode="blur")
    with pytest.raises(ValueError, match="drop_ratio"):
        visual_dropout(10, 1.0, global_seed=0, sample_id=1)


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('["llava-med"]', "expected a JSON object"),
    ('{"prompt_fromat": "llava-med"}', "unknown field(s) ['prompt_fromat']"),
    ('{"prompt_format": "vicuna"}', "unknown prompt_format 'vicuna'"),
    ('{"image_aspect_ratio": "square"}', "unknown image_aspect_ratio 'square'; expected 'pad' or 'crop'"),
])
def test_a_bad_hscr_fast_json_is_named_in_one_line(tiny_model_dir, tmp_path, capsys, content, message):
    import shutil

    from PIL import Image

    from hscr_fast.evaluate import main as evaluate_main

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "hscr_fast.json").write_text(content)
    with pytest.raises(UnsupportedModelError, match=re_escape(f"{model_dir / 'hscr_fast.json'}: {message}")):
        load_vlm(model_dir)
    assert "Loading weights" not in capsys.readouterr().err  # reported before the weights load
    Image.new("RGB", (20, 20)).save(tmp_path / "x.png")
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"id": "q", "image": "x.png", "answer_type": "CLOSED", "conversations": [
        {"from": "human", "value": "<image>\nIs it?"}, {"from": "gpt", "value": "yes"}]}]))
    assert evaluate_main(["--model", str(model_dir), "--data", str(data), "--image-folder", str(tmp_path),
                          "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
