"""Throughput of :func:`pcace.ace` against R's acepack on PCACE-shaped problems.

The PCACE shape: many problems (one per channel), n images, k principal components as
predictors (x ~ N(0, 1)), one response shared by all problems; a quarter of the
problems carry signal. Timed:

* NumPy input (numba backend), after a warm-up call; the first call (JIT compile, or
  loading numba's on-disk cache with ``--warm-cache``) is reported on its own;
* torch CPU tensors (torch backend);
* torch CUDA tensors, float64 and float32, when a GPU is present;
* R acepack, ``ace(x, y)`` once per problem, timed inside R around the loop only.

Usage::

    .venv/bin/python benchmarks/bench_ace.py                 # 2,000 problems, n=300, k=3
    .venv/bin/python benchmarks/bench_ace.py --problems 200 --skip-r
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--problems", type=int, default=2000, help="problems per call (2000)")
    p.add_argument("--n", type=int, default=300, help="observations per problem (300)")
    p.add_argument("--k", type=int, default=3, help="predictors per problem (3)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per backend; best kept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-r", action="store_true", help="do not time R acepack")
    p.add_argument("--warm-cache", action="store_true",
                   help="use numba's on-disk cache (default: compile from scratch, to time it)")
    return p.parse_args()


ARGS = parse_args()
if not ARGS.warm_cache:  # must precede the first import of numba
    _JIT_DIR = tempfile.mkdtemp(prefix="pcace-bench-numba-")
    os.environ["NUMBA_CACHE_DIR"] = _JIT_DIR

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pcace import ace  # noqa: E402

R_LOOP = r"""
suppressMessages(library(acepack))
args <- commandArgs(trailingOnly = TRUE)
b <- as.integer(args[2]); n <- as.integer(args[3]); k <- as.integer(args[4])
con <- file(args[1], "rb")
x <- readBin(con, "double", b * n * k)   # C order (b, n, k)
y <- readBin(con, "double", n)
close(con)
x <- aperm(array(x, c(k, n, b)), c(2, 1, 3))   # x[, , i] is problem i, n x k
fits <- vector("list", b)
elapsed <- system.time(for (i in seq_len(b)) fits[[i]] <- ace(x[, , i], y))[["elapsed"]]
rho <- vapply(fits, function(a) cor(rowSums(a$tx), a$ty), 0)
cat("ELAPSED", elapsed, "\n")
cat("VERSION", R.version$major, R.version$minor, as.character(packageVersion("acepack")), "\n")
cat("RHO", format(rho, digits = 15), "\n")
"""


def make_problems(b: int, n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.normal(size=n)
    x = rng.normal(size=(b, n, k))
    signal = np.arange(b) % 4 == 0  # a quarter of the problems depend on y
    strength = rng.uniform(0.2, 1.0, size=(int(signal.sum()), 1))
    x[signal, :, 0] = strength * np.sin(2 * y) + (1 - strength) * x[signal, :, 0]
    return x, y


def best_of(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def time_acepack(x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray, str] | None:
    if shutil.which("Rscript") is None:
        print("Rscript not found: skipping acepack")
        return None
    b, n, k = x.shape
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "problems.bin"
        with data.open("wb") as f:
            np.ascontiguousarray(x, dtype="<f8").tofile(f)
            np.ascontiguousarray(y, dtype="<f8").tofile(f)
        script = Path(tmp) / "loop.R"
        script.write_text(R_LOOP)
        done = subprocess.run(["Rscript", str(script), str(data), str(b), str(n), str(k)],
                              capture_output=True, text=True)
    if done.returncode != 0:
        print("acepack failed:", done.stderr.strip())
        return None
    fields = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines() if line}
    elapsed = float(fields["ELAPSED"][0])
    major, minor, acepack_version = fields["VERSION"]
    rho = np.array([float(v) for v in fields["RHO"]])
    return elapsed, rho, f"R {major}.{minor}, acepack {acepack_version}"


def main() -> None:
    b, n, k = ARGS.problems, ARGS.n, ARGS.k
    x, y = make_problems(b, n, k, ARGS.seed)
    print(f"problems={b} n={n} k={k} (x ~ N(0,1), y shared, signal in a quarter)")
    print(f"machine: {cpu_model()}; {os.cpu_count()} logical CPUs; Python "
          f"{platform.python_version()}; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); numba {numba.__version__} "
          f"({numba.get_num_threads()} threads); numpy {np.__version__}")
    print(f"load average before: {load_average()}")
    rows: list[tuple[str, float]] = []
    rhos: dict[str, np.ndarray] = {}

    # numba backend: the first call compiles (or loads the cache), then timed calls
    t0 = time.perf_counter()
    ace(x[:4], y)
    first = time.perf_counter() - t0
    kind = "loading numba's on-disk cache" if ARGS.warm_cache else "JIT compile from scratch"
    print(f"numba first call ({kind}): {first:.1f} s (excluded below)")
    seconds, res = best_of(lambda: ace(x, y), ARGS.repeats)
    rows.append(("pcace numba (NumPy in)", seconds))
    rhos["numba"] = res.rho

    # torch backend on CPU tensors
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    ace(xt[:4], yt)
    seconds, res = best_of(lambda: ace(xt, yt), ARGS.repeats)
    rows.append(("pcace torch CPU float64", seconds))
    rhos["torch CPU"] = res.rho.numpy()

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for dtype in (torch.float64, torch.float32):
            xd, yd = xt.cuda(), yt.cuda()

            def call(xd=xd, yd=yd, dtype=dtype):
                out = ace(xd, yd, dtype=dtype)
                torch.cuda.synchronize()
                return out

            call()  # warm-up: CUDA context, kernels
            seconds, res = best_of(call, ARGS.repeats)
            label = f"pcace torch CUDA {str(dtype).split('.')[-1]} ({name})"
            rows.append((label, seconds))
            rhos[label] = res.rho.double().cpu().numpy()
    else:
        print("no CUDA device: GPU rows skipped")

    acepack = None if ARGS.skip_r else time_acepack(x, y)
    if acepack is not None:
        seconds, rho_r, version = acepack
        print(f"acepack: {version}, single-threaded, timed inside R around the ace() loop")
        rows.append(("R acepack, ace() per problem", seconds))

    print(f"load average after: {load_average()}")
    print()
    print(f"| {'method':<44} | {'total s':>8} | {'problems/s':>10} | {'ms/problem':>10} |"
          f" {'vs acepack':>10} |")
    print(f"|{'-' * 46}|{'-' * 9}:|{'-' * 11}:|{'-' * 11}:|{'-' * 11}:|")
    ref = acepack[0] if acepack is not None else None
    for label, seconds in rows:
        ratio = f"{ref / seconds:.1f}x" if ref else "n/a"
        print(f"| {label:<44} | {seconds:8.3f} | {b / seconds:10.0f} | "
              f"{1000 * seconds / b:10.3f} | {ratio:>10} |")

    if acepack is not None:
        print()
        for label, rho in rhos.items():
            diff = np.abs(rho - acepack[1])
            print(f"agreement with acepack, {label}: |rho diff| median {np.median(diff):.1e}, "
                  f"99th percentile {np.quantile(diff, 0.99):.1e}, max {diff.max():.1e}; "
                  f"{int(np.sum(diff > 1e-3))} of {b} problems beyond 1e-3")
    if not ARGS.warm_cache:
        shutil.rmtree(_JIT_DIR, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
