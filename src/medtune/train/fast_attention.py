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

When the mask is exactly block-diagonal causal (packed rows: each text attends to itself only), the masked T x T
call is replaced by one causal flash-kernel call per text (`_PerDocumentAttention`): the kernel then skips the
upper triangle and every other text's blocks, so attention work drops from T² to the sum of the texts' squared
lengths over 2 (measured on rows of ~2 texts: attention 2.9 → 1.8 s per step, the step 7-8 % faster, bench/
RESULTS.md). Outputs go straight into the (B, T, H, D) buffer o_proj reads, so nothing extra is kept.

Only CPU, multi-token, no-cache calls take this path; anything else (CUDA, decoding, paged caches, position
bias, softcap) is handed to transformers' own `sdpa_attention_forward`.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

NAME = "medtune_sdpa"
PER_DOCUMENT = True  # packed rows: causal attention per document instead of one masked T x T call


def document_spans(mask: torch.Tensor) -> list[list[tuple[int, int]]] | None:
    """Per row, the [start, end) spans of the documents of a block-diagonal causal mask (B, 1, T, T) (packed rows:
    each document attends causally to itself only); None for any other mask (padding, sliding windows, ...)."""
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != mask.shape[3]:
        return None
    m = mask[:, 0]
    t = m.shape[-1]
    starts = torch.ones(m.shape[:2], dtype=torch.bool, device=m.device)
    starts[:, 1:] = ~torch.diagonal(m, offset=-1, dim1=1, dim2=2)  # t starts a document when it cannot see t-1
    doc = starts.cumsum(-1)
    causal = torch.ones(t, t, dtype=torch.bool, device=m.device).tril_()
    if not torch.equal((doc[:, :, None] == doc[:, None, :]) & causal, m):
        return None
    spans = []
    for row in starts.cpu():
        edges = row.nonzero().squeeze(-1).tolist() + [t]
        spans.append(list(zip(edges[:-1], edges[1:], strict=True)))
    return spans


class _MaskCache:
    """The float version and the document spans of the last boolean mask seen (the same object reaches every layer
    of one forward)."""

    def __init__(self) -> None:
        self._ref: weakref.ref | None = None
        self._dtype: torch.dtype | None = None
        self.mask: torch.Tensor | None = None
        self.spans: list[list[tuple[int, int]]] | None = None

    def get(self, mask: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, list | None]:
        if self._ref is None or self._ref() is not mask or self._dtype != dtype:
            self.mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
            self.spans = document_spans(mask)
            self._ref, self._dtype = weakref.ref(mask), dtype
        return self.mask, self.spans


_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class _PerDocumentAttention(torch.autograd.Function):
    """Causal flash attention run per document of packed rows: no mask, and only each document's own triangle is
    computed (a T x T mask makes the kernel do all of T x T). The outputs are written into one (B, T, H, D) buffer
    that is also what o_proj reads (transformers' transpose + contiguous of it is free), and backward calls the
    kernel's backward per document on views of the saved tensors."""

    @staticmethod
    def forward(ctx, query, key, value, spans, scale):
        b, h, t, d = query.shape
        out = query.new_empty(b, t, h, d).transpose(1, 2)  # (B, H, T, D) view of a (B, T, H, D) buffer
        lse = query.new_empty(b, h, t, dtype=torch.float32)
        for row, row_spans in enumerate(spans):
            for s, e in row_spans:
                o, l_ = _FLASH(query[row:row + 1, :, s:e], key[row:row + 1, :, s:e], value[row:row + 1, :, s:e],
                               0.0, True, scale=scale)
                out[row:row + 1, :, s:e].copy_(o)
                lse[row:row + 1, :, s:e].copy_(l_)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.spans, ctx.scale = spans, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse = ctx.saved_tensors
        grads = [torch.empty_like(x) for x in (query, key, value)]
        for row, row_spans in enumerate(ctx.spans):
            for s, e in row_spans:
                parts = _FLASH_BACKWARD(*(x[row:row + 1, :, s:e] for x in (grad_out, query, key, value, out)),
                                        lse[row:row + 1, :, s:e], 0.0, True, scale=ctx.scale)
                for g, p in zip(grads, parts, strict=True):
                    g[row:row + 1, :, s:e].copy_(p)
        return *grads, None, None


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
        attention_mask, spans = _MASKS.get(attention_mask, query.dtype)
        if spans is not None and dropout == 0.0 and PER_DOCUMENT:
            return _PerDocumentAttention.apply(query, key, value, spans, scaling).transpose(1, 2), None
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
