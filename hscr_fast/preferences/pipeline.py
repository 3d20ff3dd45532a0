"""HSCR Stages 1–2 — preference lists from an SFT model and its SFT data (the work of `python -m hscr_fast.generate`).

Per batch of samples: Stage 1 (`hscr_fast.preferences.selfcontrast`: two batched teacher-forced forwards, contrastive
selection,
graded variants), then Stage 2 (`hscr_fast.preferences.rerank`: similarity-aware re-ranking with one embedding call).

Files, for `--out prefs.jsonl`:
- `prefs.jsonl`: one line per prompt: id, image, prompt (the question), responses [y_w, y_l1, ... best-first; y_w is
  the data's answer text, each y_l a decoded Stage 1 variant], similarity (cosine to y_w's text under the embedding
  model, aligned with responses: y_w's own 1.0 first), k, num_replaced (positions replaced in
  each y_l), sensitive [{position, token, token_id, replacement, replacement_id, sensitivity}] in replacement order
  (positions index y_w's answer tokens, EOS last), variants_considered (distinct Stage 1 variants re-ranked),
  answer_type when the data has one, and args_fingerprint;
- `prefs.skipped.jsonl`: every sample left out, {id, image, stage, reason, message, args_fingerprint}: stage "input"
  for records the data reader rejects (empty answer, no question, duplicate id, ...), "generate" for the rest
  (image_outside_folder, missing_image, unreadable_image, too_long, no_sensitive_positions, and Stage 2's
  no_variant_differs_from_preferred);
- `prefs.summary.json`: counts (read, selected, written, skipped by reason, not selected), mean k, samples/s, args.

Resuming. Records are appended and flushed one by one; a re-run with the same arguments reads the finished ids
(written or skipped), drops a torn last line, and computes only what is missing. Batches are fixed slices of the input
(batch b = selected samples [b·B, (b+1)·B)); a batch with any missing sample is recomputed whole and only the missing
lines are written, so every sample is always computed in the same batch and a resumed file is byte-identical to an
uninterrupted one. The settings that decide a record's content (the method's arguments, model, data file, image folder
and batch size, which changes the last bits of the numbers) go into `prefs.settings.json` with a content hash of each
selected input record, and their hash onto every line (`args_fingerprint`); a rerun with another setting or an edited
record is refused, naming what differs. A sample skipped at the generate stage counts as finished: to retry it (say,
after restoring its image), delete its line from the skip file.

Several processes (torchrun, WORLD_SIZE > 1; gloo on CPU, nccl on GPU): batch b goes to rank b % world (sharding by
batch rather than by sample keeps every batch's composition, hence every number, independent of the world size).
Each rank appends to its own part file; after a barrier rank 0 merges everything in input order into the output.

--num-samples N takes the first N records the reader accepts, in file order (0 = all).
"""
from __future__ import annotations

import json
import math
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from hscr_fast.preferences.config import GenerateConfig
from hscr_fast.runtime.distributed import ProcessGroup
from hscr_fast.runtime.io import (
    JsonlAppender,
    JsonlError,
    OutputFiles,
    atomic_write_json,
    atomic_write_text,
    check_writable,
    refuse_outputs_over_inputs,
)
from hscr_fast.runtime.precision import resolve_dtype
from hscr_fast.runtime.resume import (
    check_same_arguments,
    check_same_settings,
    content_hash,
    fingerprint_of,
    record_settings,
)

FINGERPRINT_ARGS = ("seed", "perturbation", "drop_ratio", "dropout_mode", "sensitivity", "min_sensitivity", "beta",
                    "top_n", "alpha", "replacement", "num_alternatives",
                    "num_candidates", "num_variants", "num_dispreferred", "min_gap", "similarity_model", "mode",
                    "max_length", "include_punctuation", "dtype")
STAGE_INPUT, STAGE_GENERATE = "input", "generate"


# -- files ------------------------------------------------------------------------------------------------------------
class OutputPaths(OutputFiles):
    def writers(self, rank: int, world: int) -> tuple[Path, Path]:
        """Where a rank appends (records, skips): the final files for one process, hidden part files otherwise."""
        if world == 1:
            return self.out, self.skipped
        return self._part(self.out, rank), self._part(self.skipped, rank)

    @staticmethod
    def _part(path: Path, rank: int) -> Path:
        return path.with_name(f".{path.name}.rank{rank}.part")

    def all_parts(self, path: Path) -> list[Path]:
        return sorted(path.parent.glob(f".{path.name}.rank*.part"))


