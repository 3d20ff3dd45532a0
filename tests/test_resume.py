"""One "same settings to resume" mechanism (hscr_fast.runtime.resume) for every command: the comparison, the one
error that names each differing setting (then and now) or record and what to do, and each command's use of it —
what counts as the same for generate, train and the reference cache (evaluate's is in test_evaluate.py)."""
import json
import re

import pytest
from helpers import write_preference_lists

from hscr_fast import HscrError, generate
from hscr_fast.preferences import pipeline
from hscr_fast.preferences.config import GenerateConfig
from hscr_fast.runtime.resume import (
    SettingsChangedError,
    check_same_settings,
    content_hash,
    record_differences,
    refuse_changes,
    setting_differences,
)
from hscr_fast.training.loop import train
from hscr_fast.training.reference import reference_fingerprint

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # see conftest


# -- the comparison ---------------------------------------------------------------------------------------------------
def test_differences_name_each_setting_then_and_now():
    earlier, now = {"beta": 0.9, "seed": 0, "gone": 1}, {"beta": 0.5, "seed": 0, "new": "x"}
    assert setting_differences(earlier, now) == ["beta 0.9 then, 0.5 now", "gone 1 then, None now",
                                                 "new None then, 'x' now"]
    assert setting_differences(earlier, now, keys=["seed", "beta"]) == ["beta 0.9 then, 0.5 now"]
    # a setting the earlier run did not record yet ran with its default
    assert setting_differences({}, {"eval_fraction": 0.0}, defaults={"eval_fraction": 0.0}) == []
    assert setting_differences({}, {"eval_fraction": 0.3}, defaults={"eval_fraction": 0.0}) == \
        ["eval_fraction 0.0 then, 0.3 now"]
    assert setting_differences({"a": 1}, {"a": 2}, wording="{key}: {earlier} there, {now} now") == ["a: 1 there, 2 now"]


def test_records_differ_only_when_seen_before_with_other_content():
    earlier = {"r1": content_hash({"q": "a"}), "r2": content_hash({"q": "b"})}
    assert record_differences(earlier, {"r1": content_hash({"q": "a"}), "r3": "new"}) == []
    assert record_differences(earlier, {"r2": content_hash({"q": "c"})}) == \
        ["1 input record(s) changed since they were processed ('r2')"]
    assert content_hash({"b": 1, "a": "é"}) == content_hash({"a": "é", "b": 1})  # key order does not count


def test_one_error_names_the_output_the_differences_and_the_remedy():
    refuse_changes("out.jsonl", [], "never raised")
    with pytest.raises(SettingsChangedError) as refused:
        refuse_changes("out.jsonl", ["beta 0.9 then, 0.5 now", "seed 0 then, 1 now"], "do this")
    assert isinstance(refused.value, HscrError)
    assert str(refused.value) == ("out.jsonl was made with other settings: beta 0.9 then, 0.5 now; seed 0 then, 1 "
                                  "now; do this")


def test_an_unreadable_settings_file_is_one_error(tmp_path):
    (tmp_path / "o.settings.json").write_text("{not json")
    with pytest.raises(SettingsChangedError, match=r"o\.settings\.json"):
        check_same_settings(tmp_path / "o.settings.json", tmp_path / "o.jsonl", {}, {})


