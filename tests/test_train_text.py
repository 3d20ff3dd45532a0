"""The trainer on a text-only causal LM (a tiny random Llama / Qwen2 saved to a temporary folder): LoRA, DeepSpeed
ZeRO-2, the reference cache, held-out evaluation and exact resume; the listwise losses beside MLPO; TRL pairs as
k = 1 lists; lists with images refused before the model loads."""
import json
import math

import pytest
import torch

from hscr_fast.train import main
from hscr_fast.training.config import TrainConfig
from hscr_fast.training.loop import train

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # see conftest

ANSWERS = ["seven", "nine", "a banana", "four", "five", "twenty two", "the left lung", "no", "yes", "two lesions"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from hscr_fast.models.tiny_text import save_tiny_causal_lm

    return save_tiny_causal_lm(tmp_path_factory.mktemp("llama"), "llama", seed=1)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    from hscr_fast.models.tiny_text import save_tiny_causal_lm

    return save_tiny_causal_lm(tmp_path_factory.mktemp("qwen2"), "qwen2", seed=2)


def write_lists(path, count, sizes=(2, 3, 4)):
    """`count` text-only lists, responses best first, list sizes cycling through `sizes` (k varies)."""
    lines = []
    for index in range(count):
        size = sizes[index % len(sizes)]
        responses = [ANSWERS[(index + j) % len(ANSWERS)] for j in range(size)]
        lines.append(json.dumps({"id": f"t{index}", "prompt": f"Question {index}: what is seen?",
                                 "responses": responses}))
    path.write_text("\n".join(lines) + "\n")
    return path


def config_for(model_dir, preferences, out, **overrides):
    values = dict(model=str(model_dir), preferences=str(preferences), out=str(out), epochs=2, learning_rate=2e-3,
                  per_device_batch_size=2, deepspeed="none", save_steps=2, warmup_ratio=0.1)
    values.update(overrides)
    return TrainConfig(**values)


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # 20-35 s on the shared 2 cores: three DeepSpeed runs (full, interrupted, resumed)
def test_text_only_training_with_deepspeed_reference_cache_held_out_and_resume(llama_dir, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    from hscr_fast.listwise import listwise_logprobs, pack_examples
    from hscr_fast.models.causal_lm import load_causal_lm
    from hscr_fast.training.data import to_examples, tokenize_preferences, validate_preferences

    lists = write_lists(tmp_path / "lists.jsonl", 8)
    full = train(config_for(llama_dir, lists, tmp_path / "full", deepspeed="zero2", eval_fraction=0.25,
                            eval_steps=2))
    rows = read_metrics(tmp_path / "full")
    train_rows = [row for row in rows if "loss" in row]
    eval_rows = [row for row in rows if "eval_loss" in row]
    assert full.steps == len(train_rows) > 0 and eval_rows
    # LoRA B = 0 at the start: the policy is the reference, every margin 0.
    assert train_rows[0]["margin_explicit"] == pytest.approx(0.0, abs=1e-6)
    assert all(math.isfinite(row["eval_loss"]) for row in eval_rows)
    assert len(list(tmp_path.glob("lists.ref-logps-*.json"))) == 1  # the reference cache, beside the lists

    # Interrupted after 2 steps and resumed: the same adapter as the uninterrupted run.
    train(config_for(llama_dir, lists, tmp_path / "parts", deepspeed="zero2", eval_fraction=0.25, eval_steps=2,
                     stop_after_steps=2))
    resumed = train(config_for(llama_dir, lists, tmp_path / "parts", deepspeed="zero2", eval_fraction=0.25,
                               eval_steps=2, resume=True))
    theirs = load_file(full.adapter_dir / "adapter_model.safetensors")
    ours = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert theirs.keys() == ours.keys() and len(ours) > 0
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-7)

    # The adapter is standard PEFT on the stock model class, and it changes the listwise log-probs.
    base = load_causal_lm(llama_dir)
    assert type(base.model).__name__ == "LlamaForCausalLM"
    items = tokenize_preferences(base, validate_preferences(lists, None), None)[:4]
    with torch.no_grad():
        before = listwise_logprobs(base, pack_examples(base.embed_tokens, to_examples(base, items)))
        base.model = PeftModel.from_pretrained(base.model, str(full.adapter_dir))
        after = listwise_logprobs(base, pack_examples(base.embed_tokens, to_examples(base, items)))
    assert not torch.allclose(before, after)
    # LoRA on every decoder layer's attention and MLP projections (2 layers x 7 projections x A and B).
    assert len(ours) == 2 * 7 * 2 and any(".layers.1.mlp.down_proj.lora_B" in name for name in ours)


def lipo_lambda_at_zero_rewards(size):
    """LiPO-λ by hand when every reward is 0: ties rank the responses in list order, labels (size−1−i)/(size−1)."""
    labels = [(size - 1 - i) / (size - 1) for i in range(size)]
    discounts = [1 / math.log2(2 + i) for i in range(size)]
    return sum(abs(2 ** labels[i] - 2 ** labels[j]) * abs(discounts[i] - discounts[j]) * math.log(2)
               for i in range(size) for j in range(i + 1, size))


@pytest.mark.parametrize("loss, first_loss", [("plackett-luce", math.log(6)),
                                              ("lipo-lambda", lipo_lambda_at_zero_rewards(3))])
def test_listwise_losses_train_a_text_model(llama_dir, tmp_path, loss, first_loss):
    lists = write_lists(tmp_path / "lists.jsonl", 6, sizes=(3,))
    # Through the command line, as the ablation harness sets it.
    assert main(["--model", str(llama_dir), "--preferences", str(lists), "--out", str(tmp_path / "run"),
                 "--loss", loss, "--epochs", "3", "--learning-rate", "2e-3", "--per-device-batch-size", "2",
                 "--deepspeed", "none", "--warmup-ratio", "0.1"]) == 0
    rows = read_metrics(tmp_path / "run")
    # At step 1 the policy is the reference: the loss is the formula's value at zero rewards.
    assert rows[0]["loss"] == pytest.approx(first_loss, rel=1e-5)
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["margin_explicit"] > 0


def test_trl_pairs_train_a_chat_template_model(qwen2_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({
        "prompt": [{"role": "user", "content": f"Question {index}: what is seen?"}],
        "chosen": [{"role": "assistant", "content": ANSWERS[index]}],
        "rejected": [{"role": "assistant", "content": ANSWERS[-1 - index]}]}) + "\n" for index in range(4)))
    result = train(config_for(qwen2_dir, pairs, tmp_path / "run", epochs=1, merge=True))
    rows = read_metrics(tmp_path / "run")
    assert result.steps == 2 and rows[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)
    assert rows[0]["num_pairs_implicit"] == 0

    # The merged checkpoint is a complete text model (tokenizer and prompt format beside it) that scores the lists
    # as the base model with the adapter does.
    from peft import PeftModel

    from hscr_fast.listwise import listwise_logprobs, pack_examples
    from hscr_fast.models.causal_lm import load_causal_lm
    from hscr_fast.training.data import to_examples, tokenize_preferences, validate_preferences

    def scores(lm):
        items = tokenize_preferences(lm, validate_preferences(pairs, None), None)
        with torch.no_grad():
            return listwise_logprobs(lm, pack_examples(lm.embed_tokens, to_examples(lm, items)))

    merged, base = load_causal_lm(result.merged_dir), load_causal_lm(qwen2_dir)
    assert merged.options.prompt_format == base.options.prompt_format == "chat-template"
    before = scores(base)
    base.model = PeftModel.from_pretrained(base.model, str(result.adapter_dir))
    adapted = scores(base)
    torch.testing.assert_close(scores(merged), adapted, rtol=1e-5, atol=1e-5)
    assert (adapted - before).abs().max() > 1e-3  # the adapter changed the scores, so the match above means something


