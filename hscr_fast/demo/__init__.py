"""The demo world: what every hscr_fast command falls back to when it is given no model or data.

- `hscr_fast.demo.phantom` — a procedural "phantom" Med-VQA dataset (synthetic chest scans with 0–2 lesions, questions
  whose answers depend on the image, exact lesion masks), deterministic from a seed.
- `hscr_fast.demo.sft` — the demo model's training: vision warm-up on the lesion masks, then SFT, on the CPU.
- `hscr_fast.demo.world` — `ensure_demo_world()`: data + SFT-trained tiny LLaVA, built once and cached on disk.
- `python -m hscr_fast.demo` — builds it (or finds it) and prints its accuracy with and without visual tokens.

Submodules are imported on use; this package imports nothing heavy.
"""

_LAZY = {"ensure_demo_world": "world", "DemoWorld": "world"}


def __getattr__(name):
    # `from hscr_fast.demo import ensure_demo_world` without importing torch at package import time.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
