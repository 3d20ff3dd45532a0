"""The demo world: what every hscr_fast command falls back to when it is given no model or data.

- `hscr_fast.demo.phantom` — a procedural "phantom" Med-VQA dataset (synthetic chest scans with 0–2 lesions, questions
  whose answers depend on the image, exact lesion masks), deterministic from a seed.

Submodules are imported on use; this package imports nothing heavy.
"""
