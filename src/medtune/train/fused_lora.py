"""A fused LoRA linear: base GEMM and low-rank path in one autograd Function, one dropout mask per input.

peft's LoRA `Linear.forward` runs `base(x) + lora_B(lora_A(dropout(x))) * scaling` as separate autograd ops, so
each adapted projection stores its own dropped copy of the input (plus its own mask) for backward. q, k and v
read the same input, so a layer keeps three dropped copies of one tensor. Here each adapted `nn.Linear`:

- computes `y = x W^T + b`, then adds `scaling * (drop(x) A^T) B^T` into y in place (no extra (N, out) tensor);
- draws its dropout mask ONCE per distinct input tensor: projections called on the same tensor (q/k/v on the
  normed hidden state; gate/up with all-linear) reuse the same mask and the same dropped input. Each adapter
  still sees dropout with probability p on every element, but the masks of projections that share an input are
  the same mask instead of independent ones (peft draws one per projection);
- saves for backward only x (shared by q/k/v: stored once), the boolean mask and the (N, r) low-rank
  activation `drop(x) A^T`; the dropped input is recomputed in backward (one elementwise multiply). When x is
  the output of `fast_norm`'s RMSNorm (q/k/v read the input norm's output), not even x: the norm's own input and
  rstd, which the norm keeps anyway, and x is recomputed from them in backward (bit-exact).

Gradients equal peft's (the same FLOPs in a different order: fp32 results agree to rounding). Under autocast
everything is computed in the autocast dtype, as peft does with its input cast turned off; the adapters'
gradients come back in their own dtype (fp32). Anything the fused path does not cover (merged or disabled
adapters, several active adapters, DoRA and other variants, `adapter_names` mixed batches, a non-`nn.Linear`
base such as bitsandbytes' 4-bit layers, trainable base weights) runs peft's own forward.
"""

from __future__ import annotations

import types
import weakref

import torch
import torch.nn.functional as F

from medtune.train import fast_norm

_ATTR = "_medtune_fused_lora"  # the shared mask cache, on each fused module


