"""SDPA attention for training without two per-layer copies that transformers' `sdpa` path makes on CPU.

With packed rows (a 4-D block-diagonal mask) transformers' `sdpa` attention:
- expands k and v from the key/value heads to all query heads (`repeat_kv`, a copy) before calling SDPA, because
  it only asks SDPA for grouped-query attention when there is no mask; SDPA then saves the expanded k and v for
  backward. PyTorch's CPU flash kernel takes grouped k/v with a mask (`enable_gqa`): SmolLM2 (9 query heads, 3
  key/value heads) saves k and v at a third of the size;
- passes the boolean mask, which SDPA converts to an additive float mask on every call and saves per layer:
  30 copies of (B, 1, T, T). Converted once per forward here, every layer saves the same tensor.
At batch 4 x 512 in fp32 that is ~190 MB + ~115 MB less saved for backward. The conversion is the one SDPA does
itself (0 where attended, -inf elsewhere), so outputs are the same; gradients equal to rounding (k/v gradients are
summed over their query-head group inside the kernel instead of by the expand's backward).

Only CPU, multi-token, no-cache calls take this path; anything else (CUDA, decoding, paged caches, position
bias, softcap) is handed to transformers' own `sdpa_attention_forward`.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

NAME = "medtune_sdpa"


class _MaskCache:
    """The float version of the last boolean mask seen (the same object reaches every layer of one forward)."""

    def __init__(self) -> None:
        self._ref: weakref.ref | None = None
        self._dtype: torch.dtype | None = None
        self.mask: torch.Tensor | None = None

    def get(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self._ref is None or self._ref() is not mask or self._dtype != dtype:
            self.mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
            self._ref, self._dtype = weakref.ref(mask), dtype
        return self.mask


_MASKS = _MaskCache()


def sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                 is_causal: bool | None = None, **kwargs):
    """transformers' attention-function signature; query (B, H, T, D), key/value (B, H_kv, S, D)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    delegate = (query.device.type != "cpu" or query.shape[2] == 1 or key.shape[2] != query.shape[2]
                or any(kwargs.get(k) is not None for k in ("position_bias", "cache", "softcap"))
                or kwargs.get("output_attentions"))
    if delegate:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    causal = attention_mask is None and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attention_mask = _MASKS.get(attention_mask, query.dtype)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
                                         is_causal=causal, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(NAME, sdpa_forward)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])  # masks built exactly as for sdpa


def install(model) -> bool:
    """Switch a model that uses transformers' `sdpa` to this attention; True when switched."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    _register()
    config._attn_implementation = NAME
    return True


def uninstall(model) -> bool:
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != NAME:
        return False
    config._attn_implementation = "sdpa"
    return True
