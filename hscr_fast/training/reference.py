"""Reference log-probs: computed once before training with the adapter disabled, cached beside the data.

The reference model of MLPO/DPO is the SFT model. With LoRA it is the base model with the adapter switched off, so
instead of holding a second 7B model we run the same listwise forward once over the data, without gradients, and
cache log π_ref(y) for every response. Training then holds one model.

The cache is keyed by the `content_hash` (hscr_fast.runtime.resume) of everything that changes the numbers: the model
(config, weight file names, sizes and modification times — hashing 14 GB of weights would take longer than
recomputing), the preference file's bytes, the prompt format and the dtype. Other settings name another cache file;
the same fingerprint is the training run's `preferences_fingerprint`, so a checkpoint resumes only on the same data and
reference. Under torchrun every rank computes a shard and rank 0 writes the file.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hscr_fast.listwise import listwise_logprobs, pack_examples
from hscr_fast.runtime.io import atomic_output
from hscr_fast.runtime.resume import content_hash, file_digest
from hscr_fast.training.data import TokenizedPreference, to_examples


def reference_settings(model_dir: str | Path, preferences_path: str | Path, *, prompt_format: str,
                       dtype: torch.dtype) -> dict:
    """What the reference log-probs depend on. Of the model's files, the JSON ones by content, the weights by name,
    size and modification time."""
    model_files = {}
    for path in sorted(Path(model_dir).glob("*")):
        if path.suffix in (".json", ".safetensors", ".bin", ".model"):
            stat = path.stat()
            model_files[path.name] = [stat.st_size, stat.st_mtime_ns,
                                      file_digest(path) if path.suffix == ".json" else None]
    return {"model_files": model_files, "preferences": file_digest(preferences_path), "prompt_format": prompt_format,
            "dtype": str(dtype)}


def reference_fingerprint(model_dir: str | Path, preferences_path: str | Path, *, prompt_format: str,
                          dtype: torch.dtype) -> str:
    return content_hash(reference_settings(model_dir, preferences_path, prompt_format=prompt_format, dtype=dtype))


def reference_cache_path(preferences_path: str | Path, fingerprint: str) -> Path:
    path = Path(preferences_path)
    return path.with_name(f"{path.stem}.ref-logps-{fingerprint}.json")


@torch.no_grad()
def compute_reference_logps(vlm, items: list[TokenizedPreference], *, batch_size: int,
                            show_progress: bool = True) -> dict[str, list[float]]:
    """{id: [log π_ref(y_w), log π_ref(y_l1), ...]} with every adapter disabled."""
    result = {}
    with vlm.adapter_disabled():
        for start in tqdm(range(0, len(items), batch_size), desc="reference log-probs", unit="batch",
                          disable=not show_progress):
            chunk = items[start:start + batch_size]
            batch = pack_examples(vlm.embed_tokens, to_examples(vlm, chunk))
            logps = listwise_logprobs(vlm, batch)
            for row, item in enumerate(chunk):
                result[item.id] = logps[row, :len(item.responses)].tolist()
    return result


def load_or_compute_reference(vlm, items: list[TokenizedPreference], cache_path: Path, *, batch_size: int,
                              rank: int = 0, world_size: int = 1) -> dict[str, list[float]]:
    if cache_path.is_file():
        cached = json.loads(cache_path.read_text())
        if all(item.id in cached for item in items):
            return cached
    shard = items[rank::world_size]
    result = compute_reference_logps(vlm, shard, batch_size=batch_size, show_progress=rank == 0)
    if world_size > 1:
        import torch.distributed as dist

        gathered = [None] * world_size
        dist.all_gather_object(gathered, result)
        result = {key: value for part in gathered for key, value in part.items()}
    if rank == 0:
        with atomic_output(cache_path) as temporary:
            temporary.write_text(json.dumps(result))
    return result


def reference_tensor(reference: dict[str, list[float]], items: list[TokenizedPreference], num_slots: int,
                     device) -> torch.Tensor:
    """[B, S] reference log-probs for a batch (0 at missing slots, which the loss masks out)."""
    out = torch.zeros(len(items), num_slots, dtype=torch.float32)
    for row, item in enumerate(items):
        values = reference[item.id]
        out[row, :len(values)] = torch.tensor(values, dtype=torch.float32)
    return out.to(device)
