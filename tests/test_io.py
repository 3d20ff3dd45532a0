"""hscr_fast.runtime.io: atomic whole-file writes, resumable JSONL appends with torn-line recovery, line-numbered
reads."""
import json
import logging

import pytest

from hscr_fast.runtime.io import (
    JsonlAppender,
    JsonlError,
    atomic_output,
    atomic_write_json,
    atomic_write_text,
    read_jsonl,
)


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_text_and_json_replace_whole_file(tmp_path):
    target = tmp_path / "sub" / "report.json"
    atomic_write_json(target, {"a": 1, "text": "é"})
    assert json.loads(target.read_text(encoding="utf-8")) == {"a": 1, "text": "é"}
    atomic_write_text(target, "second version\n")
    assert target.read_text() == "second version\n"
    assert _leftovers(target.parent) == []


def test_failed_write_leaves_old_file_intact_and_no_temporary(tmp_path):
    target = tmp_path / "data.json"
    atomic_write_json(target, [1, 2, 3])

    with pytest.raises(RuntimeError, match="crash mid-write"):
        with atomic_output(target) as temporary:
            temporary.write_text('[1, 2, 3, 4, 5, 6')  # half of the new content is on disk...
            raise RuntimeError("crash mid-write")  # ...when the writer dies
    assert json.loads(target.read_text()) == [1, 2, 3]
    assert _leftovers(tmp_path) == []

    # An object that cannot be serialised fails before the disk is touched.
    with pytest.raises(TypeError):
        atomic_write_json(target, {"bad": object()})
    assert json.loads(target.read_text()) == [1, 2, 3]
    assert _leftovers(tmp_path) == []


def test_failed_first_write_leaves_no_file(tmp_path):
    target = tmp_path / "new.txt"
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(target) as temporary:
            temporary.write_text("partial")
            raise KeyboardInterrupt
    assert not target.exists()
    assert _leftovers(tmp_path) == []


def test_read_jsonl_reports_line_numbers(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"id": 1}\n\n{"id": 2}\n')
    assert read_jsonl(path) == [{"id": 1}, {"id": 2}]

    path.write_text('{"id": 1}\n{"id": 2\n{"id": 3}\n')
    with pytest.raises(JsonlError, match=r"a\.jsonl:2: invalid JSON"):
        read_jsonl(path)

    path.write_text('{"id": 1}\n[1, 2]\n')
    with pytest.raises(JsonlError, match=r"a\.jsonl:2: expected a JSON object per line, got list"):
        read_jsonl(path)

    path.write_text('{"id": 1}\n{"id": 2, "te')
    with pytest.raises(JsonlError, match=r"a\.jsonl:2: .*last line is incomplete.*JsonlAppender"):
        read_jsonl(path)

    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_appender_writes_flushed_lines_and_tracks_ids(tmp_path):
    path = tmp_path / "out" / "progress.jsonl"
    with JsonlAppender(path) as out:
        assert out.ids == set() and out.num_existing == 0
        out.append({"id": "a", "value": 1})
        # Flushed per record: another reader sees it before close.
        assert read_jsonl(path) == [{"id": "a", "value": 1}]
        out.append({"id": 7, "value": "ü"})
        with pytest.raises(ValueError, match="already in the file"):
            out.append({"id": "a", "value": 3})
        assert out.ids == {"a", "7"}
    assert read_jsonl(path) == [{"id": "a", "value": 1}, {"id": 7, "value": "ü"}]
    with pytest.raises(ValueError, match="closed"):
        out.append({"id": "b"})


def test_appender_resume_exposes_existing_ids(tmp_path):
    path = tmp_path / "progress.jsonl"
    with JsonlAppender(path, fsync=True) as out:
        for sample_id in ("s0", "s1", "s2"):
            out.append({"id": sample_id})
    samples = ["s0", "s1", "s2", "s3", "s4"]
    with JsonlAppender(path) as out:
        assert out.ids == {"s0", "s1", "s2"} and out.num_existing == 3
        for sample_id in samples:
            if sample_id not in out.ids:
                out.append({"id": sample_id})
    assert [record["id"] for record in read_jsonl(path)] == samples


@pytest.mark.parametrize("torn_tail", [
    b'{"id": "s2", "answ',            # cut off mid-record, no newline
    b'{"id": "s2", "answer": "x"',    # cut off just before the closing brace
    b'\x00\x00\x00\x00',              # zero-filled tail after a power loss
    b'{"id": "s2", "text": "\xc3',    # cut inside a multi-byte UTF-8 character
    b'{"id": "s2", "ans\n',           # garbage that did get a newline
])
def test_appender_truncates_torn_last_line(tmp_path, caplog, torn_tail):
    path = tmp_path / "progress.jsonl"
    good = b'{"id": "s0"}\n{"id": "s1"}\n'
    path.write_bytes(good + torn_tail)
    with caplog.at_level(logging.WARNING, logger="hscr_fast.runtime.io"):
        out = JsonlAppender(path)
    assert "torn last line" in caplog.text and "progress.jsonl:3" in caplog.text
    assert out.ids == {"s0", "s1"}
    assert path.read_bytes() == good
    out.append({"id": "s2", "answer": "x"})
    out.close()
    assert [r["id"] for r in read_jsonl(path)] == ["s0", "s1", "s2"]


