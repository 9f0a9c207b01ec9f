"""Token cross-entropy without materialising the logits of every token.

A 49k-token vocabulary makes the logits the largest tensor of a small model's step: 2,048 tokens × 49,152 ×
4 bytes = 400 MB in fp32, plus their gradient. With a frozen output layer (LoRA never trains it) the loss and
the gradient with respect to the hidden states can both be computed chunk by chunk in the forward pass;
backward then only scales the stored gradient. Same FLOPs as the plain path, no recomputation, and peak
memory of one chunk's logits. (Liger's fused linear cross-entropy does this for CUDA; this is ours, in plain
torch, so it runs on CPU and GPU alike.)
"""

from __future__ import annotations

import torch

CHUNK = 256  # rows of logits alive at once: 256 × 49,152 × (2 + 4 + 2) B ≈ 100 MB; 1024 rows cost 380 MB more peak
# RSS on SmolLM2 batch 4 x 512 at the same speed (measured 6.5 vs 6.7 s per step)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # hidden (N, H) in the compute dtype, weight (V, H) frozen, targets (N,) all valid (no ignore index)
        grad_hidden = torch.empty_like(hidden)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], CHUNK):
            h = hidden[start: start + CHUNK]
            t = targets[start: start + CHUNK]
            logits = (h @ weight.t()).float()  # (n, V), fp32 for the softmax
            lse = torch.logsumexp(logits, dim=-1)  # (n,)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            probs = torch.exp_(logits.sub_(lse[:, None]))  # softmax, in place: d loss / d logits = probs - onehot
            probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            grad_hidden[start: start + CHUNK] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_output.to(grad_hidden.dtype), None, None


def chunked_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over rows of CE(hidden @ weight.T, targets). hidden (N, H), weight (V, H) frozen, targets (N,)."""
    if weight.requires_grad:
        raise ValueError("chunked cross-entropy needs a frozen output layer")
    return _ChunkedLinearCrossEntropy.apply(hidden, weight.to(hidden.dtype), targets)

