"""Preference objectives: DPO and ORPO on batches of pairs (`pair_collate`: rows 0..N-1 chosen, N..2N-1 rejected).

DPO (Rafailov et al. 2023), TRL's `loss_type="sigmoid"`:
    loss = -log σ(β · [(log π(y_c|x) - log π_ref(y_c|x)) - (log π(y_r|x) - log π_ref(y_r|x))])
with log-probs summed over the answer tokens. The reference π_ref is the same model with the LoRA adapter
switched off (peft `disable_adapter`), under no_grad: no second copy of the model in memory.

ORPO (Hong et al. 2024), as TRL's ORPOTrainer:
    loss = NLL(y_c|x) - λ · log σ(log odds(y_c|x) - log odds(y_r|x)),   odds(y|x) = P / (1 - P)
with P the per-token mean probability (mean log-prob over the answer) and NLL the cross-entropy of the chosen
answer's tokens (TRL also puts the prompt's tokens in it; medtune learns answers only, as in SFT).

Reported as TRL names them: rewards/chosen, rewards/rejected (DPO: β · log-ratio to the reference; ORPO: λ · mean
log-prob), rewards/accuracies (share of pairs whose chosen reward is higher), rewards/margins (mean difference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medtune.data.batching import Batch
from medtune.data.render import IGNORE

STATS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


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


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean DPO loss over the N pairs; inputs are summed answer log-probs, each (N,)."""
    chosen_rewards = beta * (chosen - ref_chosen)  # (N,)
    rejected_rewards = beta * (rejected - ref_rejected)  # (N,)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, _stats(chosen_rewards.detach(), rejected_rewards.detach(), chosen, rejected)


def orpo_loss(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, nll: torch.Tensor,
              lam: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO loss of a batch: `nll` (scalar, mean over the chosen answers' tokens) + λ · odds-ratio term; the log-probs
    are per-token means over each answer, (N,)."""
    # log odds(y) = log P - log(1 - P); log1p(-exp(x)) is log(1 - P) for x = log P < 0
    log_odds = (chosen_mean - rejected_mean) - (torch.log1p(-chosen_mean.exp()) - torch.log1p(-rejected_mean.exp()))  # (N,)
    ratio = F.logsigmoid(log_odds)  # (N,)
    loss = nll - lam * ratio.mean()
    stats = _stats(lam * chosen_mean.detach(), lam * rejected_mean.detach(), chosen_mean, rejected_mean)
    return loss, {**stats, "nll_loss": nll.detach(), "log_odds_ratio": ratio.mean().detach()}


def _stats(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict[str, torch.Tensor]:
    return {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": chosen_logps.detach().mean(), "logps/rejected": rejected_logps.detach().mean()}


def preference_loss(model, batch: Batch, objective: str, beta: float, autocast) -> tuple[torch.Tensor, dict[str, float]]:
    """The batch's mean DPO or ORPO loss and its statistics (floats). `model`: the peft model in training."""
    logps, counts = token_logps(model, batch, autocast)  # (2N,), (2N,)
    chosen, rejected = logps.chunk(2)  # (N,) each
    if objective == "dpo":
        with torch.no_grad(), model.disable_adapter():
            ref_chosen, ref_rejected = token_logps(model, batch, autocast)[0].chunk(2)
        loss, stats = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
    else:
        n_chosen, n_rejected = counts.chunk(2)
        nll = -chosen.sum() / n_chosen.sum()
        loss, stats = orpo_loss(chosen / n_chosen, rejected / n_rejected, nll, beta)
    return loss, {k: float(v) for k, v in stats.items()}
