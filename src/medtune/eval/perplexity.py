"""Held-out perplexity: token-weighted over the tokens that carry loss, sliding windows past the context length.

A text longer than `window` tokens is scored in windows of `window` tokens that advance by `stride`; each window
scores only the targets the previous one did not reach, so every target is scored exactly once, and (after the
first window) with at least `window - stride` tokens of context: the recipe of the transformers perplexity guide.
Windows of all texts are batched together, longest first, and the output layer runs only at scored positions.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from medtune.data.render import IGNORE, Sample
from medtune.errors import MedtuneError
from medtune.generate import Loaded

CHUNK = 1024  # scored positions per output-layer call: 1024 x 49k vocab x 4 B = 200 MB of fp32 logits


@dataclass
class Window:
    doc: int  # index of the text
    input_ids: list[int]  # (T,) at most `window` tokens
    targets: list[int]  # (T,) token position t must predict, IGNORE where not scored here


def windows(samples: list[Sample], window: int, stride: int, all_tokens: bool = False) -> list[Window]:
    """Split texts into scoring windows; targets are the next token's label (all tokens with `all_tokens`)."""
    if not 0 < stride < window:  # stride == window would leave each window's first token without context
        raise MedtuneError(f"stride must be in 1..{window - 1} (window {window}), got {stride}", field="--stride")
    out = []
    for doc, s in enumerate(samples):
        labels = s.input_ids if all_tokens else s.labels
        targets = list(labels[1:]) + [IGNORE]  # (L,)
        n = len(s.input_ids)
        end = min(window, n)
        out.append(Window(doc, s.input_ids[:end], targets[:end - 1] + [IGNORE]))
        while end < n:
            new_end = min(end + stride, n)
            begin = new_end - window
            # targets of positions begin..new_end-2 that predict tokens end..new_end-1; earlier ones already scored
            tgt = [IGNORE] * (end - 1 - begin) + targets[end - 1: new_end - 1] + [IGNORE]
            out.append(Window(doc, s.input_ids[begin:new_end], tgt))
            end = new_end
    return out


@dataclass
class Perplexity:
    perplexity: float
    loss: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # scored tokens
    docs: list[tuple[float, int]]  # per text: (summed NLL, scored tokens), for the paired bootstrap

    def metrics(self) -> dict[str, float]:
        return {"perplexity": self.perplexity, "loss": self.loss, "tokens": self.tokens, "n": len(self.docs)}

    def eval_figures(self) -> dict[str, float]:
        """The training loop's names for the held-out figures."""
        return {"eval_loss": self.loss, "eval_ppl": self.perplexity, "eval_tokens": self.tokens}

    def scores(self) -> tuple[dict, list[list], dict]:
        """What an eval.suite runner returns: (metrics, per-text rows, subtasks)."""
        return self.metrics(), [list(d) for d in self.docs], {}


def from_docs(docs: list[tuple[float, int]]) -> Perplexity:
    nll = sum(d[0] for d in docs)
    tokens = sum(d[1] for d in docs)
    if tokens == 0:
        raise MedtuneError("no tokens carry loss in this data (try --all-tokens)", field="--data")
    loss = nll / tokens
    return Perplexity(math.exp(min(loss, 50.0)), loss, tokens, docs)


@torch.inference_mode()
def perplexity(loaded: Loaded, samples: list[Sample], *, window: int | None = None, stride: int | None = None,
               batch_size: int = 8, all_tokens: bool = False, use_adapter: bool = True,
               progress: bool = True) -> Perplexity:
    """Perplexity of the model on the samples' loss-bearing tokens (or all tokens)."""
    if not samples:
        raise MedtuneError("no texts to measure perplexity on", field="--data")
    model = loaded.model
    window = window or loaded.max_length
    wins = windows(samples, window, stride or max(1, window // 2), all_tokens)
    device = next(model.parameters()).device
    adapter_off = model.disable_adapter() if (loaded.has_adapter and not use_adapter) else nullcontext()
    autocast = torch.autocast(device.type, dtype=loaded.autocast) if loaded.autocast is not None else nullcontext()
    with adapter_off:
        return score(model, wins, len(samples), pad_id=loaded.pad_token_id, batch_size=batch_size, autocast=autocast,
                     progress=progress, desc=loaded.label("perplexity", use_adapter))


def held_out(model, samples: list[Sample], *, pad_id: int, batch_size: int, autocast) -> Perplexity:
    """Perplexity of texts that fit the context whole (the training loop's held-out data), one window each."""
    longest = max(len(s.input_ids) for s in samples)
    return score(model, windows(samples, longest + 1, longest), len(samples), pad_id=pad_id, batch_size=batch_size,
                 autocast=autocast, progress=False)


@torch.no_grad()  # not inference_mode: the training loop calls this between steps (see models.py's 4-bit guard)
def score(model, wins: list[Window], n_docs: int, *, pad_id: int, batch_size: int, autocast,
          progress: bool, desc: str = "perplexity") -> Perplexity:
    """Summed NLL and scored tokens per text over its windows, in eval mode (the model's mode is restored)."""
    wins = sorted(wins, key=lambda w: -len(w.input_ids))  # longest first: little padding, memory peak at once
    device = next(model.parameters()).device
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    nll = [0.0] * n_docs
    count = [0] * n_docs
    was_training = model.training
    model.eval()
    with autocast, tqdm(total=len(wins), desc=desc, unit="window", disable=not progress) as bar:
        for k in range(0, len(wins), batch_size):
            batch = wins[k: k + batch_size]
            width = max(len(w.input_ids) for w in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T) right-padded
            tgt = torch.full((len(batch), width), IGNORE, dtype=torch.long)  # (B, T)
            for b, w in enumerate(batch):
                ids[b, : len(w.input_ids)] = torch.tensor(w.input_ids)
                tgt[b, : len(w.targets)] = torch.tensor(w.targets)
            hidden = decoder(input_ids=ids.to(device), use_cache=False).last_hidden_state  # (B, T, H)
            valid = tgt != IGNORE  # (B, T)
            rows = valid.nonzero()[:, 0]  # (N,) window of each scored position
            h, t = hidden[valid.to(device)], tgt[valid].to(device)  # (N, H), (N,)
            losses = torch.cat([F.cross_entropy(head(h[i: i + CHUNK]).float(), t[i: i + CHUNK], reduction="none")
                                for i in range(0, len(t), CHUNK)]) if len(t) else torch.zeros(0)  # (N,)
            per_row = torch.zeros(len(batch)).index_add_(0, rows, losses.float().cpu())  # (B,)
            for b, w in enumerate(batch):
                nll[w.doc] += float(per_row[b])
                count[w.doc] += int(valid[b].sum())
            bar.update(len(batch))
    model.train(was_training)
    return from_docs(list(zip(nll, count, strict=True)))
