"""Summed answer-token log-probabilities: what every preference objective compares."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medtune.data.batching import Batch
from medtune.data.render import IGNORE


def token_logps(model, batch: Batch, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of answer-token log-probs per row (2N,), answer tokens per row (2N,)), in fp32.

    Only positions with a target reach the output layer (`logits_to_keep`); a position's target is the next token,
    IGNORE on the prompt, the padding and the last token, so nothing but the answer is counted."""
    keep = (batch.targets != IGNORE).any(0).nonzero().squeeze(-1)  # (K,)
    targets = batch.targets[:, keep]  # (2N, K)
    with autocast:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                       logits_to_keep=keep, use_cache=False).logits  # (2N, K, V)
    per_token = -F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")  # (2N, K)
    return per_token.sum(-1), (targets != IGNORE).sum(-1)