def read_records(path: Path) -> list[dict]:
    """The complete records of a JSONL file another process may have been killed while writing: a torn last line is
    ignored (its owner drops it when it reopens the file); any other bad line is an error naming the line."""
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")
    records = []
    for line_number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw.decode("utf-8"))
            if not isinstance(value, dict):
                raise ValueError("not a JSON object")
        except ValueError as error:
            if any(later.strip() for later in lines[line_number:]):
                raise JsonlError(f"{path}:{line_number}: invalid line ({error}) followed by further records; the "
                                 f"file is corrupted, not just cut off — fix or remove that line") from None
            break
        records.append(value)
    return records


def output_settings(config: GenerateConfig, dtype: str, model_dir, data_path, image_folder) -> dict:
    """Everything that decides a record's content: the method's arguments (with the dtype `auto` resolved to), the
    model, the data file, the image folder, and the batch size (which samples share a batch changes the last bits of
    their numbers). Not the device, --num-samples or --out."""
    flags = {**config.flags(), "dtype": dtype}
    values = {name: flags[name] for name in FINGERPRINT_ARGS}
    values.update(model=str(Path(model_dir).resolve()), data=str(Path(data_path).resolve()),
                  image_folder=str(Path(image_folder).resolve()), batch_size=config.execution.batch_size)
    return values


def finished_ids(paths: OutputPaths, fingerprint: str) -> set[str]:
    """Ids already written or skipped at the generate stage, in the output, the skip file or any rank's part file."""
    sources = [(path, False) for path in [paths.out, *paths.all_parts(paths.out)]]
    sources += [(path, True) for path in [paths.skipped, *paths.all_parts(paths.skipped)]]
    done = set()
    for path, is_skip_file in sources:
        for line in read_records(path):
            if is_skip_file and line.get("stage") != STAGE_GENERATE:
                continue  # input-stage skips are re-derived from the data file on every run
            check_same_arguments(path, line, fingerprint)
            done.add(str(line["id"]))
    return done


def skip_line(sample_id, image, stage: str, reason: str, message: str, fingerprint: str, **facts) -> dict:
    """A skip file line; `facts` (answer_kind, normal_scan) describe the sample for the summary."""
    return {"id": sample_id, "image": image, "stage": stage, "reason": reason, "message": message, **facts,
            "args_fingerprint": fingerprint}


# -- one batch --------------------------------------------------------------------------------------------------------
@dataclass
class LoadedBatch:
    batch: list  # the batch as sharded (its composition fixes the numbers)
    records: list  # those whose image loaded
    pixel_values: object  # vlm.preprocess_images of the records' images (one per record), or None
    skips: list[dict]


@dataclass
class BatchOutput:
    records: list[dict]
    skips: list[dict]
    shown: list[str]


