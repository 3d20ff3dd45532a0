"""hscr_fast.data.records: LLaVA-Med JSON and preference JSONL readers: parsing, and one clear error per bad input."""
import json

import pytest

from hscr_fast.data.records import (
    DataFormatError,
    PreferenceRecord,
    VQARecord,
    count_skip_reasons,
    load_llava_med_json,
    load_preference_jsonl,
    normalize_answer_type,
    write_llava_med_json,
)


def _entry(record_id, image="a.jpg", question="<image>\nIs there a lesion?", answer="yes", **extra):
    return {"id": record_id, "image": image,
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}], **extra}


def _write_json(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_reads_records_strips_image_tag_and_keeps_metadata(tmp_path):
    path = _write_json(tmp_path / "train.json", [
        _entry(0, answer_type=" closed ", organ="CHEST", modality="CT"),
        _entry("b-1", question="Where is it?\n<image>", answer="  right lung ", answer_type="OPEN"),
        _entry(2, question="<image>\nWhat is shown?", answer="a scan"),
    ])
    records, skipped = load_llava_med_json(path)
    assert skipped == []
    assert records[0] == VQARecord(id="0", image="a.jpg", question="Is there a lesion?", answer="yes",
                                   answer_type="CLOSED", metadata={"organ": "CHEST", "modality": "CT"})
    assert (records[1].id, records[1].question, records[1].answer, records[1].answer_type) == \
        ("b-1", "Where is it?", "right lung", "OPEN")
    assert records[2].answer_type is None and records[2].metadata == {}


def test_multi_turn_takes_first_human_gpt_pair(tmp_path):
    entry = {"id": "m", "image": "a.jpg", "conversations": [
        {"from": "human", "value": "<image>\nFirst question?"}, {"from": "gpt", "value": "first answer"},
        {"from": "human", "value": "Second question?"}, {"from": "gpt", "value": "second answer"}]}
    records, _ = load_llava_med_json(_write_json(tmp_path / "d.json", [entry]))
    assert (records[0].question, records[0].answer) == ("First question?", "first answer")


def test_write_then_read_round_trips(tmp_path):
    records = [VQARecord("x1", "dir/s.jpg", "Is it normal?", "no", "CLOSED", {"organ": "HEAD", "qid": 4}),
               VQARecord("x2", "t.png", "Which lobe?", "left upper lobe", None, {})]
    write_llava_med_json(tmp_path / "out.json", records)
    assert load_llava_med_json(tmp_path / "out.json") == (records, [])


def test_image_folder_checks_images_exist(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(b"x")
    path = _write_json(tmp_path / "d.json", [_entry(0), _entry(1, image="gone.jpg")])
    with pytest.raises(DataFormatError, match=r"d\.json: record 1 \(id '1'\): image file not found: .*gone\.jpg"):
        load_llava_med_json(path, tmp_path / "imgs")
    records, skipped = load_llava_med_json(path, tmp_path / "imgs", on_error="skip")
    assert [r.id for r in records] == ["0"] and count_skip_reasons(skipped) == {"missing image": 1}


BAD_ENTRIES = [
    ({"id": 5, "conversations": _entry(0)["conversations"]}, "no image",
     r"record 0 \(id '5'\): missing or empty 'image'"),
    (_entry(5, image="  "), "no image", r"missing or empty 'image'"),
    ({"id": 5, "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nQ?"}]}, "no answer",
     r"record 0 \(id '5'\): no gpt turn \(answer\) after the human question"),
    (_entry(5, answer="   "), "empty answer", r"record 0 \(id '5'\): the gpt answer is empty"),
    (_entry(5, answer=3), "bad conversations", r"conversations\[1\] \(gpt\) value must be a string"),
    ({"id": 5, "image": "a.jpg"}, "bad conversations", r"'conversations' must be a non-empty list"),
    ({"id": 5, "image": "a.jpg", "conversations": [{"from": "gpt", "value": "x"}]}, "no question", "no human turn"),
    (_entry(5, answer_type="yes/no"), "bad answer_type", r"answer_type must be CLOSED or OPEN, got 'yes/no'"),
    (_entry(None), "no id", r"record 0: missing or empty 'id'"),
    (["not", "a", "dict"], "not an object", r"record 0: expected a JSON object, got list"),
]


