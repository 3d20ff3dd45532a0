"""Rotary positions of a prompt's prefix: 1D for LLaVA, 3D (M-RoPE) for Qwen2-VL.

LLaVA numbers every token of `text-before-image | visual tokens | text-after-image` 0, 1, 2, ...; visual token
dropout in `remove` mode shortens the sequence and the positions stay contiguous.

Qwen2-VL gives each visual token a (temporal, height, width) position on its image's grid, offset by the position
where the image starts, and the text after the image continues at that offset plus the image's extent (the larger
grid side), with all three components equal for text. `VisualLayout` holds an image's grid positions relative to its
start; dropout in `remove` mode keeps the surviving tokens' own grid positions (`select`), so the image still spans
its whole grid and the text after it sits where it would without dropout. The positions come from transformers'
own `get_vision_position_ids` (see `VisionLanguageModel.visual_layouts`), and tests compare whole forwards with
transformers' own (`get_rope_index`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VisualLayout:
    positions: torch.Tensor  # long [3, N]: (temporal, height, width) of each visual token, relative to the image start
    extent: int  # positions the image occupies: the text after it starts `extent` after the image's start

    def select(self, kept: torch.Tensor) -> "VisualLayout":
        """The layout of the tokens where `kept` (bool [N]) is True, with the image's extent unchanged."""
        return VisualLayout(self.positions[:, kept.to(self.positions.device)], self.extent)


def prefix_positions(num_before: int, num_visual: int, num_after: int, layout: VisualLayout | None = None,
                     device=None) -> tuple[torch.Tensor, int]:
    """(positions of the prefix's tokens, the position of the first token after the prefix).

    Positions are long [P] without a layout and [3, P] with one (P = num_before + num_visual + num_after)."""
    if layout is None:
        length = num_before + num_visual + num_after
        return torch.arange(length, device=device), length
    if layout.positions.shape[1] != num_visual:
        raise ValueError(f"the visual layout holds {layout.positions.shape[1]} positions for {num_visual} visual "
                         "tokens; apply the same dropout to both")
    before = torch.arange(num_before, device=device).expand(3, -1)
    visual = layout.positions.to(device) + num_before
    after = torch.arange(num_after, device=device).expand(3, -1) + num_before + layout.extent
    return torch.cat([before, visual, after], dim=1), num_before + layout.extent + num_after


def text_positions(start: int, length: int, mrope: bool, device=None) -> torch.Tensor:
    """Positions of `length` text tokens from `start`: [length], or [3, length] with every component equal."""
    positions = torch.arange(start, start + length, device=device)
    return positions.expand(3, -1) if mrope else positions
