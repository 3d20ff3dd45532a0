"""One divergence policy on both engines (plain PyTorch and DeepSpeed ZeRO-2): a non-finite loss or gradient norm
stops the run with exit code 3 before the step is applied; the checkpoint the message names is finite and resumes;
nothing non-finite is ever saved (checkpoints, adapter, metrics.jsonl holds strict JSON).

The gradient is poisoned while the loss stays finite (the case a loss-only check misses): at the third micro-batch an
identity on the loss whose backward returns NaN."""
import json
import os
import re
import subprocess
import sys

import pytest
from helpers import write_preference_lists

POISON = """
import sys, torch
import hscr_fast.training.objective as objective


class NanGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value):
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def poisoned_batch_loss(poisoned_call, real=objective.batch_loss):
    calls = [0]

    def batch_loss(scored, config):
        loss, metrics = real(scored, config)
        calls[0] += 1
        return (NanGradient.apply(loss) if calls[0] == poisoned_call else loss), metrics

    return batch_loss
"""


def run_train(args, tmp_path, poisoned_call=3):
    """`python -m hscr_fast.train ARGS` with micro-batch `poisoned_call`'s gradient poisoned (0: none), in a fresh
    process: DeepSpeed's process group cannot be torn down and rebuilt inside one."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    script = POISON + (f"objective.batch_loss = poisoned_batch_loss({poisoned_call})\n"
                       "from hscr_fast.train import main\nsys.exit(main(sys.argv[1:]))\n")
    return subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                          timeout=900, cwd=tmp_path, check=False)


def strict_rows(path):
    def refuse(constant):
        raise ValueError(f"{path} holds a bare {constant}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def all_finite_tensors(folder):
    """Every floating tensor in every checkpoint/adapter file under `folder` is finite (and there is at least one)."""
    import torch
    from safetensors.torch import load_file

    def tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            for item in value.values():
                yield from tensors(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                yield from tensors(item)

    found = 0
    for path in sorted(folder.rglob("*")):
        if path.suffix == ".safetensors":
            values = list(load_file(path).values())
        elif path.suffix == ".pt" and not path.name.startswith("rng-"):
            values = list(tensors(torch.load(path, map_location="cpu", weights_only=False)))
        else:
            continue
        for tensor in values:
            if tensor.is_floating_point():
                assert torch.isfinite(tensor).all(), f"non-finite values in {path}"
                found += 1
    assert found, f"no tensors under {folder}"


def check_stopped_run(out, code, stderr):
    assert code == 3, stderr[-3000:]
    message = stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"error: non-finite gradient norm \((nan|inf)\) at optimizer step 3 .*not applied.*Last "
                        r"good checkpoint: .*step-2 .*--resume", message), message
    assert (out / "checkpoints" / "latest").read_text() == "step-2"
    assert not (out / "checkpoints" / "step-3").exists() and not (out / "adapter").exists()
    all_finite_tensors(out / "checkpoints" / "step-2")
    assert [row["step"] for row in strict_rows(out / "metrics.jsonl")] == [1, 2]


def check_resumed_run(out, code, stderr):
    assert code == 0, stderr[-3000:]
    assert [row["step"] for row in strict_rows(out / "metrics.jsonl")] == [1, 2, 3, 4]
    all_finite_tensors(out / "adapter")


def train_arguments(model_dir, data, out, engine):
    return ["--model", str(model_dir), "--preferences", str(data / "prefs.jsonl"), "--image-folder",
            str(data / "images"), "--epochs", "1", "--per-device-batch-size", "2", "--learning-rate", "2e-3",
            "--deepspeed", engine, "--save-steps", "1", "--out", str(out)]


def test_non_finite_gradient_stops_before_the_step_plain_engine(tiny_model_dir, tmp_path,
                                                                monkeypatch, capsys):
    """In this process (the plain engine needs no process group); the named checkpoint resumes to the end."""
    from hscr_fast.train import main

    namespace = {}
    exec(POISON, namespace)  # the same poisoned batch_loss as the DeepSpeed run's
    monkeypatch.setattr("hscr_fast.training.objective.batch_loss", namespace["poisoned_batch_loss"](3))
    data, out = write_preference_lists(tmp_path, {"prefs.jsonl": 8}, seed=3), tmp_path / "run"
    arguments = train_arguments(tiny_model_dir, data, out, "none")
    check_stopped_run(out, main([*arguments, "--stop-after-steps", "3"]), capsys.readouterr().err)
    monkeypatch.setattr("hscr_fast.training.objective.batch_loss", namespace["poisoned_batch_loss"](0))
    check_resumed_run(out, main([*arguments, "--resume"]), capsys.readouterr().err)


@pytest.mark.slow  # ~2 min on a loaded 2-core machine: two interpreters importing DeepSpeed
def test_non_finite_gradient_stops_before_the_step_deepspeed(tiny_model_dir, tmp_path):
    """ZeRO-2 in fp32: DeepSpeed's "overflow, skipping step" is a divergence, reported like the plain engine's."""
    data, out = write_preference_lists(tmp_path, {"prefs.jsonl": 8}, seed=3), tmp_path / "run"
    arguments = train_arguments(tiny_model_dir, data, out, "zero2")
    stopped = run_train([*arguments, "--stop-after-steps", "3"], tmp_path)
    check_stopped_run(out, stopped.returncode, stopped.stderr)
    resumed = run_train([*arguments, "--resume"], tmp_path, poisoned_call=0)
    check_resumed_run(out, resumed.returncode, resumed.stderr)


def test_metrics_log_writes_null_for_nan_and_infinity(tmp_path):
    from hscr_fast.training.log import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.append({"step": 1, "loss": 0.5, "grad_norm": float("inf"), "accuracy_implicit": float("nan")})
    assert strict_rows(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 0.5, "grad_norm": None,
                                                       "accuracy_implicit": None}]
