"""Med-VQA evaluation: batched greedy answers, scored as LLaVA-Med's published evaluation scores them (the work of
`python -m hscr_fast.evaluate`).

OUT receives `predictions.jsonl` (one line per question, written as it is generated:
`{question_id, prompt, text, answer, answer_type, model_id, metadata}`, the `question_id`/`text` fields being
LLaVA-Med's answer-file format), `run.json` (the settings that produced the predictions), `metrics.json` and
`metrics.md` (see `hscr_fast.evaluation.metrics`). A rerun with the same OUT resumes: questions already in
predictions.jsonl are
skipped (a torn last line from a killed run is dropped), and the metrics are computed from the file, so a resumed run
scores exactly as an uninterrupted one. A rerun with settings that would change the answers (another model, adapter,
data file, visual condition, token limit or dtype) is refused rather than mixed into the same file.

`--visual none` generates from the prompt with the image taken out entirely (no visual tokens at all): the accuracy a
model reaches from the question text alone, the baseline HSCR's visual-dependence argument is measured against.
`--drop-ratio` keeps the image but drops that fraction of its visual tokens, seeded per question as in Stage 1.

Bad input stops with one line naming the file, line or id at fault: prediction ids that are not in the data or that
occur twice, questions without a prediction, a data file of the wrong shape, an adapter made for another base model.
Generated predictions are flushed line by line, so an error never loses them.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hscr_fast.data.images import ImageLoadError, load_image
from hscr_fast.data.records import DataFormatError, VQARecord, load_llava_med_json
from hscr_fast.evaluation.config import VISUAL_MODES
from hscr_fast.evaluation.metrics import BREAKDOWN_KEYS, compute_metrics
from hscr_fast.runtime.io import JsonlAppender, atomic_write_json, parse_jsonl_line, read_json_file

if TYPE_CHECKING:  # only for annotations: the generation code is imported where it runs
    from hscr_fast.evaluation.generation import GenerationPrompt
from hscr_fast.runtime.errors import HscrError
from hscr_fast.runtime.precision import resolve_dtype, torch_dtype
from hscr_fast.runtime.resume import refuse_changes, setting_differences

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"
RUN_FILE = "run.json"
# Settings that change the generated text: a resumed run must match the earlier run on all of them.
ANSWER_DETERMINING_SETTINGS = ("model", "adapter", "data", "visual", "drop_ratio", "dropout_mode", "seed",
                               "max_new_tokens", "dtype")
# Fields of the two configs that decide whether an adapter's weights can fit a model.
_ARCHITECTURE_FIELDS = {
    "text_config": ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                    "num_key_value_heads", "vocab_size"),
    "vision_config": ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "image_size",
                      "patch_size"),
}
_EXAMPLES = 5  # how many offending ids an error message lists


class EvaluationError(HscrError):
    """Bad input or settings for an evaluation run; the message names the file, line, id or setting at fault."""


class AdapterMismatchError(EvaluationError):
    """The adapter was made for another base model (different architecture or weight shapes)."""


@dataclass(frozen=True)
class VisualCondition:
    """What the model sees of each image: all its visual tokens, none, or a seeded random fraction dropped."""

    mode: str = "full"
    drop_ratio: float = 0.0
    dropout_mode: str = "remove"
    seed: int = 0

    def __post_init__(self):
        from hscr_fast.models.dropout import DROPOUT_MODES

        if self.mode not in VISUAL_MODES:
            raise EvaluationError(f"--visual must be one of {VISUAL_MODES}, got {self.mode!r}")
        if self.dropout_mode not in DROPOUT_MODES:
            raise EvaluationError(f"--dropout-mode must be one of {DROPOUT_MODES}, got {self.dropout_mode!r}")
        if not 0.0 <= self.drop_ratio < 1.0:
            raise EvaluationError(f"--drop-ratio must be in [0, 1), got {self.drop_ratio}")
        if self.mode == "none" and self.drop_ratio > 0:
            raise EvaluationError("--drop-ratio needs the image (--visual full); --visual none already removes every "
                                  "visual token")

    @property
    def label(self) -> str:
        if self.mode == "none":
            return "without visual tokens"
        if self.drop_ratio > 0:
            return f"{self.drop_ratio:.0%} of visual tokens dropped ({self.dropout_mode}, seed {self.seed})"
        return "with visual tokens"


# -- data ----------------------------------------------------------------------------------------------------------

def load_eval_records(data: str | Path, image_folder: str | Path | None = None, *,
                      limit: int | None = None, allow_images_outside_folder: bool = False) -> list[VQARecord]:
    """The questions of a LLaVA-Med JSON evaluation set (the first `limit` of them), every one with an answer type.

    With `image_folder`, every image must exist under it (inside it, unless `allow_images_outside_folder`). A record
    without `answer_type` gets the PathVQA convention (yes/no answers CLOSED, the rest OPEN), with a warning: the
    published numbers split by the data's own types.
    Raises `DataFormatError` naming the file and record for anything malformed.
    """
    from hscr_fast.data.convert import infer_answer_type

    records, _ = load_llava_med_json(data, image_folder, on_error="raise",
                                     allow_images_outside_folder=allow_images_outside_folder)
    if not records:
        raise DataFormatError(f"{data}: no questions to evaluate (the list is empty)")
    inferred = [record for record in records if record.answer_type is None]
    for record in inferred:
        record.answer_type = infer_answer_type(record.answer)
    if inferred:
        logger.warning("%s: %d of %d records have no answer_type; inferred (yes/no → CLOSED, else OPEN), e.g. id %r",
                       data, len(inferred), len(records), inferred[0].id)
    return records if limit is None else records[:limit]


def read_predictions(path: str | Path) -> dict[str, tuple[int, dict]]:
    """LLaVA-Med answer file (JSONL `{question_id, text, ...}`) → {str(question_id): (line number, record)}.

    Every line must be a JSON object with a `question_id` and a string (or null) `text`; an id may occur only once.
    """
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"{path}: predictions file not found")
    predictions: dict[str, tuple[int, dict]] = {}
    with path.open("r", encoding="utf-8") as handle:
        for line_number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            entry = parse_jsonl_line(text, path, line_number)
            for key in ("question_id", "text"):
                if key not in entry:
                    raise EvaluationError(f"{path}:{line_number}: no {key!r}; each line needs question_id (the data's "
                                          f"'id') and text (the model's answer), as LLaVA-Med writes them")
            if entry["text"] is not None and not isinstance(entry["text"], (str, int, float)):
                raise EvaluationError(f"{path}:{line_number}: 'text' must be a string, got "
                                      f"{type(entry['text']).__name__}")
            question_id = str(entry["question_id"])
            if question_id in predictions:
                raise EvaluationError(f"{path}:{line_number}: question_id {question_id!r} is duplicated (first on "
                                      f"line {predictions[question_id][0]}); keep one answer per question")
            predictions[question_id] = (line_number, entry)
    return predictions


def score_predictions(records: list[VQARecord], predictions: dict[str, tuple[int, dict]], *,
                      predictions_path: str | Path, data_path: str | Path,
                      known_ids: set[str] | None = None) -> dict[str, Any]:
    """Med-VQA metrics of `predictions` (from `read_predictions`) against `records`.

    Every prediction id must be a question of the data (`known_ids`: all ids of the data file, when `records` is a
    `--limit` subset of it) and every one of `records` must have a prediction; otherwise an error lists the offenders.
    Ground truth, answer type and breakdown fields come from the data, never from the predictions file.
    """
    known_ids = known_ids if known_ids is not None else {record.id for record in records}
    unknown = [(line, question_id) for question_id, (line, _) in predictions.items() if question_id not in known_ids]
    if unknown:
        examples = ", ".join(f"{question_id!r} (line {line})" for line, question_id in unknown[:_EXAMPLES])
        raise EvaluationError(f"{predictions_path}: {len(unknown)} prediction id(s) are not in {data_path}: "
                              f"{examples}; question_id must match the data's 'id' — is this the right data file?")
    missing = [record.id for record in records if record.id not in predictions]
    if missing:
        examples = ", ".join(repr(question_id) for question_id in missing[:_EXAMPLES])
        raise EvaluationError(f"{predictions_path}: no prediction for {len(missing)} of the {len(records)} questions "
                              f"in {data_path}, e.g. {examples}; generate them first (or --limit N to score only the "
                              f"first N questions)")
    rows = []
    for record in records:
        row = {"question_id": record.id, "prediction": predictions[record.id][1]["text"], "answer": record.answer,
               "answer_type": record.answer_type}
        row.update({key: record.metadata[key] for key in (*BREAKDOWN_KEYS, "findings") if key in record.metadata})
        rows.append(row)
    return compute_metrics(rows)


# -- model ---------------------------------------------------------------------------------------------------------

def resolve_device_and_dtype(device: str | None, dtype: str) -> tuple[str, str]:
    """`None` → cuda when available, else cpu; dtype `auto` → bfloat16 on cuda, float32 elsewhere."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, resolve_dtype(dtype, device)