@pytest.mark.parametrize("entry,reason,message", BAD_ENTRIES, ids=[b[1] + str(i) for i, b in enumerate(BAD_ENTRIES)])
def test_bad_record_raises_one_clear_line_or_is_skipped(tmp_path, entry, reason, message):
    path = _write_json(tmp_path / "bad.json", [entry, _entry("good")])
    with pytest.raises(DataFormatError, match=message) as raised:
        load_llava_med_json(path)
    assert str(raised.value).startswith(str(path)) and "\n" not in str(raised.value)
    records, skipped = load_llava_med_json(path, on_error="skip")
    assert [r.id for r in records] == ["good"]
    assert [s.reason for s in skipped] == [reason]


def test_duplicate_ids_are_rejected_even_across_types(tmp_path):
    path = _write_json(tmp_path / "d.json", [_entry(1), _entry("2"), _entry("1")])
    with pytest.raises(DataFormatError, match=r"record 2 \(id '1'\): id already used by record 0"):
        load_llava_med_json(path)
    records, skipped = load_llava_med_json(path, on_error="skip")
    assert [r.id for r in records] == ["1", "2"] and count_skip_reasons(skipped) == {"duplicate id": 1}


def test_skip_counts_by_reason(tmp_path):
    path = _write_json(tmp_path / "d.json", [_entry(0, answer=""), _entry(1, answer=" "), _entry(2, image=None),
                                             _entry(3)])
    records, skipped = load_llava_med_json(path, on_error="skip")
    assert len(records) == 1
    assert count_skip_reasons(skipped) == {"empty answer": 2, "no image": 1}
    assert [s.record_id for s in skipped] == ["0", "1", "2"]


def test_wrong_file_shapes_say_what_they_are(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps(_entry(0)) + "\n" + json.dumps(_entry(1)) + "\n")
    with pytest.raises(DataFormatError, match=r"d\.jsonl: looks like JSONL .*line 2.*wrap the records in \[ \.\.\. \]"):
        load_llava_med_json(jsonl)
    as_dict = _write_json(tmp_path / "dict.json", {"0": _entry(0)})
    with pytest.raises(DataFormatError, match=r"dict\.json: expected a JSON list of LLaVA-Med records, got a JSON "
                                              r"object with keys \[0\]"):
        load_llava_med_json(as_dict)
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": 0,\n "image": }]')
    with pytest.raises(DataFormatError, match=r"broken\.json:2:\d+: invalid JSON"):
        load_llava_med_json(broken)
    with pytest.raises(DataFormatError, match=r"nothing\.json: file not found"):
        load_llava_med_json(tmp_path / "nothing.json")
    with pytest.raises(ValueError, match="on_error"):
        load_llava_med_json(as_dict, on_error="ignore")
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes('[{"id": "é"}]'.encode("latin-1"))
    with pytest.raises(DataFormatError, match=r"latin1\.json: not UTF-8 text"):
        load_llava_med_json(latin1)


def test_normalize_answer_type():
    assert [normalize_answer_type(v) for v in ("CLOSED", " CLOSED ", "open", None, "")] == \
        ["CLOSED", "CLOSED", "OPEN", None, None]
    with pytest.raises(ValueError):
        normalize_answer_type(1)


# ---------------------------------------------------------------------------------------------------------------------
# Preference JSONL


def _pref(record_id, **overrides):
    entry = {"id": record_id, "image": "a.jpg", "prompt": "Is there a lesion?",
             "responses": ["yes, in the left lobe", "yes, in the right lobe", "no"], "similarity": [0.8, 0.3]}
    entry.update(overrides)
    return entry


