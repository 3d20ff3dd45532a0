"""The one automatic precision choice every command makes: `--dtype auto` is bfloat16 on CUDA and float32 elsewhere
(CPU bfloat16 matmuls are slow, and float16 would need loss scaling for training)."""
from __future__ import annotations

from hscr_fast.runtime.errors import HscrError

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def resolve_dtype(name: str, device) -> str:
    """`name` ("auto" or one of DTYPE_NAMES) for a model on `device` (a torch.device or a string such as "cuda:1")."""
    if name == "auto":
        return "bfloat16" if str(device).startswith("cuda") else "float32"
    if name not in DTYPE_NAMES:
        raise HscrError(f"--dtype must be auto or one of {sorted(DTYPE_NAMES)}, got {name!r}")
    return name


def torch_dtype(name: str):
    """The torch dtype of a resolved name."""
    import torch

    return getattr(torch, name)
