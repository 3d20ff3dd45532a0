"""The README's library example runs as written (on the tiny model, with random images), so it cannot rot."""
import math
import re
from pathlib import Path

import pytest
from helpers import make_images

README = Path(__file__).resolve().parent.parent / "README.md"


def library_example(marker: str) -> str:
    """The one Python block of the "As a library" section that contains `marker`."""
    section = README.read_text().split("## As a library", 1)[1].split("\n## ", 1)[0]
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", section, flags=re.S) if marker in block]
    return code


@pytest.mark.parametrize("family", ["llava", "qwen2-vl"])
def test_the_library_example_runs(tmp_path, family):
    from hscr_fast.models.tiny import TinyLlavaSpec, build_tiny_llava

    model, processor = build_tiny_llava(TinyLlavaSpec(family=family))
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    code = library_example('load_vlm("llava-med-hf/")')
    namespace = {"images": make_images(2, seed=1)}
    exec(compile(code.replace("llava-med-hf/", str(tmp_path / "model")), str(README), "exec"), namespace)
    assert namespace["policy"].shape == (2, 3) and namespace["batch"].valid.sum() == 5
    assert namespace["loss"].item() > 0 and namespace["metrics"]["num_pairs_explicit"] == 3
    assert any(p.grad is not None for p in namespace["vlm"].model.parameters())


@pytest.mark.parametrize("decoder", ["qwen2", "llama"])
def test_the_text_only_example_runs_on_a_stock_causal_lm(tmp_path, decoder):
    """Qwen2 with its chat template, Llama with plain prompts; in under 15 lines as the section promises."""
    from hscr_fast.models.tiny_text import save_tiny_causal_lm

    model_dir = save_tiny_causal_lm(tmp_path / "model", decoder, seed=3)
    code = library_example("AutoModelForCausalLM")
    assert len(code.strip().splitlines()) < 15
    namespace = {}
    exec(compile(code.replace("Qwen/Qwen2.5-0.5B-Instruct", str(model_dir)), str(README), "exec"), namespace)
    assert namespace["batch"].valid.tolist() == [[True, True, True], [True, True, False]]
    # The policy is the reference at this step: every reward is 0, so each list costs Σ_i log(n − i) nats.
    assert namespace["loss"].item() == pytest.approx((math.log(3 * 2) + math.log(2)) / 2, rel=1e-5)
    assert all(p.grad is not None for p in namespace["model"].parameters())


def test_the_demo_world_numbers_are_generated_from_the_committed_results():
    """The README's demo-world tables are `bench/demo_readme.py render` of bench/results/, never edited by hand."""
    import importlib.util

    script = README.parent / "bench" / "demo_readme.py"
    spec = importlib.util.spec_from_file_location("demo_readme", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.replaced(README.read_text(), module.render()) == README.read_text(), \
        "README demo-world block is stale: run python bench/demo_readme.py render"


def test_the_performance_tables_are_generated_from_the_committed_results():
    """No typed figure: the README's performance tables are exactly what bench/readme_table.py makes of
    bench/results/*.json."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_table", README.parent / "bench" / "readme_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--check"]) == 0


def test_ci_runs_exactly_the_readme_test_command():
    """`.ci/run` ends with the README's test command (linter included), so what CI checks is what a user runs."""
    section = README.read_text().split("**Run the tests**", 1)[1]
    command = re.search(r"```bash\n(.*?)\n```", section, flags=re.S).group(1).strip()
    ci_lines = (README.parent / ".ci" / "run").read_text().strip().splitlines()
    assert "ruff check ." in command and "pytest" in command
    assert ci_lines[-1].strip() == command


def test_the_stage1_table_is_the_committed_measurement():
    """The README's stage-1 table is generated from bench/results/stage1-rules.json, never typed."""
    import importlib.util
    import json

    root = README.parent
    spec = importlib.util.spec_from_file_location("stage1_rules", root / "bench" / "stage1_rules.py")
    stage1_rules = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage1_rules)
    result = json.loads((root / "bench" / "results" / "stage1-rules.json").read_text())
    block = README.read_text().split(stage1_rules.TABLE_BEGIN, 1)[1].split(stage1_rules.TABLE_END, 1)[0]
    assert block.strip() == stage1_rules.table(result).strip()