def load_model(model_dir: str | Path, adapter_dir: str | Path | None = None, *, device: str = "cpu",
               dtype: str = "float32"):
    """The checkpoint in `model_dir` as a `VisionLanguageModel`, with the LoRA adapter in `adapter_dir` applied."""
    from hscr_fast.models.vlm import load_vlm

    vlm = load_vlm(model_dir, dtype=torch_dtype(dtype), device=device)
    if adapter_dir is not None:
        apply_adapter(vlm, adapter_dir, model_dir)
    return vlm


def _architecture(model_dir: str | Path) -> dict[str, Any]:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    fields = {"model_type": config.model_type}
    for sub_name, names in _ARCHITECTURE_FIELDS.items():
        sub_config = getattr(config, sub_name, None)
        for name in names:
            fields[f"{sub_name}.{name}"] = getattr(sub_config, name, None)
    return fields


def _check_adapter_base(adapter_dir: Path, base_model: str | None, model_dir: str | Path) -> None:
    """When the adapter names its base model by a local path, the two architectures must agree."""
    if not base_model or not Path(base_model).is_dir():
        return  # a hub name or a moved folder: only the weight shapes can tell (checked on loading)
    if Path(base_model).resolve() == Path(model_dir).resolve():
        return
    try:
        adapter_base, target = _architecture(base_model), _architecture(model_dir)
    except (OSError, ValueError) as error:
        logger.warning("adapter %s names base model %s, whose config cannot be read (%s); checking weight shapes only",
                       adapter_dir, base_model, error)
        return
    differences = [f"{name} {adapter_base[name]} vs {target[name]}" for name in adapter_base
                   if adapter_base[name] != target[name]]
    if differences:
        raise AdapterMismatchError(
            f"adapter {adapter_dir} was made for base model {base_model}, which differs from --model {model_dir} "
            f"({'; '.join(differences)}); evaluate it with --model {base_model}")
    logger.warning("adapter %s was trained on %s; applying it to %s, which has the same architecture",
                   adapter_dir, base_model, model_dir)


