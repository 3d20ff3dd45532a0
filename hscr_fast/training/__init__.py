"""Stage 3: MLPO training of a LoRA adapter on preference lists.

- `config` — the run's settings (every flag of `torchrun -m hscr_fast.train`).
- `data` — preference lists validated before any model loads, tokenised once, batched deterministically.
- `reference` — the reference log-probs, computed once with the adapter disabled and cached.
- `objective` — the listwise forward of a batch and its loss (MLPO, DPO, weighted DPO, token KL).
- `heldout` — the same objective on held-out lists.
- `engine` — plain PyTorch or DeepSpeed steps and checkpoints.
- `loop` — `train(config)`: all of the above, top to bottom.
- `log` — metrics.jsonl and the training curves.
"""
