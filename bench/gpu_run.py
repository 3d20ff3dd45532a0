"""Every GPU check in one run, one JSON: the parts below, each under its own time limit, so that the whole stays under
9 minutes on one H100/H200 (`bench/gpu.sh` installs the carried wheels and calls this).

Parts (in this order; `--parts` selects):
- kernel-tests: the kernel tests with CUDA tensors (compiled Triton, bf16), the Liger oracle, and the listwise
  FlexAttention tests (compiled flex attention against the dense path, values and gradients);
- kernel-bench: bench/test_bench_kernels.py (matmul-rate and bandwidth fractions, Liger side by side);
- step: bench/test_bench_listwise.py at the 7B shape (listwise vs TRL answer-only, dense vs FlexAttention, peak memory
  with checkpointing, MFU on real tokens);
- generate: bench/test_bench_generate.py (stage 1-2 throughput on the 7B shape, projected to 2,000 samples).

Output: OUT/gpu-<device>-<date>.json with the date, device, versions, commit, and per part its command, exit status,
seconds, whether it hit its limit, its log file and the results its benchmarks recorded. Exit status 0 only if every
selected part passed.

`--smoke` checks this driver without a GPU: each part's pytest command only collects its tests (imports, selection,
parametrisation), and the JSON is written the same way.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from hscr_fast.runtime.provenance import source_commit

ROOT = Path(__file__).resolve().parent.parent
PARTS = {
    "kernel-tests": (["tests/test_kernel_fused_linear_logprobs.py", "tests/test_kernel_contrastive_select.py",
                      "tests/test_kernel_fused_token_kl.py", "tests/test_listwise_attention.py"], 150),
    "kernel-bench": (["bench/test_bench_kernels.py"], 130),
    "step": (["bench/test_bench_listwise.py"], 190),
    "generate": (["bench/test_bench_generate.py"], 70),
}
PACKAGES = ("torch", "triton", "transformers", "peft", "trl", "liger-kernel", "accelerate", "datasets", "hscr-fast")


def versions() -> dict[str, str | None]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    found["python"] = platform.python_version()
    return found


def device_description() -> dict:
    """The GPU as torch sees it (name, memory, CUDA version), or None fields without one."""
    import torch

    if not torch.cuda.is_available():
        return {"cuda_device": None, "cuda": None, "memory_gib": None, "cpu": f"{platform.machine()}, "
                f"{os.cpu_count()} cores"}
    properties = torch.cuda.get_device_properties(0)
    return {"cuda_device": properties.name, "cuda": torch.version.cuda,
            "memory_gib": round(properties.total_memory / 2 ** 30, 1), "cpu": f"{platform.machine()}, "
            f"{os.cpu_count()} cores"}


def run_part(name: str, out: Path, *, smoke: bool, limit_s: float) -> dict:
    files, _ = PARTS[name]
    results = out / f"{name}-results.json"
    log = out / f"{name}.log"
    command = [sys.executable, "-m", "pytest", "-q", "-s", "-rs", "-p", "no:cacheprovider", *files]
    if smoke:
        command.append("--collect-only")
    env = dict(os.environ, HSCR_BENCH_RESULTS=str(results), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    with log.open("w") as stream:
        try:
            rc = subprocess.run(command, cwd=ROOT, env=env, stdout=stream, stderr=subprocess.STDOUT,
                                timeout=limit_s).returncode
            timed_out = False
        except subprocess.TimeoutExpired:
            rc, timed_out = None, True
    part = {"command": " ".join(command[1:]), "rc": rc, "timed_out": timed_out,
            "seconds": round(time.perf_counter() - start, 1), "limit_s": limit_s, "log": log.name}
    if results.exists():
        part["results"] = json.loads(results.read_text())["results"]
    return part


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "bench" / "results")),
                        help="folder for the JSON and the logs (default: $OUT, else bench/results)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated subset of: {', '.join(PARTS)} (default: all, in that order)")
    parser.add_argument("--smoke", action="store_true", help="collect every part's tests only (no GPU needed)")
    args = parser.parse_args(argv)
    selected = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = [part for part in selected if part not in PARTS]
    if unknown or not selected:
        parser.error(f"--parts: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(PARTS)}")
    device = device_description()
    if device["cuda_device"] is None and not args.smoke:
        print("gpu_run: no CUDA device; use --smoke to check this script on CPU", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    date = datetime.datetime.now(datetime.timezone.utc)
    label = (device["cuda_device"] or "cpu-smoke").lower().replace(" ", "-")
    report_path = args.out / f"gpu-{label}-{date:%Y-%m-%d}.json"
    report = {"date": date.isoformat(timespec="seconds"), "commit": source_commit(), "smoke": args.smoke, **device,
              "versions": versions(), "parts": {}}
    for name in selected:
        print(f"gpu_run: {name} (limit {PARTS[name][1]} s)", flush=True)
        report["parts"][name] = run_part(name, args.out, smoke=args.smoke, limit_s=PARTS[name][1])
        print(f"gpu_run: {name}: rc={report['parts'][name]['rc']} in {report['parts'][name]['seconds']} s",
              flush=True)
        tmp = report_path.with_suffix(".json.tmp")  # written after every part: a cut-off run keeps what it did
        tmp.write_text(json.dumps(report, indent=2))
        tmp.replace(report_path)
    print(f"gpu_run: wrote {report_path}")
    return 0 if all(part["rc"] == 0 for part in report["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