def _saved_adapter_weight_names(adapter_dir: Path) -> set[str] | None:
    safetensors_path, bin_path = adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_model.bin"
    if safetensors_path.is_file():
        from safetensors import safe_open

        with safe_open(str(safetensors_path), framework="pt") as handle:
            return set(handle.keys())
    if bin_path.is_file():
        return set(torch.load(bin_path, map_location="cpu", weights_only=True))
    return None


def apply_adapter(vlm, adapter_dir: str | Path, model_dir: str | Path) -> None:
    """Wrap `vlm.model` in `peft.PeftModel` with the adapter in `adapter_dir` (in place; `vlm` keeps working).

    An adapter for another base model is an `AdapterMismatchError` naming the adapter and the mismatch: a different
    architecture in its `base_model_name_or_path`, weights whose shapes do not fit, target modules this model lacks,
    or adapter weights with no place in this model (e.g. layers it does not have) — which peft itself would ignore.
    """
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise EvaluationError(f"{adapter_dir}: no adapter_config.json; --adapter expects a PEFT adapter directory "
                              f"(as hscr_fast.train writes)")
    adapter_config = read_json_file(config_path, EvaluationError)
    _check_adapter_base(adapter_dir, adapter_config.get("base_model_name_or_path"), model_dir)
    try:
        peft_model = PeftModel.from_pretrained(vlm.model, str(adapter_dir), is_trainable=False)
    except RuntimeError as error:
        if "size mismatch" not in str(error):
            raise
        first = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), str(error))
        raise AdapterMismatchError(f"adapter {adapter_dir} does not fit --model {model_dir}: its weight shapes differ "
                                   f"({first}); it was made for another base model") from None
    except ValueError as error:  # peft's NoMatchingPeftModuleError: the target modules are not in this model
        raise AdapterMismatchError(f"adapter {adapter_dir} does not fit --model {model_dir}: {error}") from None
    saved = _saved_adapter_weight_names(adapter_dir)
    if saved is not None:
        expected = set(get_peft_model_state_dict(peft_model))
        unplaced, unfilled = sorted(saved - expected), sorted(expected - saved)
        if unplaced or unfilled:
            detail = (f"{len(unplaced)} adapter weight(s) have no place in the model, e.g. {unplaced[0]}" if unplaced
                      else f"{len(unfilled)} adapter weight(s) the model expects are not in the adapter, e.g. "
                           f"{unfilled[0]}")
            raise AdapterMismatchError(f"adapter {adapter_dir} does not fit --model {model_dir}: {detail}; it was made "
                                       f"for another base model")
    vlm.model = peft_model


