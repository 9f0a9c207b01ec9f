"""bf16 copies of the weights for one-token decoding steps on CPUs without fast bf16 matmuls.

Generating one token multiplies every weight matrix by a single row, so a decoding step streams the whole model
from memory. On an AVX2-only CPU torch's fp32 path (MKL sgemm with one row) reads ~8-10 GB/s of the ~22 GB/s the
two cores can read (measured for SmolLM2-135M: 56 ms of matrix products per token); a bf16 copy of each matrix
halves the bytes, and torch's bf16 matrix-vector kernel (fp32 accumulation) takes 30 ms for the same products.
Products of more rows (the prompt, eval batches, a batch of served requests) keep the fp32 weights: there torch's
bf16 matmul is oneDNN's reference kernel, ~6x slower than fp32 at 40 rows. Where bf16 matmuls are fast
(AVX512-BF16, AMX, GPUs) medtune already infers in bf16 and this is not used.

Written here rather than taken from a library: transformers/torchao quantise weights for every product (the prompt
too), and the bf16 GEMM they would then run is the slow kernel above. Costs: the copies take half the fp32 weights'
memory again; a one-row product rounds its input and the weights to bf16 (accumulating in fp32), as bf16 inference
does. The copies are buffers outside the state dict: saving, merging and exporting never see them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ROWS = 2  # products of at most this many rows use the bf16 copy (measured: bf16 still ahead of fp32 at 2 rows)


class DecodeLinear(torch.nn.Linear):
    """nn.Linear that multiplies a row or two by its bf16 copy when no gradient is wanted."""

    weight_bf16: torch.Tensor
    bias_bf16: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= ROWS * self.in_features and x.dtype == torch.float32 and not torch.is_grad_enabled():
            return F.linear(x.to(torch.bfloat16), self.weight_bf16, self.bias_bf16).to(x.dtype)
        return F.linear(x, self.weight, self.bias)


def add_decode_copies(model: torch.nn.Module) -> int:
    """Give every fp32 nn.Linear of `model` on the CPU (base projections, LM head, LoRA factors) a bf16 copy for
    one-token steps; returns how many. The model must not be trained afterwards (the copies would go stale)."""
    count = 0
    for module in model.modules():
        if type(module) is not torch.nn.Linear:
            continue
        if module.weight.dtype != torch.float32 or module.weight.device.type != "cpu":
            continue
        module.register_buffer("weight_bf16", module.weight.detach().to(torch.bfloat16), persistent=False)
        bias = None if module.bias is None else module.bias.detach().to(torch.bfloat16)
        module.register_buffer("bias_bf16", bias, persistent=False)
        module.__class__ = DecodeLinear
        count += 1
    return count


def decode_copies_pay_off(device: torch.device, fast_bf16: bool) -> bool:
    """Where the copies speed decoding up: fp32 inference on a CPU (no fast bf16 matmuls)."""
    return device.type == "cpu" and not fast_bf16
