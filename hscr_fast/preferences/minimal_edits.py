"""Minimally edited preference pairs for token-level alignment.

    python -m hscr_fast.preferences.minimal_edits --preferences prefs.jsonl --out pairs.jsonl [--max-edited-words 3]

HSCR's dispreferred responses are already minimal edits of y_w: a few image-sensitive tokens replaced. Each pair
(y_w, y_lj) of a preference list becomes a record whose two responses differ only inside `<mask>…</mask>` spans,
found by a word-level diff: the words that differ are marked in both texts. The trainer's token-level KL can then be
restricted to those spans (`--token-kl-scope marked`). Pairs that differ in more than `--max-edited-words` words, or
not at all, are skipped with a reason.
"""
from __future__ import annotations

import difflib
import sys
from collections import Counter
from dataclasses import dataclass, field

from hscr_fast.models.prompting import MARK_CLOSE, MARK_OPEN
from hscr_fast.runtime.errors import exit_code_of
from hscr_fast.runtime.flags import flag_parser, parse_flags, setting
from hscr_fast.runtime.io import JsonlAppender, read_jsonl


def mark_differences(preferred: str, dispreferred: str) -> tuple[str, str, int]:
    """Both texts with their differing word runs wrapped in marks, and the number of words edited (the larger
    side of each differing run)."""
    words_a, words_b = preferred.split(), dispreferred.split()
    marked_a, marked_b, edited = [], [], 0
    for tag, a0, a1, b0, b1 in difflib.SequenceMatcher(a=words_a, b=words_b, autojunk=False).get_opcodes():
        if tag == "equal":
            marked_a += words_a[a0:a1]
            marked_b += words_b[b0:b1]
            continue
        edited += max(a1 - a0, b1 - b0)
        if a1 > a0:
            marked_a.append(MARK_OPEN + " ".join(words_a[a0:a1]) + MARK_CLOSE)
        if b1 > b0:
            marked_b.append(MARK_OPEN + " ".join(words_b[b0:b1]) + MARK_CLOSE)
    return " ".join(marked_a), " ".join(marked_b), edited


def minimal_edit_pairs(record: dict, *, max_edited_words: int) -> tuple[list[dict], Counter]:
    pairs, skipped = [], Counter()
    preferred = record["responses"][0]
    for rank, dispreferred in enumerate(record["responses"][1:], start=1):
        marked_preferred, marked_dispreferred, edited = mark_differences(preferred, dispreferred)
        if edited == 0:
            skipped["no word differs"] += 1
            continue
        if edited > max_edited_words:
            skipped[f"more than {max_edited_words} words edited"] += 1
            continue
        pairs.append({"id": f"{record['id']}-edit{rank}", "image": record["image"], "prompt": record["prompt"],
                      "responses": [marked_preferred, marked_dispreferred], "kind": "minimal-edit",
                      "source_id": record["id"], "edited_words": edited})
    return pairs, skipped


@dataclass
class MinimalEditsConfig:
    preferences: str = field(metadata={"help": "preference lists JSONL (hscr_fast.generate output)"})
    out: str = field(metadata={"help": "output JSONL of marked pairs (resumable)"})
    max_edited_words: int = setting(3, "longest edit kept, in words")


def build_parser():
    return flag_parser(MinimalEditsConfig, prog="python -m hscr_fast.preferences.minimal_edits",
                       description=__doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        (args,) = parse_flags(build_parser(), argv)
        write_minimal_edits(args.preferences, args.out, max_edited_words=args.max_edited_words)

    return exit_code_of(body)


def write_minimal_edits(preferences, out_path, *, max_edited_words: int) -> None:
    skipped, written = Counter(), 0
    with JsonlAppender(out_path) as out:
        for record in read_jsonl(preferences):
            pairs, reasons = minimal_edit_pairs(record, max_edited_words=max_edited_words)
            skipped.update(reasons)
            for pair in pairs:
                if pair["id"] not in out.ids:
                    out.append(pair)
                    written += 1
    print(f"{written} minimal-edit pairs written to {out_path}; skipped: {dict(skipped) or 'none'}")


if __name__ == "__main__":
    sys.exit(main())