# -- generation ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def visual_inputs(vlm, records: list[VQARecord], image_folder: str | Path,
                  visual: VisualCondition) -> list[GenerationPrompt]:
    """Each record's prompt with its visual tokens [N', D] (and which are attendable, and with Qwen2-VL their 3D
    rotary layout), under the visual condition.

    Each distinct image of the batch goes through the vision tower once (Med-VQA sets ask several questions per
    image)."""
    from hscr_fast.evaluation.generation import GenerationPrompt

    if visual.mode == "none":
        empty = torch.empty(0, vlm.hidden_size, dtype=vlm.dtype, device=vlm.device)
        return [GenerationPrompt(vlm.prompt_tokens(record.question), empty) for record in records]
    from hscr_fast.models.dropout import visual_dropout

    distinct = list(dict.fromkeys(record.image for record in records))
    pixels = vlm.preprocess_images([load_image(Path(image_folder) / image) for image in distinct])
    tokens_of = dict(zip(distinct, vlm.encode_images(pixels)))
    layouts = vlm.visual_layouts(pixels)
    layout_of = dict(zip(distinct, layouts or [None] * len(distinct)))
    inputs = []
    for record in records:
        tokens, layout = tokens_of[record.image], layout_of[record.image]
        prompt = vlm.prompt_tokens(record.question)
        if visual.drop_ratio > 0:
            dropout = visual_dropout(tokens.shape[0], visual.drop_ratio, global_seed=visual.seed, sample_id=record.id,
                                     mode=visual.dropout_mode)
            inputs.append(GenerationPrompt(prompt, *dropout.apply(tokens), dropout.apply_layout(layout)))
        else:
            inputs.append(GenerationPrompt(prompt, tokens, None, layout))
    return inputs


