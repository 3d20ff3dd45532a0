"""The HSCR paper's ablations, reproduced in miniature on the demo world.

    python -m hscr_fast.demo.ablations [--quick] [--rows NAME ...] [--seeds 0 1 2] [--out bench/results]

Rows (`ROWS`): the SFT model; DPO on y_w vs y_l1 of the HSCR lists; MLPO with the explicit term only, the implicit
term only, and both (HSCR; the paper's Table 4); the stage-1 perturbations pixel-, patch- and latent-level masking
beside visual-token dropout (Table 5); drop ratios 0.3 / 0.5 / 0.9 beside 0.7 (Table 6); the sibling methods
MMedPO-style weighted DPO and token-level KL + grounding; the listwise losses Plackett-Luce and LiPO-λ on the same
lists; and, beyond the paper, HSCR and DPO with an NLL term on y_w (RPO-style). A row whose option this install
lacks is recorded as "not available" with the reason, never approximated.

Protocol, the same for every row:
1. Preference data per seed: the row's lists are built from the SFT model with that seed (stage 1's per-sample
   dropout seed), so seeds vary both the lists and the training.
2. Tuning budget: each trained row tries every learning rate of `LEARNING_RATES` with the first seed and keeps the
   one with the best primary metric on the validation split (`val.json`: its own scans, half of its histories
   agreeing with the image). The test splits are never looked at while choosing.
3. Test: every seed trains at the chosen rate and is scored on both test splits (history agreeing / conflicting
   with the image), with its visual tokens. Mean ± sample standard deviation across seeds.
Primary metric: the mean of closed accuracy and open recall (LLaVA-Med's two Med-VQA scores), in points. Reports are
also scored for hallucinated findings (`hscr_fast.evaluation.hallucination`).

Writes `OUT/ablations-<date>.json` (commit, versions, seeds, settings, every run's numbers, what was not run and why),
`.md` and `.png`; `--quick` writes `ablations-quick-<date>.*`: one seed, one learning rate, a few samples, the smoke
world — a check that every row runs, whose numbers mean nothing. A run with fewer seeds, learning rates or samples than
the protocol is written as `ablations-reduced-<date>.*`, its settings in the file. An existing result file is never
overwritten without
`--overwrite`.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hscr_fast.runtime.io import atomic_output, atomic_write_json, atomic_write_text
from hscr_fast.runtime.provenance import source_commit

# The demo's training recipe (`hscr_fast.demo.pipeline.DEMO_TRAINING`) without its held-out split: rows are compared
# on the validation questions instead.
TRAINING = {"per_device_batch_size": 8, "epochs": 2, "warmup_ratio": 0.05, "deepspeed": "none", "save_steps": 10_000,
            "save_total_limit": 1}
# The same grid for every trained row, spanning "almost no change" to "answers degrade" on the demo world. Measured
# with MLPO on seed 0's lists (validation primary metric; the SFT model: 79.9): 79.6 at 5e-4, 74.8 at 1e-3, 72.6 at
# 2e-3, 71.6 at 5e-3, the reports breaking off into junk tokens at the higher rates.
LEARNING_RATES = (1e-4, 5e-4, 2e-3)
NUM_SAMPLES = 800  # training questions stage 1 reads, as in the demo
VAL_QUESTIONS = 200
TEST_QUESTIONS = 200  # per test split
PRIMARY = "mean of closed accuracy and open recall (points)"


@dataclass(frozen=True)
class Row:
    name: str
    table: str  # which of the paper's tables the row belongs to
    lists: str = "hscr"  # "hscr" (stage 1-2 lists), "mmedpo", "token-level", or "none" (the SFT model)
    perturbation: str = "token"  # stage 1's perturbation: token (visual-token dropout), pixel, patch, latent
    drop_ratio: float = 0.7
    train: tuple[tuple[str, Any], ...] = ()  # TrainConfig overrides

    @property
    def overrides(self) -> dict[str, Any]:
        return dict(self.train)


ROWS = (
    Row("SFT", "baseline", lists="none"),
    Row("DPO (y_w vs y_l1)", "Table 4", train=(("loss", "dpo"),)),
    Row("MLPO explicit only", "Table 4", train=(("implicit", False),)),
    Row("MLPO implicit only", "Table 4", train=(("explicit", False),)),
    Row("HSCR: MLPO explicit + implicit", "Table 4"),
    Row("pixel-level mask", "Table 5", perturbation="pixel"),
    Row("patch-level mask", "Table 5", perturbation="patch"),
    Row("latent-space mask", "Table 5", perturbation="latent"),
    Row("drop ratio 0.3", "Table 6", drop_ratio=0.3),
    Row("drop ratio 0.5", "Table 6", drop_ratio=0.5),
    Row("drop ratio 0.9", "Table 6", drop_ratio=0.9),
    Row("MMedPO-style weighted DPO", "siblings", lists="mmedpo", train=(("loss", "weighted-dpo"),)),
    Row("token-level KL + grounding", "siblings", lists="token-level",
        train=(("loss", "dpo"), ("token_kl_weight", 0.01), ("token_kl_lambda", 0.5), ("token_kl_scope", "marked"),
               ("kind_weight", ("image-dispreference=0.1",)))),
    Row("Plackett-Luce", "listwise losses", train=(("loss", "plackett-luce"),)),
    Row("LiPO-λ", "listwise losses", train=(("loss", "lipo-lambda"),)),
    # Not in the paper: the NLL of y_w beside the preference loss (RPO). Stage 1's dispreferred responses differ from
    # y_w in a token or two, the case where preference losses lower log π(y_w) with log π(y_l); these rows measure
    # whether holding y_w up changes the answer on this world.
    Row("HSCR + NLL on y_w (RPO-style)", "beyond the paper", train=(("chosen_nll_weight", 1.0),)),
    Row("DPO + NLL on y_w (RPO-style)", "beyond the paper", train=(("loss", "dpo"), ("chosen_nll_weight", 1.0))),
)
# The HSCR row is also visual-token dropout at ratio 0.7: Tables 5 and 6 read it as their reference entry.
HSCR_ROW = "HSCR: MLPO explicit + implicit"


@dataclass
class Settings:
    preset: str = "full"
    seeds: tuple[int, ...] = (0, 1, 2)
    learning_rates: tuple[float, ...] = LEARNING_RATES
    num_samples: int = NUM_SAMPLES
    epochs: int = TRAINING["epochs"]
    val_questions: int = VAL_QUESTIONS
    test_questions: int = TEST_QUESTIONS


QUICK = Settings(preset="smoke", seeds=(0,), learning_rates=(5e-5,), num_samples=16, epochs=1, val_questions=8,
                 test_questions=8)


# -- what this install offers ----------------------------------------------------------------------------------------

def _perturbation_choices() -> tuple[str, ...] | None:
    """The choices of `hscr_fast.generate --perturbation`, or None when the command has no such option."""
    from hscr_fast import generate

    for action in generate.build_parser()._actions:
        if "--perturbation" in action.option_strings:
            return tuple(action.choices or ())
    return None


def _perturbation_value(name: str, choices: tuple[str, ...]) -> str | None:
    """The generate choice for one of this module's perturbation names ("pixel" → "pixel" or "pixel-level")."""
    aliases = {"token": ("token", "visual-token", "dropout")}.get(name, (name,))
    return next((choice for choice in choices if choice.startswith(aliases)), None)