class SharedDropout:
    """The inverted-dropout mask and dropped input of the last input tensor seen, reused while the same tensor (same
    object, unchanged in place) comes back. Mask: one 64-bit random draw per four elements (as medtune's
    `FastDropout`), kept where a uniform int16 >= the threshold."""

    def __init__(self) -> None:
        self._ref: weakref.ref | None = None
        self._key: tuple = ()
        self.mask: torch.Tensor | None = None
        self.dropped: torch.Tensor | None = None

    def get(self, x: torch.Tensor, p: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(keep mask, x * mask / (1 - p) in `dtype`) for x, drawn on the first call for this tensor."""
        key = (x._version, p, dtype)
        if self._ref is None or self._ref() is not x or self._key != key:
            n = x.numel()
            with torch.no_grad():
                bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2**63, 2**63 - 1)
                self.mask = bits.view(torch.int16)[:n].view(x.shape) >= (-32768 + round(p * 65536))
                self.dropped = x.to(dtype) * self.mask * (1.0 / (1.0 - p))
            self._ref, self._key = weakref.ref(x), key
        return self.mask, self.dropped

    def clear(self) -> None:
        self._ref, self.mask, self.dropped = None, None, None


class _FusedLoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, keep, dropped, keep_scale: float, source):
        # x (..., in) and weight (out, in), bias (out,) in the compute dtype, frozen; lora_a (r, in), lora_b (out, r)
        # trainable, already in the compute dtype; keep: bool mask like x, or None (no dropout); dropped: x * keep *
        # keep_scale (or x); source: fast_norm.norm_source(x) (x recomputed in backward from what the norm keeps)
        x2 = x.reshape(-1, x.shape[-1])
        low = dropped.reshape(-1, x.shape[-1]) @ lora_a.t()  # (N, r)
        y = F.linear(x2, weight, bias)
        y.addmm_(low, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(*(source if source is not None else (x,)), keep, low, weight, lora_a, lora_b)
        ctx.scaling, ctx.keep_scale, ctx.recompute = scaling, keep_scale, source is not None
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        *inputs, keep, low, weight, lora_a, lora_b = ctx.saved_tensors
        x = fast_norm.renormalize(*inputs).to(low.dtype) if ctx.recompute else inputs[0]
        s = ctx.scaling
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(low.dtype)  # (N, out)
        x2 = x.reshape(-1, x.shape[-1])
        dropped = x2 if keep is None else x2 * keep.reshape(x2.shape) * ctx.keep_scale
        grad_low = (g @ lora_b).mul_(s)  # (N, r)
        grad_b = (g.t() @ low).mul_(s)  # (out, r)
        grad_a = grad_low.t() @ dropped  # (r, in)
        grad_x = None
        if ctx.needs_input_grad[0]:
            through_lora = grad_low @ lora_a  # (N, in)
            if keep is not None:
                through_lora.mul_(keep.reshape(x2.shape)).mul_(ctx.keep_scale)
            grad_x = through_lora.addmm_(g, weight).view(x.shape).to(x.dtype)
        return grad_x, None, None, grad_a, grad_b, None, None, None, None, None


def _dropout_p(module, adapter: str) -> float | None:
    """The adapter's dropout probability now (0 in eval mode), or None for a dropout module we do not know."""
    drop = module.lora_dropout[adapter]
    if isinstance(drop, torch.nn.Identity):
        return 0.0
    p = getattr(drop, "p", None)
    if not isinstance(p, float | int) or type(drop).__name__ not in ("Dropout", "FastDropout"):
        return None
    return float(p) if drop.training else 0.0


def _fusable_adapter(module, args, kwargs) -> str | None:
    """The one active vanilla adapter the fused path can run, or None (then peft's forward runs)."""
    if args or kwargs or module.disable_adapters or module.merged:
        return None
    active = [a for a in module.active_adapters if a in module.lora_A]
    if len(active) != 1 or active[0] in getattr(module, "lora_variant", {}):
        return None
    base = module.base_layer
    if type(base) is not torch.nn.Linear or base.weight.requires_grad or \
            (base.bias is not None and base.bias.requires_grad):
        return None
    return active[0]


def fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Replaces `forward` of a peft LoRA Linear (bound per module by `install`)."""
    # without autograd (eval, generate, reference log-probs) there is nothing to save: peft's own forward runs,
    # also on inference tensors (torch.inference_mode), which have no version counter for the mask cache
    adapter = _fusable_adapter(self, args, kwargs) if torch.is_grad_enabled() else None
    p = _dropout_p(self, adapter) if adapter is not None else None
    if p is None:
        return type(self).forward(self, x, *args, **kwargs)
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    base, lora_a, lora_b = self.base_layer, self.lora_A[adapter].weight, self.lora_B[adapter].weight
    if base.weight.dtype != dtype and not torch.is_autocast_enabled(device):
        return type(self).forward(self, x, *args, **kwargs)
    keep, dropped = (None, x.to(dtype)) if p == 0 else getattr(self, _ATTR).get(x, p, dtype)
    bias = None if base.bias is None else base.bias.to(dtype)
    source = fast_norm.norm_source(x) if x.dtype == dtype else None
    with torch.autocast(device, enabled=False):
        return _FusedLoraLinear.apply(x.to(dtype), base.weight.to(dtype), bias, lora_a.to(dtype), lora_b.to(dtype),
                                      float(self.scaling[adapter]), keep, dropped, 1.0 / (1.0 - p) if p else 1.0,
                                      source)


def shared_dropout(module) -> SharedDropout | None:
    """The mask cache a fused module draws from (shared by all modules of one `install`), or None."""
    return module.__dict__.get(_ATTR)


def _lora_linears(model):
    from peft.tuners.lora.layer import Linear

    return [m for m in model.modules() if isinstance(m, Linear)]


def install(model) -> int:
    """Route every peft LoRA Linear of `model` through the fused forward (one mask cache for the whole model);
    returns how many modules were switched. Idempotent."""
    shared = SharedDropout()
    modules = _lora_linears(model)
    for m in modules:
        setattr(m, _ATTR, shared)
        m.forward = types.MethodType(fused_forward, m)
    return len(modules)


def uninstall(model) -> int:
    """Back to peft's own forward; returns how many modules were switched back."""
    n = 0
    for m in _lora_linears(model):
        if _ATTR in m.__dict__:
            del m.forward
            delattr(m, _ATTR)
            n += 1
    return n