def readable_records(records: list[VQARecord], image_folder: str | Path,
                     unreadable: dict[str, str]) -> list[VQARecord]:
    """The records whose image decodes; the others are added to `unreadable` ({id: reason}), each with a warning."""
    failures = {}
    for image in dict.fromkeys(record.image for record in records):
        try:
            load_image(Path(image_folder) / image)
        except ImageLoadError as error:
            failures[image] = str(error)
    for record in records:
        if record.image in failures:
            unreadable[record.id] = failures[record.image]
            logger.warning("question %r skipped, its image cannot be read: %s", record.id, failures[record.image])
    return [record for record in records if record.image not in failures]


def generate_predictions(vlm, records: list[VQARecord], image_folder: str | Path | None,
                         predictions_path: str | Path, *, visual: VisualCondition = VisualCondition(),
                         batch_size: int = 8, max_new_tokens: int = 64, model_id: str = "",
                         progress: bool = True, unreadable: dict[str, str] | None = None) -> int:
    """Greedy answers for the records not yet in `predictions_path`, appended one flushed line each.

    A record whose image cannot be decoded gets no answer: it goes into `unreadable` ({id: reason}) with a warning
    naming it, and the others are answered. Returns how many were generated in this call. Batches are left-padded
    (`hscr_fast.evaluation.generation`), so every answer is
    the one the model gives to that question alone, whatever the batch size.
    """
    from tqdm.auto import tqdm

    from hscr_fast.evaluation.generation import decode, greedy_generate

    if batch_size < 1:
        raise EvaluationError(f"--batch-size must be at least 1, got {batch_size}")
    unreadable = {} if unreadable is None else unreadable
    if visual.mode == "full" and image_folder is None:
        raise EvaluationError("an image folder is needed to evaluate with visual tokens (--image-folder)")
    with JsonlAppender(predictions_path, id_key="question_id") as predictions:
        pending = [record for record in records if record.id not in predictions.ids]
        if predictions.num_existing:
            logger.info("%s: resuming, %d of %d questions already answered", predictions_path,
                        len(records) - len(pending), len(records))
        bar = tqdm(total=len(records), initial=len(records) - len(pending), unit="q", desc="evaluate",
                   disable=not progress, dynamic_ncols=True)
        with bar:
            for start in range(0, len(pending), batch_size):
                batch = pending[start:start + batch_size]
                if visual.mode == "full":
                    batch = readable_records(batch, image_folder, unreadable)
                items = visual_inputs(vlm, batch, image_folder, visual) if batch else []
                for record, tokens in zip(batch, greedy_generate(vlm, items, max_new_tokens=max_new_tokens)):
                    predictions.append({
                        "question_id": record.id, "prompt": record.question, "text": decode(vlm, tokens),
                        "answer": record.answer, "answer_type": record.answer_type, "model_id": model_id,
                        "metadata": record.metadata,
                    })
                bar.update(len(pending[start:start + batch_size]))
    return len(pending) - len(unreadable)


def _with_generation_settings(run: dict[str, Any], visual: VisualCondition, max_new_tokens: int) -> dict[str, Any]:
    return {**run, "visual": visual.mode, "drop_ratio": visual.drop_ratio, "dropout_mode": visual.dropout_mode,
            "seed": visual.seed, "max_new_tokens": max_new_tokens}


def _check_resume_settings(out_dir: Path, run: dict[str, Any]) -> None:
    """Refuse to append to predictions made with settings that give different answers (they are left untouched)."""
    predictions_path, run_path = out_dir / PREDICTIONS_FILE, out_dir / RUN_FILE
    if not predictions_path.is_file() or not predictions_path.stat().st_size or not run_path.is_file():
        return
    try:
        earlier = json.loads(run_path.read_text())
    except json.JSONDecodeError:
        return
    refuse_changes(predictions_path, setting_differences(earlier, run, keys=ANSWER_DETERMINING_SETTINGS,
                                                         wording="{key}: {earlier!r} there, {now!r} now"),
                   "use another --out, or the same settings to resume (the file is left as it is)")


