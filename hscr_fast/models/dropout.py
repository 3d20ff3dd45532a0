"""Visual token dropout (Stage 1, step 1 in docs/method.md).

After the projector, `drop_ratio` of the visual tokens are dropped, chosen uniformly at random by a generator seeded
from (global seed, sample id), so every run, rank and resume drops the same tokens for the same sample.

- mode `remove`: the dropped tokens leave the sequence (shorter input; positions stay contiguous, or with Qwen2-VL's
  3D positions the surviving tokens keep their own, see models/positions.py);
- mode `mask`: they stay in place but no query attends to them.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

DROPOUT_MODES = ("remove", "mask")


def sample_seed(global_seed: int, sample_id: str | int) -> int:
    """A 63-bit seed from (global seed, sample id). Python's `hash()` is salted per process, so it is not used."""
    digest = hashlib.sha256(f"{global_seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class VisualDropout:
    """Which of a sample's N visual tokens survive, and how the dropped ones are taken out."""

    kept: torch.Tensor  # bool [N]
    mode: str

    @property
    def num_kept(self) -> int:
        return int(self.kept.sum())

    def apply(self, visual_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """visual tokens [N, D] → (tokens placed in the sequence [N', D], attendable bool [N'])."""
        kept = self.kept.to(visual_tokens.device)
        if self.mode == "remove":
            return visual_tokens[kept], torch.ones(self.num_kept, dtype=torch.bool, device=visual_tokens.device)
        return visual_tokens, kept

    def apply_layout(self, layout):
        """The 3D rotary layout (models/positions.py) of what `apply` places in the sequence; None stays None."""
        if layout is None or self.mode == "mask":
            return layout
        return layout.select(self.kept)


def visual_dropout(num_visual_tokens: int, drop_ratio: float, *, global_seed: int, sample_id: str | int,
                   mode: str = "remove") -> VisualDropout:
    if mode not in DROPOUT_MODES:
        raise ValueError(f"unknown dropout mode {mode!r}; expected one of {DROPOUT_MODES}")
    if not 0.0 <= drop_ratio < 1.0:
        raise ValueError(f"drop_ratio must be in [0, 1): got {drop_ratio}")
    num_dropped = int(round(drop_ratio * num_visual_tokens))
    generator = torch.Generator().manual_seed(sample_seed(global_seed, sample_id))
    dropped = torch.randperm(num_visual_tokens, generator=generator)[:num_dropped]
    kept = torch.ones(num_visual_tokens, dtype=torch.bool)
    kept[dropped] = False
    return VisualDropout(kept, mode)
