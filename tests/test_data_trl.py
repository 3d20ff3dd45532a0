"""TRL preference data in and out: our lists exported as TRL pairs read back as the same pairs, TRL's own data
utilities accept the exported records, and TRL-style records (plain, conversational, with images) read as k = 1
lists."""
import itertools
import json

import pytest

from hscr_fast.data.export import export_trl, main
from hscr_fast.data.records import DataFormatError, load_preference_jsonl

LISTS = [
    {"id": "a", "image": "img/a.png", "prompt": "<image>\nIs there a lesion?", "responses": ["yes", "no", "maybe"],
     "weight": 0.5},
    {"id": "b", "prompt": "Name a prime number.", "responses": ["7", "9"]},
    {"id": "c", "prompt": "What is 2 + 2?", "responses": ["4", "5", "22", "four hundred"]},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.mark.parametrize("conversational", [False, True])
def test_exported_pairs_read_back_as_every_ranked_pair(tmp_path, conversational):
    lists = write_jsonl(tmp_path / "lists.jsonl", LISTS)
    count = export_trl(lists, tmp_path / "pairs.jsonl", conversational=conversational)
    assert count == 3 + 1 + 6
    pairs, _ = load_preference_jsonl(tmp_path / "pairs.jsonl")
    expected = [(f"{record['id']}:{i}>{j}", record.get("image"), [record["responses"][i], record["responses"][j]])
                for record in LISTS for i, j in itertools.combinations(range(len(record["responses"])), 2)]
    assert [(pair.id, pair.image, pair.responses) for pair in pairs] == expected
    prompts = {record["id"]: record["prompt"].replace("<image>\n", "") for record in LISTS}
    assert all(pair.prompt == prompts[pair.id.split(":")[0]] for pair in pairs)


def test_trl_data_utilities_accept_the_exported_records(tmp_path):
    from datasets import Dataset
    from trl.data_utils import is_conversational, maybe_apply_chat_template, prepare_multimodal_messages

    from hscr_fast.models.tiny_text import build_tiny_causal_lm

    _, tokenizer = build_tiny_causal_lm("qwen2")
    lists = write_jsonl(tmp_path / "lists.jsonl", LISTS)
    export_trl(lists, tmp_path / "plain.jsonl")
    export_trl(lists, tmp_path / "chat.jsonl", conversational=True)
    plain = [json.loads(line) for line in (tmp_path / "plain.jsonl").read_text().splitlines()]
    chat = [json.loads(line) for line in (tmp_path / "chat.jsonl").read_text().splitlines()]
    assert not any(is_conversational(record) for record in plain)
    assert all(is_conversational(record) for record in chat)

    text_only = Dataset.from_list([{k: v for k, v in r.items() if k != "images"} for r in chat if "images" not in r])
    rendered = text_only.map(maybe_apply_chat_template, fn_kwargs={"processing_class": tokenizer},
                             remove_columns=["id"])
    first = rendered[0]
    assert first["prompt"] == tokenizer.apply_chat_template([{"role": "user", "content": "Name a prime number."}],
                                                            add_generation_prompt=True, tokenize=False)
    assert first["chosen"].startswith("7") and first["rejected"].startswith("9")
    # Plain records pass through TRL's chat-template step unchanged.
    assert maybe_apply_chat_template({k: plain[3][k] for k in ("prompt", "chosen", "rejected")}, tokenizer) == \
        {k: plain[3][k] for k in ("prompt", "chosen", "rejected")}
    # A record with an image: TRL places its one image before the user's text.
    with_image = chat[0]
    messages = prepare_multimodal_messages(with_image["prompt"] + with_image["chosen"], images=with_image["images"])
    assert messages[0]["content"][0] == {"type": "image", "image": "img/a.png"}
    assert messages[0]["content"][1] == {"type": "text", "text": "Is there a lesion?"}


def test_trl_records_read_as_lists_of_one_dispreferred_response(tmp_path):
    records = [
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        {"id": "q2", "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Lesion?"}]}],
         "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "Yes, left lobe."}]}],
         "rejected": [{"role": "assistant", "content": "No."}], "images": ["x.png"], "source": "rlaif"},
    ]
    (tmp_path / "x.png").write_bytes(b"")
    path = write_jsonl(tmp_path / "trl.jsonl", records)
    pairs, _ = load_preference_jsonl(path, tmp_path)
    assert [(p.id, p.image, p.prompt, p.responses) for p in pairs] == [
        ("line-1", None, "The sky is", ["blue.", "green."]),
        ("q2", "x.png", "Lesion?", ["Yes, left lobe.", "No."])]
    assert pairs[1].metadata == {"source": "rlaif", "source_format": "trl"}


@pytest.mark.parametrize("record, message", [
    ({"prompt": "p", "chosen": "a"}, r"trl\.jsonl:1 \(id 'x'\): missing key\(s\) \['rejected'\]"),
    ({"chosen": "a", "rejected": "b"}, r"missing key\(s\) \['prompt'\].*extract_prompt"),
    ({"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}], "chosen": "a",
      "rejected": "b"}, r"'prompt' must be a string or one 'user' message; got messages with roles "
                        r"\['system', 'user'\]"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "images": ["1.png", "2.png"]}, r"at most one image"),
    ({"prompt": "p", "chosen": "", "rejected": "b"}, r"'chosen' must hold non-empty text"),
])
def test_bad_trl_records_are_one_line_errors_naming_the_line(tmp_path, record, message):
    path = write_jsonl(tmp_path / "trl.jsonl", [{"id": "x", **record}])
    with pytest.raises(DataFormatError, match=message):
        load_preference_jsonl(path)


def test_export_command_never_overwrites_without_the_flag(tmp_path, capsys):
    lists = write_jsonl(tmp_path / "lists.jsonl", LISTS[1:2])
    out = tmp_path / "pairs.jsonl"
    assert main(["--format", "trl", "--preferences", str(lists), "--out", str(out)]) == 0
    assert main(["--format", "trl", "--preferences", str(lists), "--out", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["--format", "trl", "--preferences", str(lists), "--out", str(lists), "--overwrite"]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert json.loads(lists.read_text())["id"] == "b"
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{**LISTS[0], "response_images": ["a.png", "b.png", "c.png"]}])
    assert main(["--format", "trl", "--preferences", str(mixed), "--out", str(tmp_path / "m.jsonl")]) == 2
    assert "different images" in capsys.readouterr().err