def evaluate_vlm(vlm, records: list[VQARecord], out_dir: str | Path, *, image_folder: str | Path | None,
                 run: dict[str, Any], visual: VisualCondition = VisualCondition(), batch_size: int = 8,
                 max_new_tokens: int = 64, progress: bool = True, title: str | None = None,
                 data_path: str | Path = "the data", known_ids: set[str] | None = None) -> dict[str, Any]:
    """Generate (resuming) into OUT/predictions.jsonl, score it, write metrics.json / metrics.md; returns the metrics.

    `run` describes the run (model, adapter, data, ...) and goes into run.json and metrics.json; resuming requires
    the same `ANSWER_DETERMINING_SETTINGS`. For a model already in memory (the trainer's before/after report).
    """
    from hscr_fast.evaluation.report import write_metrics

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = _with_generation_settings(run, visual, max_new_tokens)
    _check_resume_settings(out_dir, run)
    atomic_write_json(out_dir / RUN_FILE, run)
    predictions_path = out_dir / PREDICTIONS_FILE
    # Dropout layers must be off whatever state the caller left the model in (the trainer calls this mid-run).
    was_training = vlm.model.training
    vlm.model.eval()
    unreadable: dict[str, str] = {}
    try:
        generated = generate_predictions(vlm, records, image_folder, predictions_path, visual=visual,
                                         batch_size=batch_size, max_new_tokens=max_new_tokens,
                                         model_id=str(run.get("model_id", "")), progress=progress,
                                         unreadable=unreadable)
    finally:
        vlm.model.train(was_training)
    scored = [record for record in records if record.id not in unreadable]
    if not scored:
        raise EvaluationError(f"{data_path}: no question could be evaluated: every image is unreadable, e.g. "
                              f"{next(iter(unreadable.values()))}")
    metrics = score_predictions(scored, read_predictions(predictions_path), predictions_path=predictions_path,
                                data_path=data_path, known_ids=known_ids or {record.id for record in records})
    # Questions left out because their image cannot be read: counted and named, never silently dropped.
    metrics["skipped_unreadable_images"] = {"count": len(unreadable), "ids": sorted(unreadable)}
    metrics["run"] = {**run, "condition": visual.label, "generated_this_call": generated}
    write_metrics(out_dir, metrics, title=title or f"Med-VQA: {run.get('model_id', 'model')}, {visual.label}")
    return metrics


def evaluate_with_and_without_visual(vlm, records: list[VQARecord], out_dir: str | Path, *,
                                     image_folder: str | Path, run: dict[str, Any], **options) -> dict[str, dict]:
    """The two conditions of the demo report, in OUT/with_visual and OUT/without_visual.

    Returns {"with visual tokens": metrics, "without visual tokens": metrics}, one entry of `write_demo_report`'s
    results; `options` go to `evaluate_vlm`. For the reference model, call it inside `vlm.adapter_disabled()`.
    """
    from hscr_fast.evaluation.report import WITH_VISUAL, WITHOUT_VISUAL

    out_dir = Path(out_dir)
    return {
        WITH_VISUAL: evaluate_vlm(vlm, records, out_dir / "with_visual", image_folder=image_folder, run=run,
                                  visual=VisualCondition("full"), **options),
        WITHOUT_VISUAL: evaluate_vlm(vlm, records, out_dir / "without_visual", image_folder=image_folder, run=run,
                                     visual=VisualCondition("none"), **options),
    }


