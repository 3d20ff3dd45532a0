"""Test-wide settings: offline hub, deterministic CPU threads, a throwaway home, shared fixtures (tiny models, real
data paths)."""
import atexit
import os
import shutil
import site
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# Nothing a test runs may write to the user's home or caches (~/.cache/hscr_fast's demo world, the Hugging Face,
# Triton, Inductor and matplotlib caches): every such location points into one temporary folder, removed when the
# session ends. Set at import, before any test module imports a library that reads these variables once.
TEST_HOME = Path(tempfile.mkdtemp(prefix="hscr-tests-home-"))
# Removed at exit rather than by a session fixture: pytest-xdist's controller imports this file too but runs no
# fixtures, and left one folder behind per run.
atexit.register(shutil.rmtree, TEST_HOME, ignore_errors=True)
# Subprocesses (torchrun, the DeepSpeed runs) still find packages installed with `pip install --user`.
os.environ.setdefault("PYTHONUSERBASE", site.getuserbase())
os.environ.update(HOME=str(TEST_HOME), XDG_CACHE_HOME=str(TEST_HOME / ".cache"),
                  XDG_CONFIG_HOME=str(TEST_HOME / ".config"), HF_HOME=str(TEST_HOME / ".cache" / "huggingface"),
                  HSCR_DEMO_DIR=str(TEST_HOME / "hscr-demo"), TRITON_CACHE_DIR=str(TEST_HOME / ".triton"),
                  TORCHINDUCTOR_CACHE_DIR=str(TEST_HOME / "torchinductor"), MPLCONFIGDIR=str(TEST_HOME / ".mpl"))
# DeepSpeed compiles a C++ op (shared-memory collectives) the first time a CPU process group starts: minutes on a
# loaded 2-core machine. Built once per machine into the system's temporary folder, not once per session (and never
# into ~/.cache).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(tempfile.gettempdir()) / "hscr-tests-torch-extensions"))

import pytest  # noqa: E402
import torch  # noqa: E402

# Each pytest-xdist worker gets its share of the cores (the README's test command runs one worker per core): two
# workers of two OpenMP threads each on a 2-core machine spin-wait for each other. Subprocesses (torchrun, the
# commands) inherit the same share through OMP_NUM_THREADS.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
CPU_THREADS = max(1, min(2, (os.cpu_count() or 1) // _WORKERS))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(CPU_THREADS))
torch.set_num_threads(CPU_THREADS)


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


@pytest.fixture(scope="module")
def one_cpu_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_cpu_thread")`): two OpenMP threads
    on a shared 2-core machine spin-wait for each other, and tiny forwards get ~40x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_llava():
    """(model, processor): a tiny real-architecture LLaVA (CLIP vision + Mistral), random weights, float32, eval."""
    from hscr_fast.models.tiny import build_tiny_llava

    return build_tiny_llava()


@pytest.fixture(scope="session")
def tiny_vlm(tiny_llava):
    from hscr_fast.models.vlm import VisionLanguageModel

    model, processor = tiny_llava
    return VisionLanguageModel(model, processor)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_llava):
    """The tiny LLaVA saved as a standard transformers checkpoint directory."""
    out = tmp_path_factory.mktemp("tiny_llava")
    model, processor = tiny_llava
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def train_config(tiny_model_dir):
    """`train_config(data_root, out, **overrides)`: a TrainConfig for the tiny model on `data_root/prefs.jsonl`
    (images in `data_root/images`): 2 epochs of batches of 2 at lr 2e-3, plain PyTorch, checkpoints every 2 steps."""
    from hscr_fast.training.config import TrainConfig

    def make(data_root, out, **overrides):
        values = dict(model=str(tiny_model_dir), preferences=str(data_root / "prefs.jsonl"),
                      image_folder=str(data_root / "images"), out=str(out), epochs=2, learning_rate=2e-3,
                      per_device_batch_size=2, deepspeed="none", save_steps=2, warmup_ratio=0.1)
        values.update(overrides)
        return TrainConfig(**values)

    return make