# -- generate ---------------------------------------------------------------------------------------------------------
def test_generate_refuses_other_settings_before_the_model_loads(tmp_path, tiny_model_dir, capsys, monkeypatch):
    data = tmp_path / "sft.json"
    data.write_text(json.dumps([{"id": "q0", "image": "q0.png", "conversations": [
        {"from": "human", "value": "<image>\nIs there a lesion?"}, {"from": "gpt", "value": "yes"}]}]))
    out = tmp_path / "prefs.jsonl"
    flags = ["--model", str(tiny_model_dir), "--data", str(data), "--image-folder", str(tmp_path), "--out", str(out)]
    config = GenerateConfig.from_args(flags)
    settings = pipeline.output_settings(config, "float32", tiny_model_dir, data, tmp_path)
    paths = pipeline.OutputPaths(out)
    paths.settings.write_text(json.dumps({"settings": {**settings, "beta": 0.5}, "records": {}}))
    monkeypatch.setattr("hscr_fast.models.vlm.load_vlm", lambda *a, **k: pytest.fail("the model was loaded"))

    with pytest.raises(SettingsChangedError, match=r"prefs\.jsonl was made with other settings: beta 0\.5 then, 0\.9 "
                                                   r"now; rerun with the original settings"):
        pipeline.run(config, tiny_model_dir, data, tmp_path)
    assert generate.main(flags) == 2
    assert re.search(r"^error: .*beta 0\.5 then, 0\.9 now.*choose another --out", capsys.readouterr().err)
    assert not out.exists()
    # the device, --num-samples and --show are not part of it: the same settings resume
    same = pipeline.output_settings(GenerateConfig.from_args([*flags, "--device", "cpu", "--num-samples", "1",
                                                              "--show", "3"]), "float32", tiny_model_dir, data,
                                    tmp_path)
    assert same == settings


# -- train ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lists(tmp_path_factory):
    return write_preference_lists(tmp_path_factory.mktemp("resume"), {"prefs.jsonl": 6}, seed=3)


def test_train_resume_names_the_changed_setting_and_allows_the_schedule_free_ones(lists, tmp_path, train_config):
    out = tmp_path / "run"
    assert train(train_config(lists, out, stop_after_steps=2, chosen_nll_weight=0.1)).steps == 2
    with pytest.raises(SettingsChangedError) as refused:
        train(train_config(lists, out, resume=True, epochs=3, gamma=0.2, chosen_nll_weight=0.1))
    message = str(refused.value)
    assert re.match(r".*checkpoints/step-2 was made with other settings: epochs 2 then, 3 now; resume with the "
                    r"settings it was made with, or give --overwrite", message), message
    assert "gamma" not in message  # the reward scale may change on resume: it is not part of the run's identity
    # the NLL weight is recorded only when it is on: dropping it is a difference too
    with pytest.raises(SettingsChangedError, match=r"chosen_nll_weight 0\.1 then, None now"):
        train(train_config(lists, out, resume=True))
    with pytest.raises(SettingsChangedError, match=r"implicit True then, False now"):  # which MLPO terms: identity
        train(train_config(lists, out, resume=True, chosen_nll_weight=0.1, implicit=False))
    with pytest.raises(SettingsChangedError, match=r"kind_weights \{\} then, \{'image-dispreference': 0\.5\} now"):
        train(train_config(lists, out, resume=True, chosen_nll_weight=0.1, kind_weight=["image-dispreference=0.5"]))
    # the learning rate and the save interval are not part of it: the run resumes
    assert train(train_config(lists, out, resume=True, chosen_nll_weight=0.1, learning_rate=1e-3, save_steps=3,
                              stop_after_steps=3)).steps == 3


# -- the reference cache ----------------------------------------------------------------------------------------------
def test_reference_fingerprint_follows_every_setting_that_changes_the_numbers(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 8}')
    (model / "model.safetensors").write_bytes(b"weights")
    (model / "README.md").write_text("not part of it")
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text('{"id": "a"}\n')

    def fingerprint(prompt_format="llava-med", dtype="torch.float32"):
        return reference_fingerprint(model, prefs, prompt_format=prompt_format, dtype=dtype)

    base = fingerprint()
    assert fingerprint() == base
    (model / "README.md").write_text("edited")
    assert fingerprint() == base
    changed = [fingerprint(prompt_format="chat-template"), fingerprint(dtype="torch.bfloat16")]
    prefs.write_text('{"id": "b"}\n')
    changed.append(fingerprint())
    prefs.write_text('{"id": "a"}\n')
    (model / "config.json").write_text('{"hidden_size": 9}')
    changed.append(fingerprint())
    (model / "config.json").write_text('{"hidden_size": 8}')
    (model / "model.safetensors").write_bytes(b"other weights")  # another size
    changed.append(fingerprint())
    assert len({base, *changed}) == 6, changed