class PreferenceBuilder:
    """Stages 1 and 2 for batches of `VQARecord`s, producing output records and skip lines."""

    def __init__(self, config: GenerateConfig, vlm, similarity, image_folder: Path, fingerprint: str):
        from hscr_fast.preferences.selfcontrast import SelfContrast

        self.config = config
        self.vlm = vlm
        self.similarity = similarity
        self.image_folder = image_folder
        self.fingerprint = fingerprint
        self.contrast = SelfContrast(vlm, config.stage1)
        self.max_length = config.limits.max_length or vlm.config.text_config.max_position_embeddings

    def facts(self, record, num_content: int | None = None) -> dict:
        """The answer's kind and whether the image is a normal scan (None where the data does not say)."""
        from hscr_fast.preferences.list_summary import answer_kind, is_normal_scan

        if num_content is None:
            num_content = sum(self.contrast.content.mask(
                self.contrast.prepare(record.id, record.question, record.answer).answer_ids))
        return {"answer_kind": answer_kind(record.answer, num_content), "normal_scan": is_normal_scan(record.metadata)}

    def skip(self, record, reason: str, message: str, num_content: int | None = None) -> dict:
        return skip_line(record.id, record.image, STAGE_GENERATE, reason, message, self.fingerprint,
                         **self.facts(record, num_content))

    def load(self, batch) -> LoadedBatch:
        """Images of a batch, read and preprocessed (runs in the loader thread while the model works on the batch
        before): unreadable ones become skip lines."""
        from hscr_fast.data.images import ImageLoadError, ImageOutsideFolderError, image_in_folder, load_image

        loaded, images, skips = [], [], []
        for record in batch:
            try:
                image_path = image_in_folder(self.image_folder, record.image,
                                             allow_outside=self.config.inputs.allow_images_outside_folder)
            except ImageOutsideFolderError as error:
                skips.append(self.skip(record, "image_outside_folder", str(error)))
                continue
            if not image_path.is_file():
                skips.append(self.skip(record, "missing_image", f"image file not found: {image_path}"))
                continue
            try:
                images.append(load_image(image_path))
            except ImageLoadError as error:
                skips.append(self.skip(record, "unreadable_image", str(error)))
                continue
            loaded.append(record)
        pixel_values = self.vlm.preprocess_images(images) if images else None
        return LoadedBatch(batch, loaded, pixel_values, skips)

    def build(self, loaded: LoadedBatch, *, show: int = 0) -> BatchOutput:
        """Stages 1-2 for every loaded sample of the batch (fixed batch composition: the caller writes only the lines
        it still needs)."""
        from hscr_fast.preferences.rerank import rerank_batch

        skips, ready, prepared, keep = list(loaded.skips), [], [], []
        token_counts = self.vlm.visual_token_counts(loaded.pixel_values) if loaded.records else []
        for index, record in enumerate(loaded.records):
            sample = self.contrast.prepare(record.id, record.question, record.answer)
            length = self.contrast.sequence_length(sample, token_counts[index])
            if length > self.max_length:
                skips.append(self.skip(record, "too_long", f"prompt + visual tokens + answer = {length} tokens > "
                                                           f"--max-length {self.max_length}"))
                continue
            ready.append(record)
            prepared.append(sample)
            keep.append(index)
        images = loaded.pixel_values[keep] if prepared else []

        results = self.contrast.run(prepared, images)
        scored = [(record, result) for record, result in zip(ready, results) if result.sensitive]
        for record, result in zip(ready, results):
            if not result.sensitive:
                skips.append(self.skip(record, "no_sensitive_positions",
                                       "no content token the image supports could be replaced", result.num_content))
        reranked = rerank_batch([record.answer for record, _ in scored],
                                [[variant.text for variant in result.variants] for _, result in scored],
                                self.similarity, num_dispreferred=self.config.rerank.num_dispreferred,
                                min_gap=self.config.rerank.min_gap)
        records, shown = [], []
        for (record, result), ranking in zip(scored, reranked):
            if ranking.skip_reason is not None:
                skips.append(self.skip(record, ranking.skip_reason, "Stage 2 kept no dispreferred response",
                                       result.num_content))
                continue
            records.append(self.output_record(record, result, ranking))
            if len(shown) < show:
                shown.append(self.render(record, result, ranking))
        order = {record.id: index for index, record in enumerate(loaded.batch)}
        skips.sort(key=lambda line: order[line["id"]])
        return BatchOutput(records, skips, shown)

    def output_record(self, record, result, ranking) -> dict:
        from hscr_fast.preferences.selfcontrast import num_distinct

        tokenizer = self.vlm.tokenizer
        kept = [result.variants[index] for index in ranking.kept_variant_indices]
        line = {
            "id": record.id,
            "image": record.image,
            "prompt": record.question,
            "responses": [record.answer, *ranking.kept_texts],
            "similarity": [1.0, *ranking.kept_similarities],
            "k": len(kept),
            "num_replaced": [len(variant.replaced_positions) for variant in kept],
            "sensitive": [{"position": token.position, "token": tokenizer.decode([token.token_id]),
                           "token_id": token.token_id, "replacement": tokenizer.decode([token.replacement_id]),
                           "replacement_id": token.replacement_id, "sensitivity": token.sensitivity,
                           "alternatives": [tokenizer.decode([alternative]) for alternative in token.alternative_ids]}
                          for token in result.sensitive],
            "variants_considered": num_distinct(result.variants),
            **self.facts(record, result.num_content),
        }
        if record.answer_type is not None:
            line["answer_type"] = record.answer_type
        line["args_fingerprint"] = self.fingerprint
        return line

    def render(self, record, result, ranking) -> str:
        """A preference list for a person: y_w with its sensitive tokens marked, each y_l with its replacements."""
        from hscr_fast.preferences.selfcontrast import render_marked

        tokenizer = self.vlm.tokenizer
        lines = [f"── {record.id}  ({record.image})", f"  Q    : {record.question}",
                 f"  y_w  : {render_marked(tokenizer, result.answer_ids, [t.position for t in result.sensitive])}"]
        for rank, (index, similarity) in enumerate(zip(ranking.kept_variant_indices, ranking.kept_similarities), 1):
            variant = result.variants[index]
            marked = render_marked(tokenizer, variant.token_ids, variant.replaced_positions)
            lines.append(f"  y_l{rank} : {marked}   (similarity {similarity:.3f}, "
                         f"{len(variant.replaced_positions)} replaced)")
        return "\n".join(lines)


