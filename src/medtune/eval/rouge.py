"""Generated answers vs references: ROUGE-L (rouge-score, per item) and BLEU (sacrebleu, corpus).

We call rouge-score and sacrebleu directly instead of `evaluate.load("rouge")`: evaluate fetches its metric
scripts from the hub, which fails offline; these are the libraries evaluate itself wraps.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from medtune.generate import Loaded


@torch.inference_mode()
def generate_batch(loaded: Loaded, prompts: list[list[dict]], *, max_new_tokens: int = 128, batch_size: int = 8,
                   use_adapter: bool = True, progress: bool = True) -> list[str]:
    """Greedy answers to conversations, in batches (left-padded; longest prompts first for little padding)."""
    tok, model = loaded.tok, loaded.model
    device = next(model.parameters()).device
    encoded = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
               for m in prompts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    answers: list[str] = [""] * len(encoded)
    adapter_off = model.disable_adapter() if (loaded.has_adapter and not use_adapter) else nullcontext()
    with adapter_off, tqdm(total=len(order), desc=loaded.label("generating", use_adapter), unit="answer", disable=not progress) as bar:
        for k in range(0, len(order), batch_size):
            idx = order[k: k + batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), loaded.pad_token_id, dtype=torch.long)  # (B, T) left-padded
            mask = torch.zeros((len(idx), width), dtype=torch.long)  # (B, T)
            for b, i in enumerate(idx):
                ids[b, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[b, width - len(encoded[i]):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=loaded.stop_token_ids,
                                 pad_token_id=loaded.pad_token_id)  # (B, T + new)
            for b, i in enumerate(idx):
                answers[i] = tok.decode(out[b, width:], skip_special_tokens=True).strip()
            bar.update(len(idx))
    return answers


def score(predictions: list[str], references: list[str]) -> tuple[dict[str, float], list[list[float]]]:
    """(metrics, per-item rows [ROUGE-L F1 x 100, *BLEU sentence statistics]): rougeL is the mean item F1, bleu is
    sacrebleu's corpus BLEU, which is a function of the summed sentence statistics (so it can be bootstrapped)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(ref, pred)["rougeL"].fmeasure * 100 for pred, ref in zip(predictions, references,
                                                                                       strict=True)]
    stats = _bleu()._extract_corpus_statistics(predictions, [references])  # per item: lengths, n-gram counts
    rows = [[r, *s] for r, s in zip(rouge, stats, strict=True)]
    return {"rougeL": rouge_l(rows), "bleu": bleu(rows), "n": len(rows)}, rows


def _bleu():
    from sacrebleu.metrics import BLEU

    return BLEU()


def rouge_l(rows) -> float:
    return float(sum(r[0] for r in rows) / len(rows))


def bleu(rows) -> float:
    """Corpus BLEU from per-item rows (column 0 is ROUGE-L, the rest sacrebleu's sentence statistics)."""
    totals = [sum(r[k] for r in rows) for k in range(1, len(rows[0]))]
    return float(_bleu()._compute_score_from_stats([int(x) for x in totals]).score)
