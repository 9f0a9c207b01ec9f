"""Attention for packed rows without a (B, 1, T, T) mask: each document attends causally to itself only.

With restarting position ids and `attn_implementation="sdpa"`, transformers builds a block-diagonal 4D mask for
every forward and hands it to SDPA, which then computes every (query, key) pair of the row and masks most of
them away, and autograd keeps a bf16 copy of the mask per layer. Here the row is cut at the document boundaries
(where position ids stop counting up) and SDPA runs once per document with `is_causal=True`: only the pairs that
count are computed, with the kernels' causal fast path, and no mask exists. Measured on SmolLM2-135M, batch 4 x 512
packed rows: see bench/RESULTS.md. On CUDA, `flash_attention_2` does the same in one varlen kernel when installed.

Anything else (a padding mask, a KV cache during generation, no position ids) goes to transformers' own SDPA path,
so the same model object also generates and evaluates correctly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "medtune_packed"


def document_bounds(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """position_ids (B, T) → per row, the [start, end) spans where positions count up by one."""
    pos = position_ids  # (B, T)
    starts = torch.ones_like(pos, dtype=torch.bool)  # (B, T): True where a document begins
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    bounds = []
    for row in starts.tolist():
        cut = [t for t, s in enumerate(row) if s] + [len(row)]
        bounds.append(list(zip(cut[:-1], cut[1:], strict=True)))
    return bounds


def packed_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    # query (B, Hq, T, D), key/value (B, Hkv, S, D) → (B, T, Hq, D), as transformers' attention functions return
    position_ids = kwargs.get("position_ids")
    if attention_mask is not None or position_ids is None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    position_ids = position_ids.expand(query.shape[0], -1)  # (B, T); a (1, T) row is shared by the batch
    rows = []
    for b, spans in enumerate(document_bounds(position_ids)):
        docs = [F.scaled_dot_product_attention(query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                                               dropout_p=dropout if module.training else 0.0, is_causal=True,
                                               scale=scaling, enable_gqa=True)  # (1, Hq, e - s, D)
                for s, e in spans]
        rows.append(docs[0] if len(docs) == 1 else torch.cat(docs, dim=2))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)  # (B, Hq, T, D)
    return out.transpose(1, 2).contiguous(), None


def packed_mask(**kwargs) -> torch.Tensor | None:
    """No 4D mask when nothing is padded (documents are cut apart in `packed_attention`); a padding mask
    otherwise, exactly as the sdpa implementation builds it."""
    attention_mask = kwargs.get("attention_mask")
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return sdpa_mask(**kwargs)


AttentionInterface.register(NAME, packed_attention)
AttentionMaskInterface.register(NAME, packed_mask)
