"""The one command to run the first time a CUDA GPU is at hand: every GPU check, one report.

    python -m benchmarks.gpu_check [--out FOLDER]

Without a usable CUDA GPU it prints one line saying why and exits with code 2. With one it runs,
each part in its own process under its own time limit (495 s at the most; not yet run on a GPU, so how
long it takes is not measured):

1. the tests on CuPy: every test with a CuPy backend or ``gpu=True``, with ``TINYUNET_TEST_GPU=1`` so
   that they run on the real device (not the stand-in) and fail rather than skip;
2. the dtype checks (float32 kept at batches over 65535 pixels), on their own;
3. a 2-epoch ``train.py --gpu`` on a small synthetic set (400 images, the recipe's 128 x 128);
4. ``predict.py --gpu --evaluate`` with the model it trained;
5. ``benchmarks.bench_train_step --gpu`` and ``benchmarks.bench_inference --gpu``, beside PyTorch
   CUDA when PyTorch is importable.

The report, ``gpu_check_report.md``, goes to ``--out`` (default: ``$OUT`` when set, else the current
folder): the device, then each part's command, result, time and output. The exit code is 0 when
every part passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinyunet.backend import GPUUnavailableError, gpu_backend

ROOT = Path(__file__).resolve().parents[1]
REPORT = "gpu_check_report.md"
TAIL_LINES = 60  # output lines of each part kept in the report


@dataclass
class Part:
    title: str
    command: list[str]
    limit_s: int
    env: dict | None = None


def parts(work: Path) -> list[Part]:
    """What runs, in order; ``work`` holds the synthetic data and the run folders."""
    py = sys.executable
    data, run = work / "synthetic", work / "run"
    gpu_tests = {"TINYUNET_TEST_GPU": "1"}
    return [
        Part("tests on CuPy", [py, "-m", "pytest", "-q", "-k", "cupy or gpu", "--ignore", "tests/test_dtypes.py",
                                 "tests"], 150, gpu_tests),  # the dtype checks are the next part
        Part("dtype checks", [py, "-m", "pytest", "-q", "tests/test_dtypes.py"], 45, gpu_tests),
        Part("synthetic data", [py, "-c", f"from tinyunet.synth import generate; "
                                          f"generate({str(data)!r}, n_train=400, n_test=50)"], 45),
        Part("train.py --gpu, 2 epochs", [py, "train.py", "--data", str(data), "--gpu", "--epochs", "2",
                                         "--out", str(run), "--no-progress"], 90),
        Part("predict.py --gpu --evaluate", [py, "predict.py", "--model", str(run / "best.npz"), "--data",
                                             str(data), "--gpu", "--evaluate", "--out",
                                             str(work / "predict")], 45),  # a folder: every output goes there
        Part("bench_train_step --gpu", [py, "-m", "benchmarks.bench_train_step", "--gpu"], 60),
        Part("bench_inference --gpu", [py, "-m", "benchmarks.bench_inference", "--gpu"], 60),
    ]


def device_lines(cupy) -> list[str]:
    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    runtime = cupy.cuda.runtime.runtimeGetVersion()
    return [f"- GPU: {name}, {props['multiProcessorCount']} multiprocessors, "
            f"{props['totalGlobalMem'] / 2 ** 30:.1f} GiB",
            f"- CuPy {cupy.__version__}, CUDA runtime {runtime // 1000}.{runtime % 1000 // 10}, "
            f"NumPy {np.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPU cores"]


def run_part(part: Part) -> tuple[str, float, str]:
    """(result, seconds, output) of one part."""
    started = time.perf_counter()
    env = {**os.environ, **(part.env or {})}
    try:
        done = subprocess.run(part.command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=part.limit_s)
        result = "passed" if done.returncode == 0 else f"FAILED (exit code {done.returncode})"
        output = done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        result = f"TIMED OUT after {part.limit_s} s"
        output = "".join(b.decode(errors="replace") if isinstance(b, bytes) else b
                         for b in (err.stdout, err.stderr) if b)
    return result, time.perf_counter() - started, output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "."),
                        help="folder for gpu_check_report.md (default: $OUT when set, else the current folder)")
    args = parser.parse_args(argv)
    try:
        cupy = gpu_backend()
    except GPUUnavailableError as err:
        print("gpu_check: no usable CUDA GPU here, nothing to check: " + " ".join(str(err).split()))
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = out / REPORT
    lines = ["# tinyunet GPU check", "", f"{time.strftime('%Y-%m-%d %H:%M')}, `python -m benchmarks.gpu_check`",
             "", *device_lines(cupy), ""]
    failed = 0
    with tempfile.TemporaryDirectory(prefix="tinyunet-gpu-check-") as work:
        for part in parts(Path(work)):
            print(f"{part.title} ...", flush=True)
            result, seconds, output = run_part(part)
            failed += result != "passed"
            print(f"  {result} in {seconds:.0f} s", flush=True)
            tail = output.strip().splitlines()[-TAIL_LINES:]
            lines += [f"## {part.title}: {result}, {seconds:.1f} s", "",
                      f"`{shlex.join('python' if c == sys.executable else c for c in part.command)}`"
                      f" (limit {part.limit_s} s)", "", "```", *tail, "```", ""]
            report.write_text("\n".join(lines))  # a part that hangs the machine still leaves the others
    print(f"{'all parts passed' if not failed else f'{failed} part(s) failed'}; report: {report}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
