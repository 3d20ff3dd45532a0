"""Test-wide settings: offline hub, deterministic CPU threads, shared fixtures (tiny models, real data paths)."""
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


def shared_data_dir() -> Path | None:
    """The project's real Med-VQA data (VQA-RAD, SLAKE), or None when this checkout does not have it."""
    candidate = Path(os.environ.get("HSCR_SHARED_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
    return candidate.resolve() if candidate.is_dir() else None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("real Med-VQA data not found: set HSCR_SHARED_DATA or place it at ../shared/data")
    return path
