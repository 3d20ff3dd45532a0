"""Stages 1-2: preference lists from an SFT model and its data.

- `selfcontrast` — Stage 1: token sensitivity under visual token dropout, graded variants of each answer.
- `rerank` — Stage 2: similarity-aware re-ranking into y_w ≻ y_l1 ≻ … ≻ y_lk.
- `pipeline` — both stages over a data file, resumable and sharded across ranks (`python -m hscr_fast.generate`).
- Sibling data builders: `image_preferences` + `corruption` (image-side dispreference: the same answer under a
  corrupted image) and `minimal_edits` (pairs from HSCR's lists with the differing words marked).
"""
