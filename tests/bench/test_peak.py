"""The matmul peak (the MFU denominator) fits its time budget on any CPU, also where bf16 has no fast kernel."""

from __future__ import annotations

import torch

from medtune.bench.peak import fitting_size, matmul_tflops


def test_size_fits_the_budget():
    assert fitting_size(torch.float32, 2048, budget=1e-9) == 256  # never below the smallest size
    assert fitting_size(torch.float32, 2048, budget=1e9) == 2048  # never above the asked size


def test_a_tiny_budget_measures_small_matrices_quickly():
    tflops, n = matmul_tflops(torch.bfloat16, n=2048, seconds=1e-6, repeats=1)
    assert n == 256 and tflops > 0  # one 256x256 product per loop, not a 13 s product of 2048x2048 (AVX2-only CPU)