def _loss_choices() -> tuple[str, ...]:
    from hscr_fast.training.config import TrainConfig

    loss = next(item for item in dataclasses.fields(TrainConfig) if item.name == "loss")
    return tuple(loss.metadata.get("choices", ()))


def unavailable_reason(row: Row) -> str | None:
    """Why this install cannot run `row` as specified, or None when it can."""
    loss = row.overrides.get("loss")
    if loss and loss not in _loss_choices():
        return f"training has no --loss {loss} (choices: {', '.join(_loss_choices())})"
    if row.perturbation != "token":
        choices = _perturbation_choices()
        if choices is None:
            return "stage 1 (hscr_fast.generate) has no --perturbation option in this install"
        if _perturbation_value(row.perturbation, choices) is None:
            return f"hscr_fast.generate --perturbation offers {', '.join(choices)}, no {row.perturbation}-level mask"
    return None


# -- one run ---------------------------------------------------------------------------------------------------------

def primary_metric(metrics: dict[str, Any]) -> float | None:
    values = [metrics.get(key) for key in ("closed_accuracy", "open_recall") if metrics.get(key) is not None]
    return sum(values) / len(values) if values else None


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    return {"primary": primary_metric(metrics), "closed_accuracy": metrics.get("closed_accuracy"),
            "open_recall": metrics.get("open_recall"),
            "hallucination_rate": metrics.get("report_hallucination_rate"),
            "finding_coverage": metrics.get("finding_coverage")}


