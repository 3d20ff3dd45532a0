"""Med-VQA evaluation: greedy generation, LLaVA-Med's scoring, reports.

- `generation` — batched greedy decoding with the visual tokens, without them, or partly dropped.
- `metrics` — closed accuracy / open recall as LLaVA-Med's evaluation computes them.
- `report` — metrics.json/.md, comparison and before/after charts.
- `run` — a whole evaluation run, resumable (`python -m hscr_fast.evaluate`).
"""
