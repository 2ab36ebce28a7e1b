"""Time the streaming reduce against the in-memory reduce_block, per ResNet-20 layer shape.

The three stages of the shared CIFAR ResNet-20 (16 channels of 32 x 32, 32 of 16 x 16,
64 of 8 x 8), N images of synthetic maps (low rank plus noise, float32, as the capture
hands them over), k = 3. Streaming: accumulate the moments batch by batch, solve the
basis, project a second pass and fix the signs. In memory: reduce_block on the whole
(C, N, P) float32 block (the pipeline's default). Each figure is one run after a warm-up
on a small block; the machine is shared, so treat them as +-20%.

    PYTHONPATH=src python benchmarks/bench_streaming.py            # N = 5000, batch 250
    PYTHONPATH=src python benchmarks/bench_streaming.py --subspace  # also the subspace route
"""

from __future__ import annotations

import argparse
import time

import torch

from pcace.reduce.moments import PixelMoments
from pcace.reduce.pca import reduce_block, reusing_buffers
from pcace.reduce.subspace import subspace_basis

SHAPES = [(16, 32), (32, 16), (64, 8)]  # (channels, side)


def synthetic(n: int, c: int, side: int, seed: int = 0) -> torch.Tensor:
    """Maps with a falling spectrum: a few smooth patterns plus noise, float32."""
    gen = torch.Generator().manual_seed(seed)
    p = side * side
    rank = 8
    base = torch.randn(n, c, rank, generator=gen) * torch.logspace(0, -2, rank)
    mix = torch.randn(c, rank, p, generator=gen)
    maps = torch.einsum("ncr,crp->ncp", base, mix) + 0.05 * torch.randn(n, c, p, generator=gen)
    return maps.relu_().reshape(n, c, side, side)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--subspace", action="store_true", help="also time the subspace route")
    args = parser.parse_args()
    n, bs = args.images, args.batch
    print(f"N = {n}, batch {bs}, k = 3, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    header = (f"{'layer':>12} | {'accumulate':>10} | {'basis':>6} | {'project':>7} | "
              f"{'stream':>7} | {'reduce_block':>12} | {'moments MiB':>11} | {'block MiB':>9}")
    print(header)
    print("-" * len(header))
    # warm-up (numba compile/cache load, BLAS start-up)
    reduce_block(torch.randn(2, 50, 64), 3)
    PixelMoments(2, 64).update(torch.randn(50, 2, 64)).basis(3)
    for c, side in SHAPES:
        maps = synthetic(n, c, side)
        p = side * side
        t0 = time.perf_counter()
        acc = PixelMoments(c, p)
        for batch in maps.split(bs):
            acc.update(batch)
        t1 = time.perf_counter()
        basis = acc.basis(3)
        t2 = time.perf_counter()
        red = basis.finish([basis.project(b) for b in maps.split(bs)])
        t3 = time.perf_counter()
        block = maps.flatten(2).permute(1, 0, 2).contiguous()  # the capture's layout
        t4 = time.perf_counter()
        with reusing_buffers():
            ref = reduce_block(block, 3)
        t5 = time.perf_counter()
        diff = (red.scores - ref.scores).abs().max() / ref.scores.abs().max()
        print(f"{c:>3}ch {side:>2}x{side:<2}  | {t1 - t0:>9.2f}s | {t2 - t1:>5.2f}s | "
              f"{t3 - t2:>6.2f}s | {t3 - t0:>6.2f}s | {t5 - t4:>11.2f}s | "
              f"{acc.nbytes / 2**20:>11.1f} | {block.numel() * 4 / 2**20:>9.1f}"
              f"   (max score diff vs float32 reduce_block {diff:.1e})")
        if args.subspace:
            t6 = time.perf_counter()
            sub = subspace_basis(lambda maps=maps: maps.split(bs), 3)
            t7 = time.perf_counter()
            print(f"{'':>12}   subspace basis {t7 - t6:.2f}s in {sub.passes} passes, "
                  f"largest angle estimate {float(sub.angle.max()):.1e}")
        del maps, block, acc


if __name__ == "__main__":
    main()
