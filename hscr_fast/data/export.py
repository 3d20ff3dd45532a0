"""Preference lists out to other trainers' formats, so results can be cross-checked there.

    python -m hscr_fast.data.export --format trl --preferences lists.jsonl --out pairs.jsonl [--conversational]

`--format trl`: every ranked pair of each list (responses[i] ≻ responses[j] for i < j: K+1 choose 2 pairs per list)
as one TRL preference record `{"id", "prompt", "chosen", "rejected"}`, plus `"images": [path]` when the list has an
image (paths as the list gives them, relative to its image folder). Plain strings by default; `--conversational`
writes TRL's conversational form (a user message, assistant messages), which TRL renders with the model's chat
template. Lists whose responses see different images (`response_images`) have no pairwise equivalent in TRL's
format and are refused. `hscr_fast.train` reads these records back as lists of one dispreferred response.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hscr_fast.data.records import IMAGE_TOKEN, DataFormatError, PreferenceRecord, load_preference_jsonl
from hscr_fast.runtime.errors import exit_code_of
from hscr_fast.runtime.io import atomic_write_text

EXPORT_FORMATS = ("trl",)


def trl_pairs(record: PreferenceRecord, *, conversational: bool = False) -> list[dict]:
    """The TRL preference records of one list: one per ranked pair, best-first order preserved."""
    if record.metadata.get("response_images") is not None:
        raise DataFormatError(f"preference id {record.id!r}: its responses see different images (response_images); "
                              "TRL's pairs share one image per prompt, so this list cannot be exported")
    # TRL places a record's images itself (before the user's text); our prompts may carry LLaVA's <image> tag.
    prompt = record.prompt.replace(IMAGE_TOKEN, "").strip()
    pairs = []
    for better in range(len(record.responses)):
        for worse in range(better + 1, len(record.responses)):
            chosen, rejected = record.responses[better], record.responses[worse]
            pair = {"id": f"{record.id}:{better}>{worse}"}
            if conversational:
                pair.update(prompt=[{"role": "user", "content": prompt}],
                            chosen=[{"role": "assistant", "content": chosen}],
                            rejected=[{"role": "assistant", "content": rejected}])
            else:
                pair.update(prompt=prompt, chosen=chosen, rejected=rejected)
            if record.image is not None:
                pair["images"] = [record.image]
            pairs.append(pair)
    return pairs


def export_trl(preferences: str | Path, out: str | Path, *, conversational: bool = False,
               overwrite: bool = False) -> int:
    """Writes every list's ranked pairs to `out` (JSONL, atomically); returns the number of pairs."""
    preferences, out = Path(preferences), Path(out)
    if out.resolve() == preferences.resolve():
        raise DataFormatError(f"{out}: the output would overwrite the input preference file; choose another --out")
    if out.exists() and not overwrite:
        raise DataFormatError(f"{out} exists; pass --overwrite to replace it")
    records, _ = load_preference_jsonl(preferences, on_error="raise")
    lines = [json.dumps(pair, ensure_ascii=False) for record in records
             for pair in trl_pairs(record, conversational=conversational)]
    atomic_write_text(out, "".join(line + "\n" for line in lines))
    return len(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hscr_fast.data.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="the target trainer's format")
    parser.add_argument("--preferences", required=True, help="preference lists JSONL (responses best first)")
    parser.add_argument("--out", required=True, help="output JSONL")
    parser.add_argument("--conversational", action="store_true",
                        help="TRL's conversational form (messages) instead of plain strings")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)

    def body() -> None:
        count = export_trl(args.preferences, args.out, conversational=args.conversational, overwrite=args.overwrite)
        print(f"wrote {count} preference pairs to {args.out}")

    return exit_code_of(body)


if __name__ == "__main__":
    sys.exit(main())