class Runner:
    """Builds lists, trains and scores for one world; every artifact lives under `work` and is reused when present
    (lists per (row data, seed), adapters per (row, learning rate, seed))."""

    def __init__(self, world, work: Path, settings: Settings):
        from hscr_fast.demo.world import split_records
        from hscr_fast.evaluation.run import load_eval_records

        self.world, self.work, self.settings = world, work, settings
        self.val = load_eval_records(world.val_json, world.image_folder, limit=settings.val_questions)
        self.test = split_records(load_eval_records(world.test_json, world.image_folder), settings.test_questions)

    def lists(self, row: Row, seed: int) -> Path:
        from hscr_fast import generate
        from hscr_fast.demo import methods

        folder = self.work / "lists" / f"{row.lists}-{row.perturbation}-{row.drop_ratio:g}-seed{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        if row.lists == "token-level":  # minimal edits of the very HSCR lists the HSCR row trains on
            hscr = self.lists(dataclasses.replace(row, lists="hscr"), seed)
        else:
            hscr = folder / "preferences.jsonl"
        if row.lists == "hscr" and not (folder / "preferences.summary.json").is_file():
            argv = ["--model", str(self.world.model_dir), "--data", str(self.world.train_json), "--image-folder",
                    str(self.world.image_folder), "--out", str(hscr), "--num-samples", str(self.settings.num_samples),
                    "--batch-size", "16", "--seed", str(seed), "--drop-ratio", str(row.drop_ratio)]
            if row.perturbation != "token":
                argv += ["--perturbation", _perturbation_value(row.perturbation, _perturbation_choices())]
            if generate.main(argv) != 0:
                raise RuntimeError(f"stage 1-2 failed for {row.name}, seed {seed}")
        if row.lists == "hscr":
            return hscr
        if row.lists == "mmedpo":
            target = folder / "mmedpo.jsonl"
            if not target.is_file():
                methods.with_lesion_weights(methods.image_dispreference_records(
                    self.world, folder, mode="replace", num_samples=self.settings.num_samples), target)
            return target
        target = folder / "token-level.jsonl"
        if not target.is_file():
            methods.token_level_records(self.world, folder, num_samples=self.settings.num_samples, hscr_lists=hscr)
        return target

    def train(self, row: Row, learning_rate: float, seed: int) -> Path:
        from hscr_fast.training.config import TrainConfig
        from hscr_fast.training.loop import train

        out = self.work / "runs" / _slug(row.name) / f"lr{learning_rate:g}-seed{seed}"
        adapter = out / "adapter"
        if (adapter / "adapter_config.json").is_file():
            return adapter
        overrides = {key: list(value) if isinstance(value, tuple) else value for key, value in row.overrides.items()}
        config = TrainConfig(model=str(self.world.model_dir), preferences=str(self.lists(row, seed)),
                             image_folder=str(self.world.image_folder), out=str(out), seed=seed,
                             learning_rate=learning_rate, overwrite=True,  # only an unfinished run of this row is there
                             # the sibling methods' corrupted images (MMedPO's, token-level's grounding pairs) are
                             # written beside their lists, outside the world's image folder
                             allow_images_outside_folder=row.lists in ("mmedpo", "token-level"),
                             **{**TRAINING, "epochs": self.settings.epochs}, **overrides)
        return train(config).adapter_dir

    def score(self, adapter: Path | None, records, out: Path) -> dict[str, Any]:
        from hscr_fast.demo.world import MAX_NEW_TOKENS
        from hscr_fast.evaluation.run import evaluate_vlm, load_model

        metrics_path = out / "metrics.json"
        if metrics_path.is_file():
            return json.loads(metrics_path.read_text())
        vlm = load_model(self.world.model_dir, adapter)
        return evaluate_vlm(vlm, records, out, image_folder=self.world.image_folder,
                            run={"model": str(self.world.model_dir), "adapter": str(adapter) if adapter else None},
                            batch_size=32, max_new_tokens=MAX_NEW_TOKENS, progress=False)

    def test_scores(self, adapter: Path | None, out: Path) -> dict[str, dict[str, Any]]:
        return {split: _summary(self.score(adapter, records, out / split)) for split, records in self.test.items()}

    def run_row(self, row: Row, say) -> dict[str, Any]:
        started = time.perf_counter()
        if row.lists == "none":  # scored on validation too: the yardstick for the trained rows' choices
            validation = {"-": primary_metric(self.score(None, self.val, self.work / "runs" / "sft" / "val"))}
            scores = self.test_scores(None, self.work / "runs" / "sft" / "test")
            return {"learning_rate": None, "validation": validation, "seeds": {"-": scores},
                    "seconds": time.perf_counter() - started}
        validation = {}
        for learning_rate in self.settings.learning_rates:
            adapter = self.train(row, learning_rate, self.settings.seeds[0])
            metrics = self.score(adapter, self.val, adapter.parent / "val")
            validation[f"{learning_rate:g}"] = primary_metric(metrics)
            say(f"{row.name}: lr {learning_rate:g} → validation {validation[f'{learning_rate:g}']}")
        chosen = max(self.settings.learning_rates, key=lambda lr: validation[f"{lr:g}"] or float("-inf"))
        seeds = {}
        for seed in self.settings.seeds:
            adapter = self.train(row, chosen, seed)
            seeds[str(seed)] = self.test_scores(adapter, adapter.parent / "test")
        return {"learning_rate": chosen, "validation": validation, "seeds": seeds,
                "seconds": time.perf_counter() - started}


