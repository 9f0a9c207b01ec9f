"""Compact autograd for the two elementwise blocks of a LLaMA layer: RMSNorm and the MLP's SiLU-mul.

transformers runs both as chains of small autograd ops, each of which saves what its own backward needs:

- RMSNorm (`weight * (x32 * rsqrt(mean(x32²) + eps)).to(dtype)`): with a bf16 input the fp32 copy x32 is saved
  (twice the input's bytes, plus the chain's passes over memory). `RMSNormFunction` saves the input in its own
  dtype and the fp32 rstd (one number per row), and recomputes the normalised row in backward. The forward is
  the same arithmetic in the same order as transformers' (fp32 outputs are identical); backward is the
  closed form `rstd * (g - x̂ * mean(g * x̂))` with g = dL/dx̂ in fp32. Its output also carries where it came
  from (`norm_source`), so the fused LoRA projections that read it recompute it in backward instead of keeping
  it (one (N, hidden) tensor per norm less).
- SiLU-mul (`silu(gate) * up`): autograd keeps gate, silu(gate) and up (three (N, intermediate) tensors, the
  largest activations of a small model). `SiluMulFunction` saves gate and up and recomputes silu in backward:
  one third less MLP memory, same values.

`install(model)` replaces the forward of every LLaMA-style RMSNorm and SiLU MLP module (the classes listed
below, whose forward is exactly the formula above); `uninstall` restores them. Other models are left alone.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

# Classes whose forward is `weight * normalised.to(input_dtype)` with `variance_epsilon` / `down(act(gate) * up)`.
RMSNORM_CLASSES = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
MLP_CLASSES = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})
SILU = frozenset({"silu", "swish"})
_PATCHED = "_medtune_fast_norm"
_SOURCE = "_medtune_norm_source"  # on each RMSNorm output: (its version, input, weight, rstd)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        x32 = x.to(torch.float32)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.mark_non_differentiable(rstd)
        return renormalize(x, weight, rstd, x32), rstd

    @staticmethod
    def backward(ctx, grad_y, _grad_rstd):
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(torch.float32) * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_y * normed.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        g = (grad_y * weight).to(torch.float32)
        grad_x = None
        if ctx.needs_input_grad[0]:
            dot = (g * normed).mean(-1, keepdim=True)
            grad_x = g.sub_(normed.mul_(dot)).mul_(rstd).to(x.dtype)
        return grad_x, grad_weight, None


def renormalize(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, x32: torch.Tensor | None = None):
    """RMSNorm's output from its input and rstd: the forward's own arithmetic, so a recomputation is bit-exact."""
    return weight * ((x.to(torch.float32) if x32 is None else x32) * rstd).to(x.dtype)


def norm_source(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(input, weight, rstd) when `y` is an unmodified output of the compact RMSNorm: a consumer that must keep y
    for backward (the fused LoRA keeps its input) can keep these instead, which the norm keeps anyway, and
    recompute y with `renormalize`: selective recomputation of the cheapest activation there is."""
    source = getattr(y, _SOURCE, None)
    if source is None or y.is_inference() or source[0] != y._version:
        return None
    return source[1:]


class SiluMulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_y):
        gate, up = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        grad_up = grad_gate = None
        if ctx.needs_input_grad[1]:
            grad_up = grad_y * gate * sig  # silu(gate) = gate * sigmoid(gate)
        if ctx.needs_input_grad[0]:
            # d silu / d gate = sig * (1 + gate * (1 - sig))
            grad_gate = grad_y * up * sig * (1 + gate * (1 - sig))
        return grad_gate, grad_up


def rmsnorm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    y, rstd = RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)
    if torch.is_grad_enabled() and not y.is_inference():  # only a graph for backward has use for it
        setattr(y, _SOURCE, (y._version, hidden_states, self.weight, rstd))  # dies with y; see norm_source
    return y


def mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(SiluMulFunction.apply(self.gate_proj(x), self.up_proj(x)))


def _targets(model):
    for m in model.modules():
        name = type(m).__name__
        if name in RMSNORM_CLASSES and hasattr(m, "variance_epsilon"):
            yield m, rmsnorm_forward
        elif name in MLP_CLASSES and getattr(getattr(m, "config", None), "hidden_act", None) in SILU:
            yield m, mlp_forward


def install(model) -> int:
    """Route RMSNorm and SiLU-MLP modules through the compact functions; returns how many were switched."""
    n = 0
    for m, forward in _targets(model):
        m.forward = types.MethodType(forward, m)
        setattr(m, _PATCHED, True)
        n += 1
    return n


def uninstall(model) -> int:
    n = 0
    for m, _ in _targets(model):
        if m.__dict__.pop(_PATCHED, False):
            del m.forward
            n += 1
    return n
