"""Held-out evaluation during training: the training objective on preference lists the optimizer never steps on.

The lists come from `--eval-preferences FILE` or from `--eval-fraction F` of the training file. The held-out fraction
is chosen by a hash of each list's id. The split is then the same across reruns, ranks and reorderings of the file.
It does not depend on `--seed`, so changing the seed never moves a held-out list into training.

The metrics cover the whole held-out set exactly. Each rank scores its shard with `objective.score_batch` (eval mode,
no gradients) and the per-sample tensors are gathered. The loss then runs once over all of them
(`objective.batch_loss`). So the numbers do not depend on the batch size or the number of ranks, and they are not
averages of batch averages. The trainer logs them as `eval_*` rows in metrics.jsonl and plots them beside the
training curves. That is where over-optimisation shows: held-out margins stall or fall while the training margins
keep rising.
"""
from __future__ import annotations

import hashlib

import torch

from hscr_fast.data.records import DataFormatError
from hscr_fast.training.objective import batch_loss, concat_scored, score_batch


def _unit_hash(text: str) -> float:
    """A uniform number in [0, 1) fixed by `text` alone."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2 ** 64


def split_held_out(records: list, fraction: float, source: str) -> tuple[list, list]:
    """(training records, held-out records): a list is held out when the hash of its id falls below `fraction`."""
    if not 0.0 < fraction < 1.0:
        raise DataFormatError(f"--eval-fraction must lie strictly between 0 and 1, got {fraction}")
    held_out = [record for record in records if _unit_hash(record.id) < fraction]
    kept = [record for record in records if _unit_hash(record.id) >= fraction]
    if not held_out:
        raise DataFormatError(f"--eval-fraction {fraction} holds out none of the {len(records)} preference lists in "
                              f"{source}; raise it, or pass --eval-preferences")
    if not kept:
        raise DataFormatError(f"--eval-fraction {fraction} holds out all {len(records)} preference lists in "
                              f"{source}, leaving nothing to train on; lower it")
    return kept, held_out


@torch.no_grad()
def held_out_metrics(vlm, items: list, reference: dict[str, list[float]], objective, device, *, batch_size: int,
                     rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """`eval_<metric>` for every scalar metric of the training objective, over all of `items`, plus `eval_lists`.

    Every rank must call this (the per-sample results are gathered); rank r scores items r, r + world_size, ..."""
    was_training = vlm.model.training
    vlm.model.eval()  # no LoRA dropout: the held-out numbers measure the policy, not one noisy draw of it
    try:
        shard = items[rank::world_size]
        scored = [score_batch(vlm, shard[start:start + batch_size], reference, objective, device)
                  for start in range(0, len(shard), batch_size)]
    finally:
        vlm.model.train(was_training)
    local = concat_scored(scored) if scored else None
    if world_size > 1:
        gathered = [None] * world_size
        torch.distributed.all_gather_object(gathered, local)
        parts = [part for part in gathered if part is not None]
    else:
        parts = [local]
    _, metrics = batch_loss(concat_scored(parts), objective)
    result = {f"eval_{name}": float(value) for name, value in metrics.items() if value.numel() == 1}
    result["eval_lists"] = len(items)
    return result