def _slug(name: str) -> str:
    return "".join(char if char.isalnum() else "-" for char in name.lower()).strip("-")


def aggregate(seeds: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """{split: {metric: {mean, std, n}}} over the seeds' test scores (std: sample std, None with one seed)."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for scores in seeds.values():
        for split, metrics in scores.items():
            for metric, value in metrics.items():
                out.setdefault(split, {}).setdefault(metric, []).append(value)
    result: dict[str, dict[str, dict[str, float | None]]] = {}
    for split, metrics in out.items():
        result[split] = {}
        for metric, values in metrics.items():
            finite = [value for value in values if value is not None]
            result[split][metric] = {
                "mean": statistics.fmean(finite) if finite else None,
                "std": statistics.stdev(finite) if len(finite) > 1 else None, "n": len(finite)}
    return result


# -- the command -----------------------------------------------------------------------------------------------------

def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "platform": platform.platform()}


def _mode(settings: Settings) -> str:
    """"full" only for the documented protocol; "quick" for the CI check; "reduced" for anything else in between."""
    if settings.preset == "smoke":
        return "quick"
    return "full" if settings == Settings() else "reduced"


def run_ablations(rows: list[Row], settings: Settings, *, work: Path, world_root: Path | None = None,
                  progress: bool = True) -> dict[str, Any]:
    from hscr_fast.demo.world import ensure_demo_world

    def say(message: str) -> None:
        if progress:
            print(f"[ablations] {message}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    world = ensure_demo_world(world_root, preset=settings.preset, progress=progress)
    runner = Runner(world, work, settings)
    results = []
    selected = {row.name for row in rows}
    for row in ROWS:
        entry: dict[str, Any] = {"name": row.name, "table": row.table, "lists": row.lists,
                                 "perturbation": row.perturbation, "drop_ratio": row.drop_ratio,
                                 "training": {key: list(v) if isinstance(v, tuple) else v
                                              for key, v in row.overrides.items()}}
        reason = unavailable_reason(row)
        if row.name not in selected:
            entry.update(status="not run", reason="not selected in this invocation (--rows)")
        elif reason:
            entry.update(status="not available", reason=reason)
        else:
            say(f"row {len(results) + 1}/{len(ROWS)}: {row.name}")
            entry.update(status="run", **runner.run_row(row, say))
            entry["test"] = aggregate(entry["seeds"])
        results.append(entry)
    return {"date": datetime.date.today().isoformat(), "commit": source_commit() or "unknown", "versions": _versions(),
            "mode": _mode(settings), "settings": dataclasses.asdict(settings),
            "seconds": time.perf_counter() - started,  # artifacts reused from --work took no time here
            "training": TRAINING, "primary_metric": PRIMARY,
            "world": {"preset": settings.preset, "fingerprint": world.fingerprint,
                      "weights_sha256": world.sft_report.get("weights_sha256")},
            "rows": results}


def _cell(stat: dict[str, Any] | None) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    return f"{stat['mean']:.1f}" + (f" ± {stat['std']:.1f}" if stat.get("std") is not None else "")


TABLE_LEGEND = ("Reports: the share with a hallucinated finding, and the coverage of the true findings. The last "
                "column is the validation score at each learning rate of the grid (first seed), the SFT model's "
                "beside it.")


def ablation_table(result: dict[str, Any]) -> list[str]:
    """The rows that ran, as Markdown table lines (the result file's .md and the README's block share them)."""
    lines = ["| row | paper table | lr | prior-conflicting | prior-agreeing | conflicting: hallucinating reports | "
             "conflicting: coverage | agreeing: hallucinating reports | validation by lr |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in result["rows"]:
        if row["status"] != "run":
            continue
        conflicting, agreeing = row["test"].get("prior-conflicting", {}), row["test"].get("prior-agreeing", {})
        lr = "–" if row["learning_rate"] is None else f"{row['learning_rate']:g}"
        validation = " / ".join("–" if value is None else f"{value:.1f}" for value in row["validation"].values())
        lines.append(f"| {row['name']} | {row['table']} | {lr} | {_cell(conflicting.get('primary'))} | "
                     f"{_cell(agreeing.get('primary'))} | {_cell(conflicting.get('hallucination_rate'))} | "
                     f"{_cell(conflicting.get('finding_coverage'))} | {_cell(agreeing.get('hallucination_rate'))} | "
                     f"{validation or '–'} |")
    return lines


def targets_summary(result: dict[str, Any]) -> str | None:
    """One sentence on the HSCR row against the SFT and DPO rows, in the terms of the demo world's targets: the gain on
    the prior-conflicting split (≥ 5 points and > 3 standard deviations), at least DPO's score there, fewer
    hallucinating reports, and at most 1 point lost on the prior-agreeing split. None when a row is missing."""
    rows = {row["name"]: row for row in result["rows"] if row["status"] == "run"}
    if not {"SFT", HSCR_ROW, "DPO (y_w vs y_l1)"} <= set(rows):
        return None

    def mean(name, split, metric="primary"):
        return rows[name]["test"][split][metric]["mean"]

    hscr = rows[HSCR_ROW]["test"]["prior-conflicting"]["primary"]
    gain = hscr["mean"] - mean("SFT", "prior-conflicting")
    spread = hscr["std"] if hscr["std"] is not None else float("nan")
    against_dpo = hscr["mean"] - mean("DPO (y_w vs y_l1)", "prior-conflicting")
    hallucination = (mean(HSCR_ROW, "prior-conflicting", "hallucination_rate")
                     - mean("SFT", "prior-conflicting", "hallucination_rate"))
    agreeing = mean(HSCR_ROW, "prior-agreeing") - mean("SFT", "prior-agreeing")

    def verdict(met: bool) -> str:
        return "met" if met else "not met"

    def signed(value: float) -> str:
        return f"{round(value, 1) + 0.0:+.1f}"  # + 0.0: no "-0.0"

    return (f"HSCR against the targets, at the learning rate validation chose: prior-conflicting {signed(gain)} "
            f"points over SFT (std {spread:.1f} across seeds; target ≥ +5 and > 3 std: "
            f"{verdict(gain >= 5 and gain > 3 * spread)}), {signed(against_dpo)} against DPO (target ≥ 0: "
            f"{verdict(against_dpo >= 0)}), hallucinating reports {signed(hallucination)} points (target < 0: "
            f"{verdict(hallucination < 0)}), prior-agreeing {signed(agreeing)} points (target ≥ −1: "
            f"{verdict(agreeing >= -1)}).")


def ablations_markdown(result: dict[str, Any]) -> str:
    lines = [f"## Ablations on the demo world ({result['mode']} run, {result['date']}, commit {result['commit']})", "",
             (f"Primary metric: {result['primary_metric']}; mean ± std over seeds {result['settings']['seeds']}; "
              f"learning rate chosen on the validation split from {result['settings']['learning_rates']}. "
              f"{TABLE_LEGEND}"), "", *ablation_table(result)]
    if result.get("note"):
        lines[1:1] = ["", f"Note: {result['note']}"]
    lines += [f"| {row['name']} | {row['table']} | – | {row['status']}: {row['reason']} | | | | | |"
              for row in result["rows"] if row["status"] != "run"]
    if summary := targets_summary(result):
        lines += ["", summary]
    return "\n".join(lines) + "\n"


def plot_ablations(path: Path, result: dict[str, Any]) -> Path:
    """Three panels: the primary metric per row and split on an axis zoomed to the data (differences of a point are
    what the ablations are about), the prior-conflicting split's hallucinating reports and coverage, and each row's
    validation score across the learning-rate grid. Dashed lines: the SFT model."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [row for row in result["rows"] if row["status"] == "run"]
    sft = next((row for row in rows if row["learning_rate"] is None), None)
    figure = Figure(figsize=(max(8.0, 0.75 * len(rows) + 3), 11), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    primary, reports, validation = figure.subplots(3, 1, height_ratios=(1, 1, 1.1))
    positions = range(len(rows))
    width = 0.38

    def stats(split: str, metric: str) -> tuple[list[float], list[float]]:
        values = [row["test"].get(split, {}).get(metric) or {} for row in rows]
        return [v.get("mean") or 0.0 for v in values], [v.get("std") or 0.0 for v in values]

    def bars(axis, series) -> None:
        for offset, (label, split, metric, colour) in zip((-width / 2, width / 2), series):
            means, errors = stats(split, metric)
            axis.bar([i + offset for i in positions], means, width, yerr=errors, capsize=2, color=colour,
                     label=label)
            reference = (sft["test"].get(split, {}).get(metric) or {}).get("mean") if sft is not None else None
            if reference is not None:  # None: the metric does not apply (e.g. a split without reports)
                axis.axhline(reference, color=colour, linestyle="--", linewidth=0.8)
        axis.set_xticks(list(positions), [])
        axis.grid(axis="y", alpha=0.3)
        axis.legend(fontsize=8, loc="lower left")

    bars(primary, (("prior-conflicting split", "prior-conflicting", "primary", "C3"),
                   ("prior-agreeing split", "prior-agreeing", "primary", "C0")))
    means = [m for split in ("prior-conflicting", "prior-agreeing") for m in stats(split, "primary")[0] if m]
    if means:
        primary.set_ylim(max(0.0, min(means) - 4), min(100.0, max(means) + 2))
    primary.set_ylabel("closed accuracy / open recall\nmean (points)")
    primary.set_title(f"Demo-world ablations ({result['mode']} run, {result['date']}); dashed: SFT")
    bars(reports, (("hallucinating reports", "prior-conflicting", "hallucination_rate", "C1"),
                   ("coverage of true findings", "prior-conflicting", "finding_coverage", "C2")))
    reports.set_ylabel("prior-conflicting reports (%)")
    reports.set_xticks(list(positions), [row["name"] for row in rows], rotation=35, ha="right", fontsize=7)

    grid = result["settings"]["learning_rates"]
    for index, row in enumerate(row for row in rows if row["learning_rate"] is not None):
        values = [row["validation"].get(f"{lr:g}") for lr in grid]
        validation.plot(grid, values, marker="o", markersize=3, linewidth=1,
                        color=f"C{index % 10}", linestyle="-" if index < 10 else ":", label=row["name"])
    sft_validation = next(iter(sft["validation"].values()), None) if sft is not None else None
    if sft_validation is not None:
        validation.axhline(sft_validation, color="black", linestyle="--", linewidth=0.8, label="SFT")
    validation.set_xscale("log")
    validation.set_xlabel("learning rate")
    validation.set_ylabel("validation primary metric")
    validation.grid(alpha=0.3)
    validation.legend(fontsize=6, ncol=3)
    with atomic_output(path) as temporary:
        figure.savefig(temporary, format="png")
    return path


def write_results(result: dict[str, Any], out: Path, *, overwrite: bool = False) -> tuple[Path, Path, Path]:
    stem = f"ablations-{'' if result['mode'] == 'full' else result['mode'] + '-'}{result['date']}"
    paths = out / f"{stem}.json", out / f"{stem}.md", out / f"{stem}.png"
    existing = [str(path) for path in paths if path.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass --overwrite to replace it, or --out another folder")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(paths[0], result)
    atomic_write_text(paths[1], ablations_markdown(result))
    plot_ablations(paths[2], result)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hscr_fast.demo.ablations", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, one learning rate, a few samples, the smoke "
                                                             "world: checks that every row runs (numbers meaningless)")
    parser.add_argument("--rows", nargs="+", metavar="NAME", help="run only these rows (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds per row (default: 0 1 2; --quick: 0)")
    parser.add_argument("--learning-rates", nargs="+", type=float,
                        help=f"the grid every trained row chooses from on the validation split (default: "
                             f"{' '.join(f'{lr:g}' for lr in LEARNING_RATES)}); a shorter grid is a smaller tuning "
                             f"budget, the same for every row, and the result file says so")
    parser.add_argument("--num-samples", type=int, help=f"training questions stage 1 reads (default {NUM_SAMPLES})")
    parser.add_argument("--out", default="bench/results", help="folder of the result files (default: %(default)s)")
    parser.add_argument("--work", default="runs/ablations", help="lists, adapters and predictions (reused when "
                                                                 "present; default: %(default)s)")
    parser.add_argument("--world", help="demo world folder (default: $HSCR_DEMO_DIR or the cache; --quick: a smoke "
                                        "world under --work)")
    parser.add_argument("--overwrite", action="store_true", help="replace result files of the same date")
    parser.add_argument("--note", help="a sentence stored in the result file and shown under its table, e.g. which "
                                       "code version made artifacts reused from --work")
    args = parser.parse_args(argv)
    settings = dataclasses.replace(QUICK if args.quick else Settings())
    if args.seeds:
        settings.seeds = tuple(args.seeds)
    if args.learning_rates:
        settings.learning_rates = tuple(args.learning_rates)
    if args.num_samples:
        settings.num_samples = args.num_samples
    known = {row.name for row in ROWS}
    unknown = [name for name in args.rows or [] if name not in known]
    if unknown:
        print(f"error: unknown row(s) {unknown}; rows: {sorted(known)}", file=sys.stderr)
        return 2
    rows = [row for row in ROWS if not args.rows or row.name in args.rows]
    work = Path(args.work) / ("quick" if args.quick else "full")
    # The quick run's smoke world never goes to $HSCR_DEMO_DIR, which holds the full world.
    world = Path(args.world) if args.world else (work / "world" if args.quick else None)
    result = run_ablations(rows, settings, work=work, world_root=world)
    if args.note:
        result["note"] = args.note
    for path in write_results(result, Path(args.out), overwrite=args.overwrite):
        print(f"wrote {path}")
    print(ablations_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