def prefetched(builder: PreferenceBuilder, batches: list[list]):
    """`builder.load(batch)` for each batch in order, the next batch's images read in a thread while the caller runs
    the model on the current one."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hscr-image-loader") as loader:
        pending = loader.submit(builder.load, batches[0]) if batches else None
        for number in range(len(batches)):
            loaded = pending.result()
            if number + 1 < len(batches):
                pending = loader.submit(builder.load, batches[number + 1])
            yield loaded


def refuse_unexpressible_perturbation(perturbation: str, model_dir: Path) -> None:
    """Before the model loads: a perturbation the checkpoint's family cannot express is refused with the reason."""
    if perturbation == "visual-token":
        return
    from hscr_fast.models.perturbation import check_perturbation
    from hscr_fast.models.vlm import SUPPORTED_ARCHITECTURES, read_architecture

    family = SUPPORTED_ARCHITECTURES[read_architecture(model_dir)].replace("-", "_").replace(".", "_")
    check_perturbation(perturbation, family)


def batches_of(records: list, size: int) -> list[list]:
    return [records[start:start + size] for start in range(0, len(records), size)]


def run(config: GenerateConfig, model_dir: Path, data_path: Path, image_folder: Path) -> dict | None:
    """Stages 1-2 over the data (resuming); returns the summary on rank 0 (None on other ranks)."""
    group = ProcessGroup(config.execution.device)
    try:
        return _run(config, group, model_dir, data_path, image_folder)
    finally:
        group.close()