def test_appender_keeps_complete_last_record_without_newline(tmp_path, caplog):
    path = tmp_path / "progress.jsonl"
    path.write_bytes(b'{"id": "s0"}\n{"id": "s1"}')
    with caplog.at_level(logging.WARNING, logger="hscr_fast.runtime.io"):
        with JsonlAppender(path) as out:
            assert out.ids == {"s0", "s1"}
            out.append({"id": "s2"})
    assert "torn" not in caplog.text
    assert [r["id"] for r in read_jsonl(path)] == ["s0", "s1", "s2"]


def test_appender_refuses_corruption_in_the_middle(tmp_path):
    path = tmp_path / "progress.jsonl"
    original = b'{"id": "s0"}\n{"id": "s1\n{"id": "s2"}\n'
    path.write_bytes(original)
    with pytest.raises(JsonlError, match=r"progress\.jsonl:2: invalid JSON line followed by further records"):
        JsonlAppender(path)
    assert path.read_bytes() == original  # nothing deleted


def test_appender_without_ids(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with JsonlAppender(path, id_key=None) as out:
        out.append({"step": 1, "loss": 0.5})
        out.append({"step": 1, "loss": 0.5})
        assert out.ids == set()
    assert len(read_jsonl(path)) == 2


def test_atomic_files_get_ordinary_permissions(tmp_path):
    import os

    from hscr_fast.runtime.io import atomic_write_text

    mask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "report.md", "x")
        assert (tmp_path / "report.md").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(mask)


def test_atomic_directory_swaps_in_whole_or_not_at_all(tmp_path):
    from hscr_fast.runtime.io import atomic_directory

    target = tmp_path / "model"
    with atomic_directory(target) as staging:
        (staging / "weights.bin").write_text("v1")
    assert (target / "weights.bin").read_text() == "v1" and oct(target.stat().st_mode & 0o777) != oct(0o700)
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as staging:
            (staging / "weights.bin").write_text("half")
            raise RuntimeError("killed mid-write")
    assert (target / "weights.bin").read_text() == "v1"  # the old folder is untouched
    with atomic_directory(target) as staging:
        (staging / "other.bin").write_text("v2")
    assert sorted(p.name for p in target.iterdir()) == ["other.bin"]  # replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging or retired folder left


@pytest.mark.parametrize("foreign", [
    b'[{"id": "a", "conversations": []}, {"id": "b"}]',  # a compact JSON list (the VQA-RAD / SLAKE files' layout)
    b'[{"id": "a"}]\n',
    b'"just a string"',
    b'not json at all, no newline',                        # no complete record proves it is this writer's file
    b'{"id": "s0", "ans',                                  # even a torn record: nothing before it proves ownership
])
def test_appender_never_truncates_a_file_it_cannot_prove_it_wrote(tmp_path, foreign):
    path = tmp_path / "data.json"
    path.write_bytes(foreign)
    with pytest.raises(JsonlError, match=r"data\.json:1: .*left untouched"):
        JsonlAppender(path)
    assert path.read_bytes() == foreign


def test_appender_drops_a_torn_line_only_after_records_it_owns(tmp_path):
    path = tmp_path / "prefs.jsonl"
    theirs = b'{"id": "s0", "args_fingerprint": "other"}\n{"id": "s1", "ans'
    path.write_bytes(theirs)
    with pytest.raises(JsonlError, match="left untouched"):
        JsonlAppender(path, owns=lambda record: record.get("args_fingerprint") == "mine")
    assert path.read_bytes() == theirs
    path.write_bytes(b'{"id": "s0", "args_fingerprint": "mine"}\n{"id": "s1", "ans')
    with JsonlAppender(path, owns=lambda record: record.get("args_fingerprint") == "mine") as out:
        assert out.ids == {"s0"}
    assert path.read_bytes() == b'{"id": "s0", "args_fingerprint": "mine"}\n'


def test_outputs_over_inputs_are_refused(tmp_path):
    from hscr_fast.runtime.io import OutputOverInputError, refuse_outputs_over_inputs

    (tmp_path / "model").mkdir()
    data = tmp_path / "train.json"
    data.write_text("[]")
    (tmp_path / "link.json").symlink_to(data)
    inputs = {"--data": data, "--model": tmp_path / "model", "--image-folder": tmp_path}
    for out, why in ((data, "is the --data input"), (tmp_path / "link.json", "is the --data input"),
                     (tmp_path / "model" / "prefs.jsonl", "lies inside the --model input"),
                     (tmp_path, "is the --image-folder input")):
        with pytest.raises(OutputOverInputError, match=f"--out {out.resolve()} {why}"):
            refuse_outputs_over_inputs({"--out": out}, inputs)
    refuse_outputs_over_inputs({"--out": tmp_path / "prefs.jsonl"}, inputs)  # beside the images is fine
    assert data.read_text() == "[]"


def test_json_error_message_reads_as_english(tmp_path):
    from hscr_fast.runtime.io import parse_jsonl_line

    with pytest.raises(JsonlError) as caught:
        parse_jsonl_line('{"id": "a", "text": "cut', tmp_path / "p.jsonl", 3)
    assert str(caught.value).endswith("p.jsonl:3: invalid JSON (Unterminated string starting at column 21)")
    with pytest.raises(JsonlError, match=r"invalid JSON \(Expecting value at column 8\)"):
        parse_jsonl_line('{"id": }', tmp_path / "p.jsonl", 1)
