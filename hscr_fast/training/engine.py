"""Optimisation engines for the trainer: DeepSpeed ZeRO-2 (default) or plain PyTorch, behind one small interface.

    engine.backward(loss)   # one micro-batch
    engine.step()           # counts micro-batches; at an accumulation boundary: clip, optimizer + scheduler step
    engine.save(tag, state) / engine.load(tag) -> state

The listwise forward calls the model's submodules directly (vision tower, embeddings, decoder), not the wrapped
module's `forward`. That is fine for ZeRO stage ≤ 2, which shards optimizer states and gradients but keeps whole
parameters on every rank, and whose gradient reduction hooks sit on the parameters, not on `forward`. For the same
reason the plain engine averages gradients across ranks itself instead of relying on DDP's forward-time bookkeeping.

Divergence: at an accumulation boundary a non-finite gradient norm raises `NonFiniteGradient` *instead of* applying
the step, on both engines (in fp32/bf16 there is no loss scale to lower, so DeepSpeed's "overflow, skipping step" is
a divergence too), and `save` refuses parameters that are not finite: no checkpoint ever holds NaN or Inf.

Checkpoints hold only the trainable parameters (the LoRA adapter, and the projector when trained), the optimizer
and scheduler states, the trainer's counters and every rank's RNG state; a `latest` file, written atomically after
everything else, names the last complete checkpoint, so a crash mid-save leaves the previous one in charge.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
from pathlib import Path

import torch

from hscr_fast.runtime.errors import HscrError
from hscr_fast.runtime.io import atomic_output, atomic_write_text

LATEST = "latest"


def deepspeed_config(*, micro_batch: int, accumulation: int, max_grad_norm: float, bf16: bool,
                     zero_stage: int = 2) -> dict:
    """ZeRO-2 shards optimizer states and gradients; ZeRO-3 also the parameters (each rank holds a shard; the
    frozen base model's too), for bases that do not fit one device."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": {"stage": zero_stage, "contiguous_gradients": True, "overlap_comm": False,
                              "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8},
        "bf16": {"enabled": bf16},
        # AdamW from torch: DeepSpeed's fused Adam needs CUDA and its CPU Adam a compiled extension.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class Divergence(ArithmeticError):
    """Training produced a NaN or Inf that must not reach the weights or a checkpoint."""


class NonFiniteGradient(Divergence):
    """The gradient norm at an accumulation boundary is NaN or infinite; the optimizer step was not applied."""

    def __init__(self, norm: float | None):
        super().__init__(f"non-finite gradient norm ({norm})")
        self.norm = norm


def non_finite_parameters(named_params: dict[str, torch.nn.Parameter], world_size: int = 1) -> list[str]:
    """Names of the parameters holding a NaN or Inf on any rank (under ZeRO-3 each rank checks its own shard; the
    answer is agreed across ranks, so that every rank takes the same branch)."""
    with torch.no_grad():
        flags = torch.tensor([float(not torch.isfinite(getattr(param, "ds_tensor", param)).all())
                              for param in named_params.values()], dtype=torch.float64)
    if world_size > 1 and flags.numel():
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return [name for name, flag in zip(named_params, flags.tolist()) if flag]


def whole_parameters(params: list[torch.nn.Parameter]):
    """A context in which ZeRO-3-partitioned `params` hold their whole values on every rank (every rank must enter
    it); a no-op for parameters DeepSpeed has not partitioned."""
    partitioned = [param for param in params if hasattr(param, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned)


class DeepSpeedConfigError(HscrError):
    """--deepspeed names no usable DeepSpeed configuration; the message says which setting and why."""


def resolve_deepspeed_config(setting: str, *, micro_batch: int, accumulation: int, max_grad_norm: float,
                             bf16: bool, world_size: int) -> dict | None:
    """The DeepSpeed config for --deepspeed ('none' → None, 'zero2' → built from the trainer's flags, else a JSON
    file), checked before the model loads. A file's "auto" (or absent) batch size, accumulation, clipping and bf16
    take the trainer's values; values that contradict the trainer's flags, and settings it cannot honour, are refused
    with the reason."""
    if setting == "none":
        return None
    if setting in ("zero2", "zero3"):
        return deepspeed_config(micro_batch=micro_batch, accumulation=accumulation, max_grad_norm=max_grad_norm,
                                bf16=bf16, zero_stage=int(setting[-1]))
    path = Path(setting)
    if not path.is_file():
        raise DeepSpeedConfigError(f"--deepspeed {setting!r}: not 'zero2', 'zero3', 'none' or an existing DeepSpeed "
                                   f"JSON file")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DeepSpeedConfigError(f"--deepspeed {path}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise DeepSpeedConfigError(f"--deepspeed {path}: expected a JSON object, got {type(config).__name__}")
    problems = []

    def settle(key: str, value, flag: str) -> None:
        given = config.get(key, "auto")
        if given == "auto":
            config[key] = value
        elif given != value:
            problems.append(f"{key} is {given!r} but {flag} gives {value!r}")

    settle("train_micro_batch_size_per_gpu", micro_batch, "--per-device-batch-size")
    settle("gradient_accumulation_steps", accumulation, "--gradient-accumulation-steps")
    settle("gradient_clipping", max_grad_norm, "--max-grad-norm")
    settle("train_batch_size", micro_batch * accumulation * world_size, "batch x accumulation x ranks")
    bf16_block = config.setdefault("bf16", {})
    if bf16_block.get("enabled", "auto") == "auto":
        bf16_block["enabled"] = bf16
    elif bool(bf16_block["enabled"]) != bf16:
        dtype = "bfloat16" if bf16 else "float32"
        problems.append(f"bf16.enabled is {bf16_block['enabled']!r} but --dtype gives {dtype}")
    if (config.get("fp16") or {}).get("enabled") not in (None, False, "auto"):
        problems.append("fp16 is enabled: the model runs in float32 or bfloat16 (--dtype), where an overflow is a "
                        "divergence, not something a loss scale fixes; remove the fp16 block")
    stage = (config.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (1, 2, 3):
        problems.append(f"zero_optimization.stage is {stage!r}: ZeRO stages 1-3 are supported (stage 0 checks no "
                        f"gradient for NaN; use --deepspeed none for plain data parallelism)")
    for block in ("optimizer", "scheduler"):
        if block in config:
            problems.append(f"a '{block}' block: the trainer brings its own AdamW and cosine schedule "
                            f"(--learning-rate, --warmup-ratio, --weight-decay); remove it")
    if problems:
        raise DeepSpeedConfigError(f"--deepspeed {path}: " + "; ".join(problems))
    config.setdefault("zero_allow_untested_optimizer", True)  # torch's AdamW, as in deepspeed_config
    return config


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Engine:
    """Shared checkpoint bookkeeping; subclasses implement the optimisation and the heavy state."""

    def __init__(self, named_params: dict[str, torch.nn.Parameter], checkpoint_dir: Path, rank: int,
                 world_size: int, keep: int):
        self.named_params = named_params
        self.checkpoint_dir = Path(checkpoint_dir)
        self.rank, self.world_size, self.keep = rank, world_size, keep

    def latest_tag(self) -> str | None:
        pointer = self.checkpoint_dir / LATEST
        return pointer.read_text().strip() if pointer.is_file() else None

    def save(self, tag: str, trainer_state: dict) -> Path:
        poisoned = non_finite_parameters(self.named_params, self.world_size)
        if poisoned:  # unreachable while every step checks its gradient; kept so that no path saves NaN
            raise Divergence(f"parameters not finite ({', '.join(poisoned[:3])}); nothing saved as {tag}")
        folder = self.checkpoint_dir / tag
        self._save_heavy(tag)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_output(folder / f"rng-rank{self.rank}.pt") as temporary:
            torch.save(_rng_state(), temporary)
        self.barrier()
        if self.rank == 0:
            atomic_write_text(folder / "trainer_state.json", json.dumps(trainer_state, indent=2))
            atomic_write_text(self.checkpoint_dir / LATEST, tag)
            self._prune(tag)
        self.barrier()
        return folder

    def load(self, tag: str) -> dict:
        folder = self.checkpoint_dir / tag
        self._load_heavy(tag)
        rng_path = folder / f"rng-rank{self.rank}.pt"
        if rng_path.is_file():
            _set_rng_state(torch.load(rng_path, weights_only=False))
        return json.loads((folder / "trainer_state.json").read_text())

    def _prune(self, current: str) -> None:
        tags = sorted((p for p in self.checkpoint_dir.glob("step-*") if p.is_dir()),
                      key=lambda p: int(p.name.split("-")[1]))
        for old in tags[:-self.keep]:
            if old.name != current:
                shutil.rmtree(old, ignore_errors=True)

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


class DeepSpeedEngine(Engine):
    def __init__(self, module, named_params, optimizer, scheduler, ds_config: dict, **kwargs):
        import deepspeed

        super().__init__(named_params, **kwargs)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, model_parameters=list(named_params.values()), optimizer=optimizer,
            lr_scheduler=scheduler, config=ds_config)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> bool:
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        # ZeRO checks every rank's gradient partition for NaN/Inf and, on "overflow", skips the update (and the
        # schedule). Without a loss scale to lower that is not recoverable: report it rather than train on.
        if boundary and not self.engine.was_step_applied():
            raise NonFiniteGradient(self.grad_norm)
        return boundary

    @property
    def grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def current_lr(self) -> float:
        return self.engine.get_lr()[0]

    def _save_heavy(self, tag: str) -> None:
        self.engine.save_checkpoint(str(self.checkpoint_dir), tag=tag, save_latest=False,
                                    exclude_frozen_parameters=True)

    def _load_heavy(self, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(str(self.checkpoint_dir), tag=tag, load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint {self.checkpoint_dir / tag}")


class TorchEngine(Engine):
    """Plain PyTorch: gradient accumulation, cross-rank gradient averaging, clipping, optimizer + scheduler."""

    def __init__(self, named_params: dict[str, torch.nn.Parameter], optimizer, scheduler, *, accumulation: int,
                 max_grad_norm: float, **kwargs):
        super().__init__(named_params, **kwargs)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.accumulation, self.max_grad_norm = accumulation, max_grad_norm
        self.micro_steps = 0
        self._grad_norm = None

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def step(self) -> bool:
        self.micro_steps += 1
        if self.micro_steps % self.accumulation:
            return False
        params = [p for p in self.named_params.values() if p.grad is not None]
        if self.world_size > 1:
            for param in params:
                torch.distributed.all_reduce(param.grad, op=torch.distributed.ReduceOp.SUM)
                param.grad /= self.world_size
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm if self.max_grad_norm > 0 else math.inf)
        self._grad_norm = float(norm)
        if not math.isfinite(self._grad_norm):  # the same on every rank: the gradients were averaged above
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteGradient(self._grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    @property
    def grad_norm(self) -> float | None:
        return self._grad_norm

    def current_lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def _save_heavy(self, tag: str) -> None:
        if self.rank != 0:
            return
        state = {"params": {name: p.detach().cpu() for name, p in self.named_params.items()},
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "micro_steps": self.micro_steps}
        with atomic_output(self.checkpoint_dir / tag / "engine.pt") as temporary:
            torch.save(state, temporary)

    def _load_heavy(self, tag: str) -> None:
        state = torch.load(self.checkpoint_dir / tag / "engine.pt", map_location="cpu", weights_only=False)
        with torch.no_grad():
            for name, param in self.named_params.items():
                param.copy_(state["params"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.micro_steps = state["micro_steps"]
