"""This machine's dense matmul peak, measured on the spot: the denominator of MFU.

`python -m medtune.bench.peak` times `torch.mm` of two n×n matrices (default 2048, smaller where one product
would not fit the time budget: see `fitting_size`) in bf16 and fp32 with torch's
default thread count, after a warm-up, in a few short timed loops, and prints ONE JSON line with the best rate of
each in TFLOP/s (one n×n×n product = 2·n³ FLOPs); where CUDA is visible, also the GPU's (8192³, CUDA events). `medtune bench train` runs it in its own process, before the
training workers, so it shares no allocator or thread-pool state with them.

The "peak" is what PyTorch's own GEMM (oneDNN/MKL) reaches on this box, not the vendor's data-sheet figure; it is
the fair ceiling for a PyTorch training step, and it moves with whatever else the machine is running.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def fitting_size(dtype: torch.dtype, n: int, budget: float, smallest: int = 256) -> int:
    """The matrix size, at most n (`smallest` times a power of two), whose one product takes about `budget` seconds
    or less. On a CPU without fast bf16 (AVX2 only: oneDNN falls back to a reference kernel at ~1 GFLOP/s) one bf16
    product of 2048x2048 takes ~13 s, so the fixed-size loop below would run for minutes; there the peak is
    measured on smaller matrices (it is slow either way, and the figure says so). The size doubles while one
    product of the next size, predicted at the rate just measured (8x the time), fits: small products run well
    below the GEMM's peak rate (AVX2 EPYC, fp32: 6 GFLOP/s at 256, 65 at 2048), so a prediction from the
    smallest size alone would settle on matrices too small to show the peak."""
    size = smallest
    a = torch.ones(size, size, dtype=dtype)
    torch.mm(a, a)  # kernel selection
    while size * 2 <= n:
        start = time.perf_counter()
        torch.mm(a, a)
        if 8 * (time.perf_counter() - start) > budget:
            break
        size *= 2
        a = torch.ones(size, size, dtype=dtype)
        torch.mm(a, a)
    return size


def matmul_tflops(dtype: torch.dtype, n: int = 2048, seconds: float = 1.0, repeats: int = 5) -> tuple[float, int]:
    """(TFLOP/s, size): the best of `repeats` timed loops (each about `seconds / repeats` long, at least one
    product) of n×n @ n×n, n cut down by `fitting_size` where one product would not fit half of `seconds`."""
    n = fitting_size(dtype, n, seconds / 2)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    for _ in range(2):  # warm-up: thread pool start, oneDNN kernel selection, page faults on `out`
        torch.mm(a, b, out=out)
    budget = seconds / max(repeats, 1)
    best = 0.0
    for _ in range(max(repeats, 1)):
        iters, start = 0, time.perf_counter()
        while True:
            torch.mm(a, b, out=out)
            iters += 1
            elapsed = time.perf_counter() - start
            if elapsed >= budget:
                break
        best = max(best, 2.0 * n**3 * iters / elapsed / 1e12)
    return best, n


def cuda_matmul_tflops(dtype: torch.dtype, n: int = 8192, repeats: int = 20) -> float:
    """n x n x n products on the current GPU, timed with CUDA events after a warm-up (fp32 as torch runs it by
    default: TF32 off)."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        torch.mm(a, b)
    end.record()
    torch.cuda.synchronize()
    return 2.0 * n**3 * repeats / (start.elapsed_time(end) / 1000) / 1e12


def measure(n: int = 2048, seconds: float = 1.0) -> dict:
    """The CPU's peaks (bf16_tflops, fp32_tflops) and, where CUDA is visible, the GPU's (cuda_bf16_tflops,
    cuda_fp32_tflops): medtune trains on the GPU there, and its MFU is against the GPU's peak."""
    result: dict = {"n": n, "threads": torch.get_num_threads()}
    for name, dtype in DTYPES.items():
        result[f"{name}_tflops"], result[f"{name}_n"] = matmul_tflops(dtype, n=n, seconds=seconds)
    if torch.cuda.is_available():
        result["cuda_device"] = torch.cuda.get_device_name()
        for name, dtype in DTYPES.items():
            result[f"cuda_{name}_tflops"] = cuda_matmul_tflops(dtype)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m medtune.bench.peak", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2048, help="matrix size")
    p.add_argument("--seconds", type=float, default=1.0, help="timed budget per dtype (split into 5 loops)")
    args = p.parse_args(argv)
    print(json.dumps(measure(args.n, args.seconds)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