def _run(config: GenerateConfig, group: ProcessGroup, model_dir: Path, data_path: Path,
         image_folder: Path) -> dict | None:
    import torch
    from tqdm import tqdm

    from hscr_fast.data.records import load_llava_med_json
    from hscr_fast.models.vlm import load_vlm
    from hscr_fast.preferences.rerank import SentenceSimilarity

    refuse_unexpressible_perturbation(config.stage1.perturbation, model_dir)
    dtype = resolve_dtype(config.execution.dtype, group.device)  # the effective value goes into the fingerprint
    num_samples = config.inputs.num_samples
    records, input_skips = load_llava_med_json(data_path, on_error="skip")
    selected = records[:num_samples] if num_samples else records
    paths = OutputPaths(Path(config.inputs.out))
    check_writable(paths.out, "--out", folder=False)
    refuse_outputs_over_inputs({"--out": paths.out, "the skip file of --out": paths.skipped,
                                "the summary of --out": paths.summary},
                               {"--data": data_path, "--image-folder": image_folder, "--model": model_dir})
    # Resuming: the settings file names any setting or input record that differs from the run that made OUT; the
    # lines' fingerprint covers outputs from before that file existed.
    settings = output_settings(config, dtype, model_dir, data_path, image_folder)
    record_hashes = {record.id: content_hash(record.to_llava_med()) for record in selected}
    check_same_settings(paths.settings, paths.out, settings, record_hashes)
    fingerprint = fingerprint_of(settings)
    done = finished_ids(paths, fingerprint)
    if group.rank == 0:
        record_settings(paths.settings, settings, record_hashes)
    group.barrier()  # every rank has read the finished ids (and the settings are recorded) before any rank appends

    batches = [batch for number, batch in enumerate(batches_of(selected, config.execution.batch_size))
               if number % group.world == group.rank and any(record.id not in done for record in batch)]
    builder = None
    if batches:  # a finished run re-invoked only merges
        vlm = load_vlm(model_dir, dtype=dtype, device=group.device)
        similarity = SentenceSimilarity(config.rerank.similarity_model, device=str(group.device))
        builder = PreferenceBuilder(config, vlm, similarity, image_folder, fingerprint)
    records_path, skips_path = paths.writers(group.rank, group.world)
    to_show = config.execution.show if group.rank == 0 else 0
    processed = 0
    start = time.perf_counter()
    def ours(line: dict) -> bool:  # a torn last line is dropped only from a file these lines prove is this run's
        return line.get("args_fingerprint") == fingerprint

    with JsonlAppender(records_path, owns=ours) as record_out, \
            JsonlAppender(skips_path, id_key=None, owns=ours) as skip_out, \
            tqdm(total=sum(len(batch) for batch in batches), unit="sample", desc="hscr generate",
                 disable=group.rank != 0, dynamic_ncols=True) as progress:
        for batch, loaded in zip(batches, prefetched(builder, batches)):
            output = builder.build(loaded, show=to_show)
            for line in output.records:
                if line["id"] not in done:
                    record_out.append(line)
            for line in output.skips:
                if line["id"] not in done:
                    skip_out.append(line)
            for text in output.shown:
                progress.write(text)
            to_show -= len(output.shown)
            processed += sum(record.id not in done for record in batch)
            progress.update(len(batch))
    if group.device.type == "cuda":
        torch.cuda.synchronize(group.device)
    elapsed = time.perf_counter() - start

    per_rank = group.gather((processed, elapsed))
    group.barrier()  # all part files are complete
    if group.rank != 0:
        return None
    input_lines = [skip_line(skip.record_id, None, STAGE_INPUT, skip.reason.replace(" ", "_"), skip.message,
                             fingerprint) for skip in input_skips]
    written, skipped = merge_outputs(paths, records, input_lines)
    processed_total = sum(count for count, _ in per_rank)
    wall = max(seconds for _, seconds in per_rank)
    from hscr_fast.preferences.list_summary import list_statistics

    statistics = list_statistics(written, skipped)
    summary = {
        "read": len(records) + len(input_skips),
        "selected": len(selected),
        "not_selected": len(records) - len(selected),
        "written": len(written),
        "skipped": dict(Counter(line["reason"] for line in skipped).most_common()),
        "skipped_total": len(skipped),
        **statistics,
        "processed_this_run": processed_total,
        "elapsed_s": round(wall, 3),
        "samples_per_s": round(processed_total / wall, 3) if wall > 0 and processed_total else 0.0,
        "world_size": group.world,
        "output": str(paths.out),
        "skipped_file": str(paths.skipped),
        "args_fingerprint": fingerprint,
        "args": {**config.flags(), "dtype": dtype, "model": str(model_dir), "data": str(data_path),
                 "image_folder": str(image_folder)},
    }
    atomic_write_json(paths.summary, summary)
    return summary


def merge_outputs(paths: OutputPaths, records: list, input_lines: list[dict]) -> tuple[list[dict], list[dict]]:
    """Rank 0, after every rank finished: the output and the skip file rewritten in input order (atomically), part
    files folded in and removed. Input-stage skips come first, in file order."""
    order = {record.id: index for index, record in enumerate(records)}

    def ordered(lines):
        unique = {}
        for line in lines:
            unique.setdefault(str(line["id"]), line)
        return sorted(unique.values(), key=lambda line: (order.get(str(line["id"]), math.inf), str(line["id"])))

    record_parts, skip_parts = paths.all_parts(paths.out), paths.all_parts(paths.skipped)
    written = ordered([line for path in [paths.out, *record_parts] for line in read_records(path)])
    generate_skips = ordered([line for path in [paths.skipped, *skip_parts] for line in read_records(path)
                              if line.get("stage") == STAGE_GENERATE])
    skipped = input_lines + generate_skips
    atomic_write_text(paths.out, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in written))
    atomic_write_text(paths.skipped, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in skipped))
    for part in record_parts + skip_parts:
        part.unlink()
    return written, skipped


