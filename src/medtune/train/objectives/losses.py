"""Preference losses as pure functions: answer log-probs in, (mean loss, statistics) out. No model here.

Each equals TRL 1.16's on the same batch (tests/train/test_objective_losses.py). What each takes:

  dpo_loss    log-probs SUMMED over each answer's tokens, policy and reference, (N,) each; `ipo` also needs each
              answer's token count (TRL 1.16 divides the summed log-ratio by it: a per-token average)
  kto_loss    SUMMED log-probs of the desirable (D,) and undesirable (U,) answers, policy and reference, and of the N
              mismatched pairs of the KL batch (`data.batching.mismatched`: prompt i with answer i-1)
  simpo_loss  log-probs AVERAGED over each answer's tokens (N,), policy only (no reference); with `cpo_alpha` > 0
              also the chosen answers' NLL (mean over their tokens)

Statistics are named as TRL logs them (rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins,
logps/chosen, logps/rejected; kto adds kl, simpo with cpo_alpha adds nll_loss), as detached 0-d tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "ipo", "robust", "hinge")


def preference_stats(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
                     rejected_logps: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's per-batch statistics of a paired objective; rewards (N,) each, already detached."""
    return {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": chosen_logps.detach().mean(), "logps/rejected": rejected_logps.detach().mean()}


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0, *,
             chosen_tokens: torch.Tensor | None = None,
             rejected_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO and its variants, as TRL 1.16's DPOTrainer. Inputs: summed answer log-probs, (N,) each.

    With h = (log π(y_c) - log π_ref(y_c)) - (log π(y_r) - log π_ref(y_r)), per pair:
      sigmoid  -log σ(β h)                                                  (Rafailov et al. 2023)
      hinge    max(0, 1 - β h)                                              (SLiC)
      ipo      (h_c / n_c - h_r / n_r - 1 / (2β))²,  h_· the answer's log-ratio, n_· its token count  (IPO, Eq. 17)
      robust   (-(1 - ε) log σ(β h) + ε log σ(-β h)) / (1 - 2ε),  ε = label_smoothing in [0, 0.5)  (rDPO)
    The loss is the mean over pairs; rewards are β · log-ratio (summed log-probs, for every loss type, as TRL)."""
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; one of {', '.join(DPO_LOSS_TYPES)}")
    if label_smoothing and loss_type != "robust":
        raise ValueError(f"label_smoothing is used by the robust loss only, not {loss_type}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), not {label_smoothing}")
    chosen_logratios = chosen - ref_chosen  # (N,)
    rejected_logratios = rejected - ref_rejected  # (N,)
    delta = chosen_logratios - rejected_logratios  # (N,)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss needs chosen_tokens and rejected_tokens (answer token counts)")
        per_token = chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / rejected_tokens.clamp(min=1)
        losses = (per_token - 1 / (2 * beta)) ** 2
    else:  # robust
        eps = label_smoothing
        losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    stats = preference_stats(beta * chosen_logratios.detach(), beta * rejected_logratios.detach(), chosen, rejected)
    return losses.mean(), stats


def kto_kl(policy_kl: torch.Tensor, ref_kl: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0, as TRL 1.16 estimates it: the batch mean of log π(y'|x) - log π_ref(y'|x) over the
    mismatched pairs (x, y') of the KL batch, detached (no gradient flows through it), clamped at 0. 0-d tensor."""
    return (policy_kl - ref_kl).mean().detach().clamp(min=0)


def kto_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, policy_kl: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, ref_kl: torch.Tensor, beta: float,
             desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KTO (Ethayarajh et al. 2024, Eq. 7), as TRL 1.16's KTOTrainer with loss_type="kto".

    With z0 = kto_kl(policy_kl, ref_kl) and r(y) = log π(y|x) - log π_ref(y|x) (summed over the answer):
      desirable answer    λ_D · (1 - σ(β (r(y) - z0)))
      undesirable answer  λ_U · (1 - σ(β (z0 - r(y))))
    and the loss is the mean over all D + U answers of the batch. Inputs: summed log-probs, desirable (D,),
    undesirable (U,), KL batch (N,); either group may be empty. Statistics: kl, and rewards/ and logps/ of a group
    only when the batch has one of its answers (rewards/margins when it has both), as TRL logs them."""
    kl = kto_kl(policy_kl, ref_kl)
    chosen_logratios = policy_chosen - ref_chosen  # (D,)
    rejected_logratios = policy_rejected - ref_rejected  # (U,)
    chosen_losses = 1 - torch.sigmoid(beta * (chosen_logratios - kl))
    rejected_losses = 1 - torch.sigmoid(beta * (kl - rejected_logratios))
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses))
    stats = {"kl": kl}
    for name, logratios, logps in (("chosen", chosen_logratios, policy_chosen),
                                   ("rejected", rejected_logratios, policy_rejected)):
        if logps.numel():
            stats[f"rewards/{name}"] = beta * logratios.detach().mean()
            stats[f"logps/{name}"] = logps.detach().mean()
    if policy_chosen.numel() and policy_rejected.numel():
        stats["rewards/margins"] = stats["rewards/chosen"] - stats["rewards/rejected"]
    return losses.nanmean(), stats


def simpo_loss(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, beta: float, gamma: float = 0.5,
               label_smoothing: float = 0.0, *, nll: torch.Tensor | None = None,
               cpo_alpha: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimPO (Meng et al. 2024), as TRL 1.16's CPOTrainer with loss_type="simpo": reference-free, length-normalised.

    With h = log π(y_c|x) / |y_c| - log π(y_r|x) / |y_r| (average log-probs per answer token, (N,) each) and
    ε = label_smoothing:
      loss = mean( -(1 - ε) log σ(β h - γ) - ε log σ(γ - β h) ) + cpo_alpha · NLL(y_c)
    γ (`gamma`) is TRL's `simpo_gamma`, the target reward margin; TRL subtracts γ/β from h before scaling by β
    (the SimPO paper's "gamma_beta_ratio" is γ/β). cpo_alpha = 0 (our default) is SimPO as published; TRL's
    CPOConfig defaults to cpo_alpha = 1 (CPO-SimPO), which adds the chosen answers' NLL (`nll`, a scalar: the mean
    over their tokens). Rewards are β · average log-prob."""
    if cpo_alpha and nll is None:
        raise ValueError("cpo_alpha > 0 needs nll, the chosen answers' mean token NLL")
    logits = (chosen_avg_logps - rejected_avg_logps) - gamma / beta  # (N,)
    losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    loss = losses.mean() + cpo_alpha * nll if cpo_alpha else losses.mean()
    stats = preference_stats(beta * chosen_avg_logps.detach(), beta * rejected_avg_logps.detach(), chosen_avg_logps,
                             rejected_avg_logps)
    if nll is not None:
        stats["nll_loss"] = nll.detach()
    return loss, stats