def evaluate_model(model_dir: str | Path, data: str | Path, image_folder: str | Path | None, out_dir: str | Path, *,
                   adapter_dir: str | Path | None = None, visual: VisualCondition = VisualCondition(),
                   batch_size: int = 8, max_new_tokens: int = 64, device: str | None = None, dtype: str = "auto",
                   limit: int | None = None, progress: bool = True,
                   allow_images_outside_folder: bool = False) -> dict[str, Any]:
    """The whole command for one model: read the data, load the model (+ adapter), generate, score, write OUT."""
    device, dtype = resolve_device_and_dtype(device, dtype)
    all_records = load_eval_records(data, image_folder if visual.mode == "full" else None,
                                    allow_images_outside_folder=allow_images_outside_folder)
    records = all_records if limit is None else all_records[:limit]
    model_id = Path(model_dir).name + (f"+{Path(adapter_dir).name}" if adapter_dir else "")
    run = {"model": str(Path(model_dir).resolve()),
           "adapter": str(Path(adapter_dir).resolve()) if adapter_dir else None,
           "data": str(Path(data).resolve()), "image_folder": str(image_folder) if image_folder else None,
           "dtype": dtype, "device": device, "batch_size": batch_size, "limit": limit, "model_id": model_id}
    # The settings check runs before the (slow) model load, so a wrong --out fails at once.
    _check_resume_settings(Path(out_dir), _with_generation_settings(run, visual, max_new_tokens))
    vlm = load_model(model_dir, adapter_dir, device=device, dtype=dtype)
    return evaluate_vlm(vlm, records, out_dir, image_folder=image_folder, run=run, visual=visual,
                        batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress, data_path=data,
                        known_ids={record.id for record in all_records})


def score_file(predictions: str | Path, data: str | Path, out_dir: str | Path, *,
               limit: int | None = None) -> dict[str, Any]:
    """`--predictions`: score an existing answer file against the data; writes OUT/metrics.json and metrics.md."""
    from hscr_fast.evaluation.report import write_metrics

    all_records = load_eval_records(data)
    records = all_records if limit is None else all_records[:limit]
    metrics = score_predictions(records, read_predictions(predictions), predictions_path=predictions, data_path=data,
                                known_ids={record.id for record in all_records})
    metrics["run"] = {"predictions": str(Path(predictions).resolve()), "data": str(Path(data).resolve()),
                      "limit": limit}
    write_metrics(out_dir, metrics, title=f"Med-VQA: {Path(predictions).name}")
    return metrics


def run_labels(run_dirs: list[str | Path]) -> list[str]:
    """The shortest trailing parts of the run folders' paths that tell them apart ("hscr", or "a/eval", "b/eval")."""
    parts = [Path(run_dir).resolve().parts for run_dir in run_dirs]
    for depth in range(1, max(map(len, parts)) + 1):
        labels = ["/".join(path[-depth:]) for path in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(run_dir) for run_dir in run_dirs]


def compare_runs(run_dirs: list[str | Path], out_dir: str | Path) -> tuple[Path, Path]:
    """`--compare`: the metrics.json of each run directory side by side, as OUT/comparison.md and .png."""
    from hscr_fast.evaluation.report import write_comparison

    if len({Path(run_dir).resolve() for run_dir in run_dirs}) < len(run_dirs):
        raise EvaluationError(f"--compare lists a run folder twice: {' '.join(map(str, run_dirs))}")
    runs: dict[str, dict[str, Any]] = {}
    for label, run_dir in zip(run_labels(run_dirs), run_dirs):
        metrics_path = Path(run_dir) / "metrics.json"
        if not metrics_path.is_file():
            raise EvaluationError(f"{run_dir}: no metrics.json; --compare takes output folders of "
                                  f"`python -m hscr_fast.evaluate`")
        metrics = read_json_file(metrics_path, EvaluationError)
        if not isinstance(metrics, dict) or "closed_accuracy" not in metrics:
            raise EvaluationError(f"{metrics_path}: not a metrics file (no closed_accuracy)")
        runs[label] = metrics
    return write_comparison(out_dir, runs)


# -- command line --------------------------------------------------------------------------------------------------


