"""Supervised fine-tuning: token cross-entropy over the answer tokens, summed over the batch in fp32.

A step divides the summed token loss of its whole accumulation window (all processes) once by its number of loss
tokens, so gradient accumulation gives the same update as one big batch, and packed rows train on the same
tokens as padded ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from medtune.data.batching import Batch, pad_collate
from medtune.data.render import IGNORE, Sample
from medtune.eval.perplexity import held_out
from medtune.recipe import TrainConfig
from medtune.train.loss import chunked_cross_entropy_sum


def loss_sum(model, batch: Batch, autocast, chunked: bool = True) -> torch.Tensor:
    """Sum of token cross-entropies over the batch's targets, in fp32.

    Only positions with a target reach the output layer. With a frozen output layer (always, with LoRA) the
    loss goes through `chunked_cross_entropy_sum`, which never holds more than one chunk of logits; otherwise
    through transformers' `logits_to_keep`, which computes logits only at those positions."""
    keep = (batch.targets != IGNORE).any(0).nonzero().squeeze(-1)  # (K,)
    targets = batch.targets[:, keep]  # (B, K)
    head = model.get_output_embeddings()
    if chunked and isinstance(head, torch.nn.Linear) and not head.weight.requires_grad and head.bias is None:
        with autocast:
            hidden = model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                         position_ids=batch.position_ids, use_cache=False).last_hidden_state  # (B, T, H)
            valid = targets != IGNORE  # (B, K)
            return chunked_cross_entropy_sum(hidden[:, keep][valid], head.weight, targets[valid])
    with autocast:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                       logits_to_keep=keep, use_cache=False).logits  # (B, K, V)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")


@dataclass(frozen=True)
class SFT:
    name: ClassVar[str] = "sft"
    packable: ClassVar[bool] = True
    uses_reference: ClassVar[bool] = False
    perplexity: ClassVar[bool] = True
    stat_names: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_config(cls, cfg: TrainConfig, max_length: int | None = None) -> SFT:
        return cls()

    def row_length(self, row: Sample) -> int:
        return len(row.input_ids)

    def collate(self, rows: list[Sample], pad_id: int, side: str = "right") -> Batch:
        return pad_collate(rows, pad_id, side)

    def loss_count(self, batch: Batch) -> int:
        return batch.num_loss_tokens

    def loss(self, model, batch: Batch, autocast) -> tuple[torch.Tensor, dict[str, float]]:
        return loss_sum(model, batch, autocast), {}

    def evaluate(self, model, rows: list[Sample], *, pad_id: int, batch_size: int, autocast,
                 device=None) -> dict[str, float]:
        """Held-out loss and perplexity, token-weighted over the tokens that carry loss (eval/perplexity.py's)."""
        return held_out(model, rows, pad_id=pad_id, batch_size=batch_size, autocast=autocast).eval_figures()
