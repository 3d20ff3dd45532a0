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

import json
import math
import shutil
from pathlib import Path

import torch

from hscr_fast.runtime.io import atomic_output, atomic_write_text

LATEST = "latest"


def deepspeed_config(*, micro_batch: int, accumulation: int, max_grad_norm: float, bf16: bool,
                     zero_stage: int = 2) -> dict:
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


def non_finite_parameters(named_params: dict[str, torch.nn.Parameter]) -> list[str]:
    """Names of the parameters holding a NaN or Inf (this rank's shard of a ZeRO-3-partitioned parameter)."""
    with torch.no_grad():
        return [name for name, param in named_params.items()
                if not torch.isfinite(getattr(param, "ds_tensor", param)).all()]


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
        poisoned = non_finite_parameters(self.named_params)
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
