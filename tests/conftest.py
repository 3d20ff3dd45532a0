"""Test-wide settings: offline hub, deterministic CPU threads, a throwaway home, shared fixtures (tiny models, real
data paths)."""
import json
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
# Subprocesses (torchrun, the DeepSpeed runs) still find packages installed with `pip install --user`.
os.environ.setdefault("PYTHONUSERBASE", site.getuserbase())
os.environ.update(HOME=str(TEST_HOME), XDG_CACHE_HOME=str(TEST_HOME / ".cache"),
                  XDG_CONFIG_HOME=str(TEST_HOME / ".config"), HF_HOME=str(TEST_HOME / ".cache" / "huggingface"),
                  HSCR_DEMO_DIR=str(TEST_HOME / "hscr-demo"), TRITON_CACHE_DIR=str(TEST_HOME / ".triton"),
                  TORCHINDUCTOR_CACHE_DIR=str(TEST_HOME / "torchinductor"), MPLCONFIGDIR=str(TEST_HOME / ".mpl"))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def throwaway_home():
    """The temporary home every test runs in (see TEST_HOME above); removed after the session."""
    yield TEST_HOME
    shutil.rmtree(TEST_HOME, ignore_errors=True)

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


def random_rgb_images(count: int, seed: int = 0, sizes=((60, 50), (41, 77), (56, 56), (90, 33))):
    """Random RGB PIL images of assorted (odd) sizes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (sizes[i % len(sizes)][1], sizes[i % len(sizes)][0], 3),
                                         dtype=np.uint8)) for i in range(count)]


@pytest.fixture(scope="session")
def make_images():
    """`make_images(count, seed=0)` → random RGB PIL images of odd sizes (a fixture: importlib mode has no conftest
    imports)."""
    return random_rgb_images


PREFERENCE_ANSWERS = ["yes", "no", "left upper lobe", "right lower lobe", "two lesions", "one", "a small nodule",
                      "the chest", "none seen", "a large mass in the right lung"]


def write_preference_lists(root: Path, files: dict[str, int], seed: int = 0) -> Path:
    """Preference JSONL files under `root` ({file name: number of lists}) with their images in `root/images`. List i
    has 1 + i % 3 dispreferred responses (k varies inside a batch), answers drawn from PREFERENCE_ANSWERS."""
    (root / "images").mkdir(exist_ok=True)
    images = random_rgb_images(sum(files.values()), seed=seed)
    index = 0
    for name, count in files.items():
        lines = []
        for _ in range(count):
            images[index].save(root / "images" / f"img{index}.png")
            responses = [PREFERENCE_ANSWERS[(index + shift) % len(PREFERENCE_ANSWERS)]
                         for shift in range(2 + index % 3)]
            lines.append(json.dumps({"id": f"s{index}", "image": f"img{index}.png",
                                     "prompt": f"Question number {index}: what is seen?", "responses": responses}))
            index += 1
        (root / name).write_text("\n".join(lines) + "\n")
    return root


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


@pytest.fixture(scope="session")
def preference_lists():
    """`preference_lists(root, {file name: count}, seed=0)`: see `write_preference_lists`."""
    return write_preference_lists


def assert_gradients_match(ours: list, theirs: list) -> int:
    """Per parameter: our gradient equals the reference one up to 1e-4 of the reference's largest entry (an absolute
    floor covers gradients that are zero in exact arithmetic and hold only round-off, such as the attention key bias,
    which softmax ignores). Returns how many parameters had a reference gradient."""
    compared = 0
    for mine, reference in zip(ours, theirs):
        if reference is None:
            assert mine is None or mine.abs().max() == 0
            continue
        assert (mine - reference).abs().max() <= 1e-4 * reference.abs().max() + 1e-7
        compared += 1
    return compared


@pytest.fixture(scope="session")
def gradients_match():
    """`gradients_match(ours, theirs)`: see `assert_gradients_match`."""
    return assert_gradients_match


def assert_compiles_for_hopper(script: str) -> None:
    """Runs `script` (Triton code compiling kernels for sm_90 with `triton.compile`) in a fresh interpreter without
    TRITON_INTERPRET, which the kernel test modules set: the interpreter does not type-check like the compiler.
    Skips where the triton build has no NVIDIA backend."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    if "No module named" in result.stderr and "nvidia" in result.stderr:
        pytest.skip("this triton build has no NVIDIA backend")
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="session")
def compiles_for_hopper():
    """`compiles_for_hopper(script)`: see `assert_compiles_for_hopper`."""
    return assert_compiles_for_hopper


class LargestTensor:
    """A torch dispatch mode recording the largest tensor any op produces while active (forward and backward), in
    elements (`numel`) and bytes (`nbytes`): how the kernel tests prove no [N, V] tensor is ever formed."""

    def __new__(cls):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        class _Mode(TorchDispatchMode):
            numel = 0
            nbytes = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for leaf in tree_leaves(out):
                    if isinstance(leaf, torch.Tensor):
                        self.numel = max(self.numel, leaf.numel())
                        self.nbytes = max(self.nbytes, leaf.numel() * leaf.element_size())
                return out

        return _Mode()


@pytest.fixture(scope="session")
def largest_tensor():
    """`with largest_tensor() as largest: ...` then `largest.numel` / `largest.nbytes` (see LargestTensor)."""
    return LargestTensor