def _write_jsonl(path, lines):
    # str lines are written as given, in latin-1, so a test can plant bytes that are not UTF-8
    path.write_bytes(b"".join((line.encode("latin-1") if isinstance(line, str) else json.dumps(line).encode())
                              + b"\n" for line in lines))
    return path


def test_reads_preference_lines(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [_pref("a", weight=0.5, source_id="vqa-rad-train-0"), "", _pref(3)])
    records, skipped = load_preference_jsonl(path)
    assert skipped == []
    assert records[0] == PreferenceRecord(id="a", image="a.jpg", prompt="Is there a lesion?",
                                          responses=["yes, in the left lobe", "yes, in the right lobe", "no"],
                                          similarity=[0.8, 0.3], weight=0.5, metadata={"source_id": "vqa-rad-train-0"})
    assert records[1].id == "3" and records[1].weight is None


BAD_PREFERENCE_LINES = [
    ('{"id": "x", "image": ', "invalid JSON", r"p\.jsonl:2: invalid JSON"),
    ('[1, 2]', "invalid JSON", r"p\.jsonl:2: expected a JSON object per line, got list"),
    ({"id": "x", "image": "a.jpg", "responses": ["a", "b"]}, "missing keys",
     r"p\.jsonl:2 \(id 'x'\): missing key\(s\) \['prompt'\]"),
    (_pref("x", responses=[]), "empty responses", r"p\.jsonl:2 \(id 'x'\): 'responses' must be a non-empty list"),
    (_pref("x", responses="yes"), "empty responses", r"'responses' must be a non-empty list"),
    (_pref("x", responses=["yes", ""]), "bad response", r"p\.jsonl:2 \(id 'x'\): responses\[1\] must be a non-empty"),
    (_pref("x", responses=["yes", 2]), "bad response", r"responses\[1\] must be a non-empty string, got 2"),
    (_pref("x", responses=["yes"]), "too few responses", r"1 response\(s\); need at least 2"),
    (_pref("x", image=""), "no image", r"'image'"),
    (_pref("x", similarity=["high"]), "bad similarity", r"'similarity' must be a list of finite numbers"),
    (_pref("x", weight=-1), "bad weight", r"'weight' must be a finite number >= 0"),
    (_pref("first"), "duplicate id", r"p\.jsonl:2 \(id 'first'\): id already used on line 1"),
    ('{"id": "caf\xe9"}', "invalid JSON", r"p\.jsonl:2: not UTF-8 text"),
]


@pytest.mark.parametrize("line,reason,message", BAD_PREFERENCE_LINES,
                         ids=[b[1] + str(i) for i, b in enumerate(BAD_PREFERENCE_LINES)])
def test_bad_preference_line_names_its_line(tmp_path, line, reason, message):
    path = _write_jsonl(tmp_path / "p.jsonl", [_pref("first"), line, _pref("last")])
    with pytest.raises(DataFormatError, match=message) as raised:
        load_preference_jsonl(path)
    assert "\n" not in str(raised.value)
    records, skipped = load_preference_jsonl(path, on_error="skip")
    assert [r.id for r in records] == ["first", "last"]
    assert [s.reason for s in skipped] == [reason]


def test_preference_missing_image_reports_line_and_path(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(b"x")
    path = _write_jsonl(tmp_path / "p.jsonl", [_pref("ok"), _pref("lost", image="sub/b.jpg")])
    with pytest.raises(DataFormatError, match=r"p\.jsonl:2 \(id 'lost'\): image file not found: .*imgs/sub/b\.jpg"):
        load_preference_jsonl(path, tmp_path / "imgs")
    assert len(load_preference_jsonl(path)[0]) == 2  # without an image folder images are not checked
    with pytest.raises(DataFormatError, match=r"none\.jsonl: file not found"):
        load_preference_jsonl(tmp_path / "none.jsonl")
