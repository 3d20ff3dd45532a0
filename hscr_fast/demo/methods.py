"""HSCR's sibling methods on the demo world, each trained on the same engine and scored like the HSCR demo.

    python -m hscr_fast.demo.methods --method mmedpo       # weighted DPO on lesion-region noise pairs
    python -m hscr_fast.demo.methods --method token-level  # minimal edits + token KL + visual grounding

- `mmedpo` (Zhu et al., ICML 2025): image-side dispreference. The preferred response is the phantom answer under the
  clean image; the dispreferred one is the same answer under the image with its lesion region replaced by Gaussian
  noise (`hscr_fast.preferences.image_preferences`, mode `replace`). Loss: weighted DPO, β = 0.1, w · (−log σ(β·Δ)).
  MMedPO's
  weights are clinical-relevance scores from a medical LLM, which the demo cannot run; the stand-in is the lesion's
  share of the image relative to the set's mean (a larger corrupted finding matters more), written into each
  record's `weight` and used as given.
- `token-level` (Mohammadizadehsamakosh et al., 2026): (a) a token-wise bidirectional KL to the reference, α = 0.01,
  λ = 0.5, restricted to the marked clinical spans; (b) a visual-contrastive grounding term: DPO of each answer under
  the clean image over the same answer under the image with Gaussian noise added in the lesion region, weight 0.1;
  (c) minimally edited pairs: each HSCR list's y_w against its dispreferred responses, the differing words marked
  (`hscr_fast.preferences.minimal_edits`). Loss: DPO on (c) and (b) together, plus (a).

Each run writes OUT/<method>/ with the training outputs and `demo_report.md` / `.png` (before = the SFT model).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hscr_fast.runtime.io import read_jsonl

METHODS = ("mmedpo", "token-level")
TRAINING = {"per_device_batch_size": 8, "epochs": 2, "save_steps": 50,
            "warmup_ratio": 0.05, "gamma": 0.1, "deepspeed": "none"}
NUM_SAMPLES = 800
# Per-method learning rates for the tiny demo model. DPO on the same answer under two images has no text-side signal
# to anchor it: at 2e-4 the demo model's generations collapsed (closed exact 81% -> 13%); 5e-5 is stable.
LEARNING_RATES = {"mmedpo": 5e-5, "token-level": 5e-5}


def image_dispreference_records(world, out: Path, *, mode: str, num_samples: int = NUM_SAMPLES) -> Path:
    from hscr_fast.preferences import image_preferences

    path = out / f"image-{mode}.jsonl"
    image_preferences.main(["--source", "phantom", "--data", str(world.train_json), "--image-folder",
                            str(world.image_folder), "--out", str(path), "--out-images",
                            # outside the world's own folders, which the world's completeness check owns; the records
                            # then hold absolute paths for the corrupted images
                            str((out / f"corrupted-{mode}").absolute()), "--mode", mode,
                            "--num-samples", str(num_samples)])
    return path


def with_lesion_weights(source: Path, target: Path) -> Path:
    """MMedPO stand-in weights: each record's corrupted-region size over the set's mean region size."""
    records = read_jsonl(source)
    mean_region = sum(r["corruption"]["region_pixels"] for r in records) / len(records)
    with target.open("w") as handle:
        for record in records:
            record["weight"] = round(record["corruption"]["region_pixels"] / mean_region, 4)
            handle.write(json.dumps(record) + "\n")
    return target


def token_level_records(world, out: Path, *, num_samples: int = NUM_SAMPLES, hscr_lists: Path | None = None) -> Path:
    """(c) minimal-edit pairs from HSCR's own lists (generated here unless `hscr_lists` is given) + (b) grounding
    pairs, in one preference file."""
    from hscr_fast import generate
    from hscr_fast.preferences import minimal_edits

    if hscr_lists is None:
        hscr_lists = out / "hscr-preferences.jsonl"
        generate.main(["--model", str(world.model_dir), "--data", str(world.train_json), "--image-folder",
                       str(world.image_folder), "--out", str(hscr_lists), "--num-samples", str(num_samples),
                       "--batch-size", "16"])
    edits = out / "minimal-edits.jsonl"
    minimal_edits.main(["--preferences", str(hscr_lists), "--out", str(edits)])
    grounding = image_dispreference_records(world, out, mode="add", num_samples=num_samples)
    combined = out / "token-level.jsonl"
    combined.write_text(edits.read_text() + grounding.read_text())
    return combined


def run_method(method: str, out_root: Path, *, learning_rate: float) -> Path:
    from hscr_fast.demo import ensure_demo_world
    from hscr_fast.demo.pipeline import evaluate_before_after
    from hscr_fast.training.config import TrainConfig
    from hscr_fast.training.loop import train

    world = ensure_demo_world()
    out = out_root / method
    out.mkdir(parents=True, exist_ok=True)
    # Each comparison run rebuilds its method's lists in OUT and trains from scratch: it replaces its own last run.
    config = TrainConfig(model=str(world.model_dir), image_folder=str(world.image_folder), out=str(out),
                         overwrite=True, **{**TRAINING, "learning_rate": learning_rate},
                         # both methods' corrupted images live beside the run, not in the world's image folder
                         allow_images_outside_folder=True)
    if method == "mmedpo":
        config.preferences = str(with_lesion_weights(image_dispreference_records(world, out, mode="replace"),
                                                     out / "mmedpo.jsonl"))
        config.loss = "weighted-dpo"
    else:
        config.preferences = str(token_level_records(world, out))
        config.loss = "dpo"
        config.token_kl_weight, config.token_kl_lambda, config.token_kl_scope = 0.01, 0.5, "marked"
        config.kind_weight = ["image-dispreference=0.1"]
    result = train(config)
    report_md, report_png = evaluate_before_after(world, result.adapter_dir, out, method=method)
    print(f"\n{report_md.read_text()}\n[{method}] report: {report_md}\n[{method}] chart: {report_png}")
    return report_md


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hscr_fast.demo.methods", description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--out", default="runs/sibling-methods", help="output root (default: %(default)s)")
    parser.add_argument("--learning-rate", type=float, help="default: the method's entry in LEARNING_RATES")
    args = parser.parse_args(argv)
    run_method(args.method, Path(args.out), learning_rate=args.learning_rate or LEARNING_RATES[args.method])
    return 0


if __name__ == "__main__":
    sys.exit(main())
