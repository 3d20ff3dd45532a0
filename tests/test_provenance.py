"""The commit every result file records."""
import subprocess

from hscr_fast.runtime.provenance import REPOSITORY, source_commit


def git(root, *args):
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


def test_source_commit_is_head_and_says_when_tracked_files_differ(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("one\n")
    git(tmp_path, "add", "a.txt")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert source_commit(tmp_path) == head
    (tmp_path / "untracked.txt").write_text("not part of the code\n")
    assert source_commit(tmp_path) == head  # untracked files do not make it dirty
    (tmp_path / "a.txt").write_text("two\n")
    assert source_commit(tmp_path) == head + "+dirty"


def test_no_commit_outside_a_checkout(tmp_path):
    assert source_commit(tmp_path / "missing") is None
    assert (REPOSITORY / "hscr_fast" / "runtime" / "provenance.py").is_file()
