"""Helpers the tests import by name (`from helpers import ...`; pytest puts tests/ on the path, see pyproject), as
opposed to fixtures, which conftest hands out."""
import json
import os
from pathlib import Path

import pytest
import torch


def make_images(count: int, seed: int = 0, sizes=((60, 50), (41, 77), (56, 56), (90, 33))):
    """Random RGB PIL images of assorted (odd) sizes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (sizes[i % len(sizes)][1], sizes[i % len(sizes)][0], 3),
                                         dtype=np.uint8)) for i in range(count)]


PREFERENCE_ANSWERS = ["yes", "no", "left upper lobe", "right lower lobe", "two lesions", "one", "a small nodule",
                      "the chest", "none seen", "a large mass in the right lung"]


def write_preference_lists(root: Path, files: dict[str, int], seed: int = 0) -> Path:
    """Preference JSONL files under `root` ({file name: number of lists}) with their images in `root/images`. List i
    has 1 + i % 3 dispreferred responses (k varies inside a batch), answers drawn from PREFERENCE_ANSWERS."""
    (root / "images").mkdir(exist_ok=True)
    images = make_images(sum(files.values()), seed=seed)
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
