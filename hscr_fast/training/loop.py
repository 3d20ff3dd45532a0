"""Stage 3 — multi-level preference optimisation (MLPO) on the prefix-shared listwise forward (`train(config)`).

The loop below reads top to bottom: validate the data (before any model loads), load the model and attach LoRA,
compute the reference log-probs once (adapter disabled, cached), then per optimizer step: listwise forward of each
prompt's k+1 responses, MLPO loss (Eqs. 5-7), backward, step, log, checkpoint. Defaults are the paper's (Table 7).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hscr_fast.runtime.distributed import init_distributed
from hscr_fast.runtime.errors import HscrError, TrainingDiverged
from hscr_fast.runtime.precision import resolve_dtype, torch_dtype
from hscr_fast.runtime.resume import refuse_changes, setting_differences
from hscr_fast.training.config import TrainConfig

LORA_TARGET_LANGUAGE = (r".*language_model\.layers\.\d+\."
                        r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))")
# A text-only causal LM (Llama, Mistral, Qwen2, ...): the same linear layers, under `model.layers`.
LORA_TARGET_TEXT = (r".*model\.layers\.\d+\."
                    r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))")
# Settings added to a checkpoint's run identity after checkpoints existed, with the value older ones ran with.
RUN_IDENTITY_DEFAULTS = {"eval_fraction": 0.0, "explicit": True, "implicit": True}
# The module that maps vision features into the language model, per model_type (--train-projector).
PROJECTOR_MODULES = {"qwen2_vl": "merger", "qwen2_5_vl": "merger"}


class PreviousRunError(HscrError):
    """--out holds a run and neither --resume nor --overwrite says what to do with it."""


# What a run writes into OUT; --overwrite deletes exactly these (OUT may hold other files, such as the data).
RUN_OUTPUTS = ("adapter", "adapter-best", "checkpoints", "merged", "metrics.jsonl", "curves.png")


@dataclass
class TrainResult:
    adapter_dir: Path
    metrics_path: Path
    plot_path: Path
    steps: int
    merged_dir: Path | None = None
    best_adapter_dir: Path | None = None  # with --save-best: the adapter of the lowest held-out loss


def attach_lora(vlm, config: TrainConfig, model_dir: str):
    """LoRA on the language model's linear layers (the vision tower's own q/k/v_proj are excluded by the regex)."""
    from peft import LoraConfig, get_peft_model

    from hscr_fast.models.causal_lm import CausalLanguageModel

    text_only = isinstance(vlm, CausalLanguageModel)
    base_module = vlm.base_model if text_only else vlm.llava
    # Recorded by peft as base_model_name_or_path: absolute, so that checking an adapter's base later does not depend
    # on the folder the training was started from.
    base = str(Path(model_dir).resolve())
    base_module.config._name_or_path = vlm.model.name_or_path = base
    if config.gradient_checkpointing:
        # Non-reentrant: the frozen embeddings give inputs that need no grad, which reentrant checkpointing dislikes.
        base_module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=LORA_TARGET_TEXT if text_only else LORA_TARGET_LANGUAGE, bias="none",
                      modules_to_save=[PROJECTOR_MODULES.get(vlm.family, "multi_modal_projector")]
                      if config.train_projector else None)
    vlm.model = get_peft_model(vlm.model, lora)
    return {name: p for name, p in vlm.model.named_parameters() if p.requires_grad}


def _mean_across_ranks(values: dict[str, float], world_size: int) -> dict[str, float]:
    if world_size == 1:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(tensor)
    return {k: v / world_size for k, v in zip(keys, tensor.tolist())}


def train(config: TrainConfig) -> TrainResult:
    from transformers import get_cosine_schedule_with_warmup

    from hscr_fast.listwise_attention import apply_attention_choice, loading_attention
    from hscr_fast.models.causal_lm import load_causal_lm
    from hscr_fast.models.vlm import check_weight_files, load_vlm, preflight_model, read_architecture
    from hscr_fast.runtime.io import check_writable
    from hscr_fast.training.data import batch_indices, steps_per_epoch, tokenize_preferences
    from hscr_fast.training.engine import (
        DeepSpeedConfigError,
        DeepSpeedEngine,
        Divergence,
        TorchEngine,
        non_finite_parameters,
        resolve_deepspeed_config,
        whole_parameters,
    )
    from hscr_fast.training.heldout import held_out_metrics
    from hscr_fast.training.log import MetricsLog, plot_training_curves
    from hscr_fast.training.objective import Objective, batch_loss, score_batch
    from hscr_fast.training.reference import load_or_compute_reference, reference_cache_path, reference_fingerprint

    text_only = is_text_only_model(config.model)
    if config.model and not text_only and (Path(config.model) / "config.json").is_file():
        read_architecture(config.model)  # neither text-only nor a supported VLM: say so before anything else
    if not (config.model and config.preferences and (config.image_folder or text_only)):
        raise HscrError("--model, --preferences and (for a vision-language model) --image-folder are all "
                         "needed (or none, for the demo)")
    if text_only and config.train_projector:
        raise HscrError(f"--train-projector: {config.model} is a text-only model; it has no projector")
    objective = Objective.from_config(config)  # the loss, built once: the loop and held-out evaluation share it
    # 0. What can be checked in a second: the model's files, the output folder, the DeepSpeed configuration.
    if text_only:
        check_weight_files(config.model)
    else:
        preflight_model(config.model)
    check_writable(config.out, "--out", folder=True)
    dtype = torch_dtype(resolve_dtype(config.dtype, "cuda" if torch.cuda.is_available() else "cpu"))
    ds_config = resolve_deepspeed_config(
        config.deepspeed, micro_batch=config.per_device_batch_size, accumulation=config.gradient_accumulation_steps,
        max_grad_norm=config.max_grad_norm, bf16=dtype == torch.bfloat16,
        world_size=int(os.environ.get("WORLD_SIZE", "1")))
    use_deepspeed = ds_config is not None
    if use_deepspeed and ds_config["zero_optimization"]["stage"] == 3 and config.merge:
        raise DeepSpeedConfigError(f"--merge with ZeRO-3 (--deepspeed {config.deepspeed}): the base weights are "
                                   f"sharded across ranks; train without --merge and merge the saved adapter "
                                   f"afterwards (PeftModel.from_pretrained(base, adapter).merge_and_unload())")
    rank, world_size, device = init_distributed(use_deepspeed)
    out = Path(config.out)
    say = print if rank == 0 else (lambda *a, **k: None)

    # 1. Data first: a bad line or image is reported before minutes of model loading.
    records, eval_records = load_training_data(config, text_only=text_only)
    say(f"[hscr] {len(records)} preference lists validated ({config.preferences})"
        + (f"; {len(eval_records)} held out for evaluation" if eval_records else ""))
    claim_output_folder(out, config, rank, world_size)

    # 2. Model + LoRA.
    torch.manual_seed(config.seed)
    vlm = (load_causal_lm if text_only else load_vlm)(config.model, dtype=dtype, device=device,
                                                      attn_implementation=loading_attention(config.attn_implementation))
    say(f"[hscr] decoder attention: {apply_attention_choice(vlm, config.attn_implementation, device)}")
    trainable = attach_lora(vlm, config, config.model)
    say(f"[hscr] trainable parameters: {sum(p.numel() for p in trainable.values()):,} "
        f"(LoRA r={config.lora_r}{' + projector' if config.train_projector else ''})")
    image_folder = None if text_only else config.image_folder
    eval_image_folder = None if text_only else config.eval_image_folder or config.image_folder
    items = tokenize_preferences(vlm, records, image_folder, max_answer_tokens=config.max_answer_tokens)
    eval_items = tokenize_preferences(vlm, eval_records, eval_image_folder, max_answer_tokens=config.max_answer_tokens)

    # 3. Reference log-probs, once, adapter disabled (held-out lists too; --eval-fraction's are in the same file).
    def reference_for(path, path_items):
        fingerprint = reference_fingerprint(config.model, path, prompt_format=vlm.options.prompt_format, dtype=dtype)
        return fingerprint, load_or_compute_reference(
            vlm, path_items, reference_cache_path(path, fingerprint), batch_size=config.per_device_batch_size,
            rank=rank, world_size=world_size)

    if config.eval_preferences:
        fingerprint, reference = reference_for(config.preferences, items)
        _, eval_reference = reference_for(config.eval_preferences, eval_items)
    else:
        fingerprint, reference = reference_for(config.preferences, items + eval_items)
        eval_reference = reference

    # 4. Optimizer, schedule, engine.
    micro_per_epoch = steps_per_epoch(len(items), config.per_device_batch_size, world_size)
    if micro_per_epoch == 0:
        raise HscrError(f"{len(items)} preference lists are fewer than one global batch "
                         f"({config.per_device_batch_size} x {world_size} ranks)")
    total_micro = config.epochs * micro_per_epoch
    total_steps = total_micro // config.gradient_accumulation_steps
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=config.learning_rate,
                                  weight_decay=config.weight_decay, fused=device.type == "cuda")
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * total_steps),
                                                total_steps)
    common = dict(checkpoint_dir=out / "checkpoints", rank=rank, world_size=world_size, keep=config.save_total_limit)
    if use_deepspeed:
        engine = DeepSpeedEngine(vlm.model, trainable, optimizer, scheduler, ds_config, **common)
    else:
        engine = TorchEngine(trainable, optimizer, scheduler, accumulation=config.gradient_accumulation_steps,
                             max_grad_norm=config.max_grad_norm, **common)

    run_identity = {"preferences_fingerprint": fingerprint, "world_size": world_size, **objective.run_identity(),
                    "per_device_batch_size": config.per_device_batch_size,
                    "gradient_accumulation_steps": config.gradient_accumulation_steps, "epochs": config.epochs,
                    "seed": config.seed, "eval_fraction": config.eval_fraction}
    step, micro_step, best_eval_loss = 0, 0, math.inf
    if config.resume and engine.latest_tag():
        state = engine.load(engine.latest_tag())
        # A checkpoint written before a setting existed recorded nothing for it: it ran with that setting's default.
        # Both sides' keys count: a setting recorded only when it is on (the NLL weight) is a difference either way.
        refuse_changes(engine.checkpoint_dir / engine.latest_tag(),
                       setting_differences(state["run"], run_identity, defaults=RUN_IDENTITY_DEFAULTS),
                       "resume with the settings it was made with, or give --overwrite instead of --resume to start "
                       "the run in --out afresh")
        step, micro_step = state["step"], state["micro_step"]
        best_eval_loss = state.get("best_eval_loss", math.inf)
        say(f"[hscr] resumed from {engine.checkpoint_dir / engine.latest_tag()} at step {step}/{total_steps}")
    log = MetricsLog(out / "metrics.jsonl", resume_after_step=step if config.resume else None, enabled=rank == 0)

    from tqdm.auto import tqdm

    progress = tqdm(total=total_steps, initial=step, desc=config.loss.upper(), unit="step", disable=rank != 0,
                    dynamic_ncols=True)
    vlm.model.train()

    def diverged(what: str) -> TrainingDiverged:
        progress.close()  # the bar's last state goes out before the error line, not after it
        return TrainingDiverged(divergence_message(what, engine, last_saved))

    # Throughput window: "paused" is time spent on held-out evaluation and checkpoints, which tokens/s leaves out.
    window = {"tokens": 0, "samples": 0, "start": time.perf_counter(), "paused": 0.0, "metrics": []}
    last_saved = engine.latest_tag()
    stop_at = total_steps if config.stop_after_steps is None else min(total_steps, config.stop_after_steps)
    while step < stop_at:
        # 5. One micro-batch: listwise forward of every prompt's responses, MLPO loss.
        epoch, step_in_epoch = divmod(micro_step, micro_per_epoch)
        batch_items = [items[i] for i in batch_indices(
            len(items), epoch=epoch, step_in_epoch=step_in_epoch, per_device_batch=config.per_device_batch_size,
            world_size=world_size, rank=rank, seed=config.seed)]
        scored = score_batch(vlm, batch_items, reference, objective, device)
        loss, metrics = batch_loss(scored, objective)
        finite = torch.tensor(float(torch.isfinite(loss)), dtype=torch.float64)
        if world_size > 1:
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if finite.item() < 1:
            raise diverged(f"non-finite loss at optimizer step {step + 1} (epoch {epoch}, batch ids "
                           f"{[item.id for item in batch_items]} on rank {rank})")

        # 6. Backward and (at accumulation boundaries) the optimizer step.
        # One policy on both engines: a NaN/Inf gradient norm stops the run before the step is applied.
        engine.backward(loss)
        try:
            boundary = engine.step()
        except Divergence as error:
            raise diverged(f"{error} at optimizer step {step + 1} (epoch {epoch}); the step was not applied") from None
        micro_step += 1
        window["tokens"] += scored.num_real_tokens
        window["samples"] += len(batch_items)
        window["metrics"].append({k: float(v) for k, v in metrics.items() if v.numel() == 1})
        if not boundary:
            continue
        step += 1

        # 7. Log: per-step means over micro-batches and ranks; throughput counts real (unpadded) tokens.
        if step % config.log_every == 0 or step == stop_at:
            elapsed = time.perf_counter() - window["start"] - window["paused"]
            row = {k: _nanmean([m[k] for m in window["metrics"]]) for k in window["metrics"][0]}
            row = _mean_across_ranks(row, world_size)
            totals = _mean_across_ranks({"tokens": window["tokens"], "samples": window["samples"]}, world_size)
            row.update(step=step, epoch=epoch, lr=engine.current_lr(), grad_norm=engine.grad_norm,
                       tokens_per_second=totals["tokens"] * world_size / elapsed,
                       samples_per_second=totals["samples"] * world_size / elapsed)
            log.append(row)
            progress.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['accuracy_explicit']:.2f}",
                                 tok_s=f"{row['tokens_per_second']:.0f}", refresh=False)
            window = {"tokens": 0, "samples": 0, "start": time.perf_counter(), "paused": 0.0, "metrics": []}
        progress.update(1)
        pause_start = time.perf_counter()

        # 8. Held-out evaluation (before the checkpoint, so a checkpointed step always has its eval row).
        if eval_items and ((config.eval_steps and step % config.eval_steps == 0) or step == stop_at):
            held_out = held_out_metrics(vlm, eval_items, eval_reference, objective, device,
                                        batch_size=config.per_device_batch_size, rank=rank, world_size=world_size)
            log.append({"step": step, "epoch": epoch, **held_out})
            improved = held_out["eval_loss"] < best_eval_loss
            if improved:
                best_eval_loss = held_out["eval_loss"]
            if rank == 0:
                progress.write(describe_held_out(step, held_out, improved))
            if improved and config.save_best:
                with whole_parameters(list(trainable.values())):  # every rank: a collective under ZeRO-3
                    if rank == 0:
                        save_adapter_atomically(vlm.model, out / "adapter-best", {"step": step, **held_out})

        # 9. Checkpoint.
        if step % config.save_steps == 0 or step == stop_at:
            try:
                engine.save(f"step-{step}", {"step": step, "micro_step": micro_step, "run": run_identity,
                                             "best_eval_loss": best_eval_loss})
            except Divergence as error:
                raise diverged(str(error)) from None
            last_saved = f"step-{step}"
        window["paused"] += time.perf_counter() - pause_start
    progress.close()

    # 10. The adapter in standard PEFT format (PeftModel.from_pretrained loads it), the plot, optionally merged.
    result = TrainResult(out / "adapter", out / "metrics.jsonl", out / "curves.png", step,
                         best_adapter_dir=out / "adapter-best" if config.save_best else None)
    poisoned = non_finite_parameters(trainable, world_size)
    if poisoned:  # unreachable while every step and checkpoint is checked; kept so that no path saves NaN
        raise diverged(f"parameters not finite ({', '.join(poisoned[:3])}); no adapter written")
    with whole_parameters(list(trainable.values())):  # every rank: a collective under ZeRO-3
        if rank == 0:
            vlm.model.save_pretrained(result.adapter_dir)
    if rank == 0:
        if log.path.is_file() and log.path.stat().st_size:
            plot_training_curves(log.path, result.plot_path)
        if config.merge and step == total_steps:
            result.merged_dir = out / "merged"
            merged = vlm.model.merge_and_unload()
            merged.save_pretrained(result.merged_dir)
            vlm.processor.save_pretrained(result.merged_dir)
            vlm.options.write(result.merged_dir)
        say(f"[hscr] adapter: {result.adapter_dir}\n[hscr] metrics: {result.metrics_path}\n"
            f"[hscr] curves:  {result.plot_path}" + (f"\n[hscr] merged:  {result.merged_dir}"
                                                     if result.merged_dir else ""))
    if world_size > 1:
        torch.distributed.barrier()
    return result


def divergence_message(what: str, engine, last_saved: str | None) -> str:
    return (f"{what}; training stopped. Last good checkpoint: "
            f"{engine.checkpoint_dir / last_saved if last_saved else 'none'} — lower --learning-rate, or check the "
            f"data, then rerun with --resume")


def describe_held_out(step: int, held_out: dict, improved: bool) -> str:
    return (f"[hscr] step {step} held-out ({held_out['eval_lists']} lists): loss {held_out['eval_loss']:.4f}, "
            f"explicit accuracy {held_out['eval_accuracy_explicit']:.3f}, margin "
            f"{held_out['eval_margin_explicit']:.4f}" + (" (best so far)" if improved else ""))


def save_adapter_atomically(peft_model, adapter_dir: Path, evaluation: dict) -> None:
    """Writes the adapter (PEFT format) and `evaluation.json` beside it into a fresh folder, then swaps it in: a
    crash leaves the previous best or the new one, never a mixture."""
    from hscr_fast.runtime.io import atomic_directory

    with atomic_directory(adapter_dir) as staging:
        peft_model.save_pretrained(staging)
        (staging / "evaluation.json").write_text(json.dumps(evaluation, indent=2) + "\n")


def claim_output_folder(out: Path, config: TrainConfig, rank: int, world_size: int) -> None:
    """Before the model loads: a previous run in `out` is refused unless --resume (continue it) or --overwrite
    (rank 0 deletes its outputs, nothing else in the folder)."""
    import shutil

    if config.resume and config.overwrite:
        raise PreviousRunError("--resume continues the run in --out and --overwrite replaces it; give one")
    previous = [name for name in RUN_OUTPUTS if (out / name).exists()]
    if previous and not (config.resume or config.overwrite):
        raise PreviousRunError(f"--out {out} already holds a run ({', '.join(previous)}); add --resume to continue "
                               f"it, --overwrite to replace it, or choose another --out")
    if previous and config.overwrite and rank == 0:
        for name in previous:
            target = out / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
    if world_size > 1:
        torch.distributed.barrier()  # no rank starts writing before the old run is gone


def is_text_only_model(model_dir: str | None) -> bool:
    """Whether `model_dir` holds a text-only causal LM, read from its config.json alone (before any weights load).
    A directory without one is left to the model loader, which names what is missing."""
    from hscr_fast.models.causal_lm import is_text_only_checkpoint

    return bool(model_dir) and (Path(model_dir) / "config.json").is_file() and is_text_only_checkpoint(model_dir)


def load_training_data(config: TrainConfig, *, text_only: bool = False) -> tuple[list, list]:
    """(training records, held-out records), every line and image validated; raises before any model loads. For a
    text-only model the lists must have no images."""
    from hscr_fast.data.records import DataFormatError
    from hscr_fast.training.data import validate_preferences
    from hscr_fast.training.heldout import split_held_out

    if config.eval_preferences and config.eval_fraction:
        raise DataFormatError("--eval-preferences and --eval-fraction both choose the held-out lists; give one")
    if config.save_best and not (config.eval_preferences or config.eval_fraction):
        raise DataFormatError("--save-best keeps the adapter with the lowest held-out loss; it needs held-out lists "
                              "(--eval-preferences FILE or --eval-fraction F)")
    outside = {"allow_images_outside_folder": config.allow_images_outside_folder}
    records = validate_preferences(config.preferences, None if text_only else config.image_folder, **outside)
    eval_records = []
    if config.eval_fraction:
        records, eval_records = split_held_out(records, config.eval_fraction, config.preferences)
    elif config.eval_preferences:
        eval_records = validate_preferences(config.eval_preferences,
                                            None if text_only else config.eval_image_folder or config.image_folder,
                                            **outside)
    if config.loss == "weighted-dpo":
        unweighted = [record.id for record in records + eval_records if record.weight is None]
        if unweighted:
            raise HscrError(f"--loss weighted-dpo needs a 'weight' on every preference record; "
                             f"{len(unweighted)} have none (ids {unweighted[:5]})")
    return records, eval_records


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


