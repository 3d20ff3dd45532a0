"""The README's library example runs as written (on the tiny model, with random images), so it cannot rot."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def library_example() -> str:
    section = README.read_text().split("## As a library", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return code


@pytest.mark.parametrize("family", ["llava", "qwen2-vl"])
def test_the_library_example_runs(tmp_path, make_images, family):
    from hscr_fast.models.tiny import TinyLlavaSpec, build_tiny_llava

    model, processor = build_tiny_llava(TinyLlavaSpec(family=family))
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    code = library_example()
    assert 'load_vlm("llava-med-hf/")' in code
    namespace = {"images": make_images(2, seed=1)}
    exec(compile(code.replace("llava-med-hf/", str(tmp_path / "model")), str(README), "exec"), namespace)
    assert namespace["policy"].shape == (2, 3) and namespace["batch"].valid.sum() == 5
    assert namespace["loss"].item() > 0 and namespace["metrics"]["num_pairs_explicit"] == 3
    assert any(p.grad is not None for p in namespace["vlm"].model.parameters())
