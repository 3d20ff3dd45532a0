"""Held-out evaluation during training: the split, the exactness of the eval_* metrics against an independent
computation with the saved adapter, that evaluating never changes training, and the errors for bad settings."""
import json
import random
import types

import pytest
import torch
from helpers import write_preference_lists

from hscr_fast import HscrError
from hscr_fast.data.records import DataFormatError
from hscr_fast.train import main
from hscr_fast.training.heldout import split_held_out
from hscr_fast.training.loop import train


@pytest.fixture(scope="module")
def lists(tmp_path_factory):
    """prefs.jsonl (10 lists) and heldout.jsonl (5 more lists: other images and questions)."""
    return write_preference_lists(tmp_path_factory.mktemp("heldout"), {"prefs.jsonl": 10, "heldout.jsonl": 5}, seed=5)


def read_rows(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


def test_split_depends_only_on_the_ids():
    records = [types.SimpleNamespace(id=f"sample-{i}") for i in range(4000)]
    kept, held = split_held_out(records, 0.1, "x.jsonl")
    assert len(kept) + len(held) == 4000 and not {r.id for r in kept} & {r.id for r in held}
    assert abs(len(held) - 400) < 3 * (4000 * 0.1 * 0.9) ** 0.5  # binomial(4000, 0.1) within 3 sigma
    shuffled = records[:]
    random.Random(1).shuffle(shuffled)
    assert {r.id for r in split_held_out(shuffled, 0.1, "x.jsonl")[1]} == {r.id for r in held}
    assert {r.id for r in held} <= {r.id for r in split_held_out(records, 0.2, "x.jsonl")[1]}  # nested fractions
    for fraction in (0.0, 1.0, -0.5):
        with pytest.raises(DataFormatError, match="strictly between 0 and 1"):
            split_held_out(records, fraction, "x.jsonl")
    with pytest.raises(DataFormatError, match="holds out none of the 2 preference lists in x.jsonl"):
        split_held_out(records[:2], 1e-6, "x.jsonl")


def held_out_mlpo(model_dir, adapter_dir, lists):
    """MLPO over the 5 held-out lists, all at once, computed independently with a saved adapter: (loss, metrics,
    explicit pairs)."""
    from hscr_fast.evaluation.run import load_model
    from hscr_fast.listwise import listwise_logprobs, pack_examples
    from hscr_fast.losses import mlpo_loss
    from hscr_fast.training.data import to_examples, tokenize_preferences, validate_preferences

    vlm = load_model(model_dir, adapter_dir)
    items = tokenize_preferences(vlm, validate_preferences(lists / "heldout.jsonl", lists / "images"),
                                 lists / "images")
    with torch.no_grad():
        packed = pack_examples(vlm.embed_tokens, to_examples(vlm, items))
        policy = listwise_logprobs(vlm, packed)
        with vlm.adapter_disabled():
            reference = listwise_logprobs(vlm, packed)
    loss, metrics = mlpo_loss(policy, reference, gamma=0.1, valid=packed.valid)
    return loss.item(), metrics, sum(len(item.responses) - 1 for item in items)


def test_held_out_metrics_are_exact_and_leave_training_unchanged(tiny_model_dir, lists, tmp_path, train_config):
    plain = train(train_config(lists, tmp_path / "plain"))
    evaluated = train(train_config(lists, tmp_path / "eval", eval_steps=4,
                                  eval_preferences=str(lists / "heldout.jsonl")))
    plain_rows, _ = read_rows(tmp_path / "plain")
    train_rows, eval_rows = read_rows(tmp_path / "eval")
    assert plain.steps == evaluated.steps == 10
    assert [r["loss"] for r in train_rows] == [r["loss"] for r in plain_rows]  # evaluating never perturbs training
    assert [r["step"] for r in eval_rows] == [4, 8, 10] and all(r["eval_lists"] == 5 for r in eval_rows)

    # The last eval row equals MLPO over the 5 held-out lists, all at once, with the saved adapter.
    loss, metrics, explicit_pairs = held_out_mlpo(tiny_model_dir, evaluated.adapter_dir, lists)
    final = eval_rows[-1]
    assert final["eval_loss"] == pytest.approx(loss, rel=1e-5)
    for name in ("margin_explicit", "margin_implicit", "accuracy_explicit", "accuracy_implicit"):
        assert final[f"eval_{name}"] == pytest.approx(metrics[name].item(), rel=1e-4, abs=1e-6)
    assert final["eval_num_pairs_explicit"] == explicit_pairs
    assert eval_rows[0]["eval_loss"] != eval_rows[-1]["eval_loss"]  # each evaluation sees the current policy
    assert evaluated.plot_path.read_bytes()[:4] == b"\x89PNG"


def test_save_best_keeps_the_adapter_of_the_lowest_held_out_loss_across_a_resume(tiny_model_dir, lists, tmp_path,
                                                                                  train_config):
    settings = dict(eval_steps=2, eval_preferences=str(lists / "heldout.jsonl"), save_best=True, save_steps=2)
    assert train(train_config(lists, tmp_path / "part", stop_after_steps=5, **settings)).steps == 5
    result = train(train_config(lists, tmp_path / "part", resume=True, **settings))
    _, eval_rows = read_rows(tmp_path / "part")
    losses = {row["step"]: row["eval_loss"] for row in eval_rows}
    assert sorted(losses) == [2, 4, 5, 6, 8, 10]  # the interrupted run's end (5) was evaluated and checkpointed
    best_step = min(losses, key=losses.get)
    assert best_step not in (5, 10)  # this run's held-out loss bottoms out mid-run: the best is not the last
    recorded = json.loads((result.best_adapter_dir / "evaluation.json").read_text())
    assert recorded["step"] == best_step and recorded["eval_loss"] == losses[best_step]
    loss, _, _ = held_out_mlpo(tiny_model_dir, result.best_adapter_dir, lists)
    assert loss == pytest.approx(losses[best_step], rel=1e-5)
    assert [p.name for p in (tmp_path / "part").iterdir() if "adapter-best" in p.name] == ["adapter-best"]  # no
    # staging or retired folder left behind


def test_eval_fraction_holds_out_part_of_the_training_file(lists, tmp_path, train_config):
    from hscr_fast.training.data import validate_preferences

    records = validate_preferences(lists / "prefs.jsonl", lists / "images")
    kept, held = split_held_out(records, 0.35, "prefs.jsonl")
    result = train(train_config(lists, tmp_path / "fraction", eval_fraction=0.35, eval_steps=0,
                               epochs=1))
    train_rows, eval_rows = read_rows(tmp_path / "fraction")
    assert result.steps == len(train_rows) == len(kept) // 2
    assert [r["step"] for r in eval_rows] == [result.steps]  # eval_steps 0: at the end only
    assert eval_rows[0]["eval_lists"] == len(held)
    # One reference cache for the whole file, covering the held-out lists too.
    (cache,) = lists.glob("prefs.ref-logps-*.json")
    assert set(json.loads(cache.read_text())) >= {r.id for r in records}


def test_bad_held_out_settings_are_reported_before_the_model_loads(lists, tmp_path, capsys):
    common = ["--model", str(tmp_path / "no-such-model"), "--preferences", str(lists / "prefs.jsonl"),
              "--image-folder", str(lists / "images"), "--deepspeed", "none", "--out", str(tmp_path / "o")]
    assert main(common + ["--eval-fraction", "0.2", "--eval-preferences", str(lists / "heldout.jsonl")]) == 2
    assert "give one" in capsys.readouterr().err
    assert main(common + ["--eval-fraction", "1e-9"]) == 2
    assert "holds out none of the 10 preference lists" in capsys.readouterr().err
    assert main(common + ["--eval-preferences", str(tmp_path / "gone.jsonl")]) == 2
    assert "gone.jsonl: file not found" in capsys.readouterr().err
    assert main(common + ["--save-best"]) == 2
    assert "--save-best keeps the adapter with the lowest held-out loss; it needs held-out lists" in \
        capsys.readouterr().err

    # A held-out file is checked like the training file: every line, every image.
    import shutil

    lines = (lists / "heldout.jsonl").read_text().splitlines()
    images = shutil.copytree(lists / "images", tmp_path / "images")
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    broken = json.loads(lines[1]) | {"image": "corrupt.png"}
    empty = json.loads(lines[3]) | {"responses": ["two", ""]}
    (tmp_path / "bad.jsonl").write_text("\n".join([lines[0], json.dumps(broken), lines[2], json.dumps(empty)]) + "\n")
    held_out = ["--eval-preferences", str(tmp_path / "bad.jsonl"), "--eval-image-folder", str(images)]
    assert main(common + held_out) == 2
    error = capsys.readouterr().err
    assert "bad.jsonl:4" in error and "response" in error  # the empty answer, by line
    (tmp_path / "bad.jsonl").write_text("\n".join([lines[0], json.dumps(broken)]) + "\n")
    assert main(common + held_out) == 2
    error = capsys.readouterr().err
    assert "record 2" in error and "corrupt.png" in error  # the unreadable image, by record


def test_resume_refuses_a_changed_split_and_reads_checkpoints_from_before_the_setting(lists, tmp_path, train_config):
    out = tmp_path / "run"
    assert train(train_config(lists, out, stop_after_steps=2)).steps == 2
    state_path = out / "checkpoints" / "step-2" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    with pytest.raises(HscrError, match="eval_fraction"):  # holding lists out now would change the training set
        train(train_config(lists, out, resume=True, eval_fraction=0.3))
    del state["run"]["eval_fraction"]  # as written before held-out evaluation existed
    state_path.write_text(json.dumps(state))
    assert train(train_config(lists, out, resume=True)).steps == 10