def test_lists_with_images_are_refused_for_a_text_model_before_it_loads(llama_dir, tmp_path, capsys):
    lists = tmp_path / "lists.jsonl"
    lists.write_text(json.dumps({"id": "a", "prompt": "q", "responses": ["x", "y"]}) + "\n"
                     + json.dumps({"id": "b", "image": "b.png", "prompt": "q", "responses": ["x", "y"]}) + "\n")
    code = main(["--model", str(llama_dir), "--preferences", str(lists), "--out", str(tmp_path / "o"),
                 "--deepspeed", "none"])
    error = capsys.readouterr().err
    assert code == 2 and "record 2 (id 'b'): has an image, but the model is text-only" in error
    assert not (tmp_path / "o").exists()


def test_an_unknown_architecture_is_named_before_anything_loads(tmp_path, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"architectures": ["NoSuchForCausalLM"]}))
    lists = write_lists(tmp_path / "lists.jsonl", 2)
    code = main(["--model", str(model_dir), "--preferences", str(lists), "--out", str(tmp_path / "o"),
                 "--deepspeed", "none"])
    error = capsys.readouterr().err
    assert code == 2 and "unsupported architecture 'NoSuchForCausalLM'" in error and "ForCausalLM class" in error
    assert len(error.strip().splitlines()) == 1
