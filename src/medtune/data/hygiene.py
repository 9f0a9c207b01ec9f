"""Data hygiene on the training examples, before rendering: benchmark decontamination, near-duplicate rows, PHI.

- Decontamination follows lm-eval's decontamination janitor (lm_eval/decontamination/janitor.py, GPT-3 paper
  §C): lower-case, delete punctuation, split on whitespace, and call a training row contaminated when it shares
  one 13-gram of words with a benchmark item. Exact n-grams rather than MinHash because a copied question is an
  exact overlap, a 13-gram hit names the overlapping words (the report can show them), and there is no threshold
  to tune; items shorter than 13 words match when their whole normalised text occurs in the row. We normalise
  as the janitor does but do not import it: it prints a traceback on import when its C++ helper is not
  compiled, and `Janitor.clean` cuts text out without saying which item it matched.
- Near-duplicates: datasketch MinHash LSH over word 3-gram shingles, each LSH candidate confirmed by its
  exact Jaccard similarity; the first row of a group is kept, later ones are the duplicates.
- PHI: presidio-analyzer's predefined pattern recognizers (no spaCy model needed: they run with
  nlp_artifacts=None) plus medtune pattern recognizers for medical record numbers and street addresses, which
  presidio lacks. Person names need an NER model; they are scanned only when a spaCy pipeline is installed.
  The report names rows and entity types, never the matched text, so it does not leak what it found.
"""

from __future__ import annotations

import logging
import re
import string
from collections import Counter
from dataclasses import replace
from functools import cache
from pathlib import Path

from medtune.data.benchmark_files import read_benchmark
from medtune.data.formats import Example
from medtune.errors import MedtuneError
from medtune.recipe import DataConfig

NGRAM = 13
SHINGLE = 3
NUM_PERM = 128
SHOWN = 5  # example rows quoted in the report and in errors
# presidio entity → the placeholder redaction writes
PLACEHOLDERS = {"EMAIL_ADDRESS": "<EMAIL>", "PHONE_NUMBER": "<PHONE>", "US_SSN": "<SSN>", "IP_ADDRESS": "<IP>",
                "URL": "<URL>", "DATE_TIME": "<DATE>", "MRN": "<MRN>", "STREET_ADDRESS": "<ADDRESS>",
                "PERSON": "<NAME>"}
_TABLE = str.maketrans(string.ascii_uppercase, string.ascii_lowercase, string.punctuation)


def normalise(text: str) -> list[str]:
    """The janitor's normalisation: lower-case ASCII, punctuation deleted, whitespace-split words."""
    return text.translate(_TABLE).split()


def _ngrams(words: list[str], n: int) -> set[str]:
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set, b: set) -> float:
    """|a ∩ b| / |a ∪ b| (1.0 for two empty sets)."""
    return len(a & b) / len(a | b) if a | b else 1.0


def example_text(ex: Example) -> str:
    return ex.text if ex.text is not None else "\n".join(m["content"] for m in ex.messages)


def _where(ex: Example) -> str:
    return f"{Path(ex.source).name}:{ex.row}"


# ---------------------------------------------------------------- decontamination

class BenchmarkIndex:
    """Every 13-gram of every benchmark item, mapped to the item (task, file:row)."""

    def __init__(self, specs: list[str]):
        self.grams: dict[str, tuple[str, str]] = {}
        self.short: list[tuple[str, tuple[str, str]]] = []  # items under 13 words: whole normalised text
        self.checked: dict[str, int] = {}
        for spec in specs:
            task, sep, path = spec.partition("=")
            if not sep or not task.strip() or not path.strip():
                raise MedtuneError(f"expected task=PATH (e.g. medqa=data/medqa.jsonl), got {spec!r}",
                                   field="data.decontaminate")
            task, path = task.strip(), path.strip()
            n = 0
            for subset in read_benchmark(task, path):
                for item in subset.items:
                    words = normalise(item.query)
                    where = (task, item.id)
                    if len(words) < NGRAM:
                        self.short.append((" ".join(words), where))
                    for gram in _ngrams(words, NGRAM):
                        self.grams.setdefault(gram, where)
                    n += 1
            self.checked[f"{task}={path}"] = n

    def match(self, text: str) -> tuple[str, tuple[str, str]] | None:
        """The first overlapping n-gram and its item, or None."""
        words = normalise(text)
        for i in range(len(words) - NGRAM + 1):
            gram = " ".join(words[i:i + NGRAM])
            if gram in self.grams:
                return gram, self.grams[gram]
        padded = f" {' '.join(words)} "
        for short, where in self.short:
            if f" {short} " in padded:
                return short, where
        return None


def decontaminate(examples: list[Example], cfg: DataConfig) -> tuple[list[Example], dict]:
    index = BenchmarkIndex(cfg.decontaminate)
    kept, hits = [], []
    for ex in examples:
        found = index.match(example_text(ex))
        if found is None:
            kept.append(ex)
            continue
        gram, (task, item) = found
        hits.append(f"{_where(ex)} overlaps {task} {item}: \"{gram}\"")
        if cfg.on_contaminated == "allow":
            kept.append(ex)
    if hits and cfg.on_contaminated == "error":
        raise MedtuneError(f"{len(hits)} training rows overlap benchmark items ({NGRAM}-gram match): "
                           + "; ".join(hits[:SHOWN]) + ("; ..." if len(hits) > SHOWN else "")
                           + ". Set data.on_contaminated=drop to remove them, or allow to keep them",
                           file=cfg.path, field="data.decontaminate")
    report = {"checked_against": index.checked, "ngram": NGRAM, "contaminated_rows": len(hits),
              "action": cfg.on_contaminated, "examples": hits[:SHOWN]}
    return kept, report


# ---------------------------------------------------------------- near-duplicates

def shingles(text: str) -> set[str]:
    """The word 3-grams near-duplicate detection compares (a shorter text: its words as one shingle)."""
    words = normalise(text)
    return _ngrams(words, SHINGLE) if len(words) >= SHINGLE else {" ".join(words)}


def near_duplicates(examples: list[Example], cfg: DataConfig) -> tuple[list[Example], dict]:
    from datasketch import MinHash, MinHashLSH

    # bands tuned to miss few true pairs (weights: false positives 0.1, false negatives 0.9); each candidate is
    # then confirmed by its exact Jaccard similarity, so the MinHash estimate's noise flags no row
    lsh = MinHashLSH(threshold=cfg.near_duplicate_threshold, num_perm=NUM_PERM, weights=(0.1, 0.9))
    kept, pairs = [], []
    shingled: dict[int, set[str]] = {}  # LSH key → that example's shingles, computed once
    first_draw: dict[tuple[str, int], bool] = {}  # (file, row) → kept; data.sources mixing may draw a row again
    for i, ex in enumerate(examples):
        key = (ex.source, ex.row)
        if key in first_draw:  # the same row drawn again is not a near-duplicate of itself: same verdict as before
            if first_draw[key]:
                kept.append(ex)
            continue
        grams = shingles(example_text(ex))
        m = MinHash(num_perm=NUM_PERM, seed=1)
        m.update_batch([s.encode("utf-8") for s in grams])
        twins = sorted(j for j in lsh.query(m) if jaccard(grams, shingled[j]) >= cfg.near_duplicate_threshold)
        lsh.insert(i, m)
        shingled[i] = grams
        first_draw[key] = not (twins and cfg.near_duplicates == "drop")
        if twins:
            pairs.append(f"{_where(ex)} ~ {_where(examples[twins[0]])}")  # the earliest row it nearly copies
            if cfg.near_duplicates == "drop":
                continue
        kept.append(ex)
    report = {"threshold": cfg.near_duplicate_threshold, "duplicate_rows": len(pairs), "action": cfg.near_duplicates,
              "examples": pairs[:SHOWN]}
    return kept, report


# ---------------------------------------------------------------- PHI

@cache
def phi_recognizers() -> list:
    """presidio's pattern recognizers and medtune's, built once (a cached call)."""
    # presidio logs "Using device of type: cpu" at import and a line per recognizer loaded: quiet its logger first
    logging.getLogger("presidio-analyzer").setLevel(logging.WARNING)
    import tldextract
    from presidio_analyzer import Pattern, PatternRecognizer
    from presidio_analyzer.predefined_recognizers import (
        DateRecognizer,
        EmailRecognizer,
        IpRecognizer,
        PhoneRecognizer,
        UrlRecognizer,
        UsSsnRecognizer,
    )

    offline = tldextract.TLDExtract(suffix_list_urls=())

    class OfflineEmailRecognizer(EmailRecognizer):
        """presidio's validates the domain with tldextract's default extractor, which downloads the public
        suffix list on first use; this one reads the snapshot bundled with tldextract."""

        def validate_result(self, pattern_text: str) -> bool:
            return offline(pattern_text).fqdn != ""

    mrn = PatternRecognizer(supported_entity="MRN", name="medtune_mrn", patterns=[Pattern(
        "mrn", r"\b(?:MRN|medical record(?: number| no\.?| #)?|record (?:number|no\.?|#)|patient id|chart (?:number|no\.?|#))"
        r"\s*(?:is|:|#)?\s*#?\s*[A-Z]{0,3}-?\d{5,10}\b", 0.8)])
    street = PatternRecognizer(supported_entity="STREET_ADDRESS", name="medtune_street", patterns=[Pattern(
        "street", r"\b\d{1,5}(?: [NSEW]\.?)?(?: [A-Z][a-z]+){1,3} (?:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|"
        r"Court|Ct|Way|Place|Pl|Terrace|Parkway|Pkwy)\b\.?(?:,? (?:Apt|Suite|Unit) \w+)?", 0.7)],
        global_regex_flags=re.MULTILINE)  # case matters: "12 Oak Street", not "2 doctors dr"
    # URLs with a scheme or www. only: presidio's schema-less patterns (any word.tld) take 90 % of the scan time and
    # flag prose such as "stages.Si" where a space is missing after a full stop.
    url = UrlRecognizer(patterns=[p for p in UrlRecognizer.PATTERNS if p.name in ("Standard Url", "Quoted URL")]
                        + [Pattern("www", r"\bwww\.[\w-]+(?:\.[\w-]+)+(?:/[^\s\"'<>]*)?", 0.5)])
    month = r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)[a-z]*\.?"
    written = PatternRecognizer(supported_entity="DATE_TIME", name="medtune_written_date", patterns=[
        Pattern("month day year", rf"\b{month} \d{{1,2}}(?:st|nd|rd|th)?,? \d{{4}}\b", 0.6),
        Pattern("day month year", rf"\b\d{{1,2}} {month},? \d{{4}}\b", 0.6)],
        global_regex_flags=re.MULTILINE)  # presidio's DateRecognizer reads only numeric dates; "March 14, 2021"
    # Numbers are parsed as US ones (8x faster than presidio's 8 regions); international ones with +CC still match.
    phone = PhoneRecognizer(supported_regions=("US",))
    # phonenumbers accepts only numbers that could be dialled; a made-up or mistyped one in a note is PHI too
    nanp = PatternRecognizer(supported_entity="PHONE_NUMBER", name="medtune_nanp_phone", patterns=[Pattern(
        "nanp", r"(?<![\w-])(?:\+1[\s.-]?)?(?:\(\d{3}\) ?|\d{3}[\s.-])\d{3}[\s.-]\d{4}(?![\w-])", 0.4)])
    return [OfflineEmailRecognizer(), phone, nanp, UsSsnRecognizer(), IpRecognizer(), url, DateRecognizer(), written,
            mrn, street]


def ner_model() -> str | None:
    """The installed spaCy pipeline used to find person names, if any."""
    import spacy

    models = sorted(spacy.util.get_installed_models())
    return models[0] if models else None


@cache
def _names(model: str):
    from presidio_analyzer.nlp_engine import SpacyNlpEngine
    from presidio_analyzer.predefined_recognizers import SpacyRecognizer

    engine = SpacyNlpEngine(models=[{"lang_code": "en", "model_name": model}])
    engine.load()
    return engine, SpacyRecognizer(supported_entities=["PERSON"])


def find_phi(text: str, model: str | None = None) -> list[tuple[int, int, str]]:
    """Non-overlapping (start, end, entity) spans, longest first where recognizers disagree."""
    results = [r for rec in phi_recognizers() for r in rec.analyze(text, rec.supported_entities, None)]
    if model:
        engine, names = _names(model)
        results += names.analyze(text, ["PERSON"], engine.process_text(text, "en"))
    spans: list[tuple[int, int, str]] = []
    for r in sorted(results, key=lambda r: (r.start - r.end, -r.score, r.start)):
        if r.score > 0 and all(r.end <= s or r.start >= e for s, e, _ in spans):
            spans.append((r.start, r.end, r.entity_type))
    return sorted(spans)


def redact(text: str, spans: list[tuple[int, int, str]]) -> str:
    for start, end, entity in reversed(spans):
        text = text[:start] + PLACEHOLDERS[entity] + text[end:]
    return text


# What `medtune push` refuses to upload: identifiers of a person. Dates and URLs are left to data.phi (a card has
# hub links and version dates of its own).
IDENTIFIERS = frozenset({"EMAIL_ADDRESS", "PHONE_NUMBER", "US_SSN", "MRN", "STREET_ADDRESS", "PERSON", "IP_ADDRESS"})


def redact_identifiers(text: str) -> str:
    """`text` with every PHI span found replaced by its placeholder (<EMAIL>, <PHONE>, ...)."""
    return redact(text, find_phi(text, ner_model()))


def identifiers_in(text: str) -> list[str]:
    """The identifier types (IDENTIFIERS) the PHI scan finds in `text`, sorted; never the matched text."""
    return sorted({entity for _, _, entity in find_phi(text, ner_model()) if entity in IDENTIFIERS})


def scan_phi(examples: list[Example], mode: str) -> tuple[list[Example], dict]:
    model = ner_model()
    counts: Counter[str] = Counter()
    rows, out = [], []
    for ex in examples:
        pieces = [ex.text] if ex.text is not None else [m["content"] for m in ex.messages]
        found = [find_phi(p, model) for p in pieces]
        if any(found):
            rows.append(f"{_where(ex)}: " + ", ".join(sorted({e for spans in found for _, _, e in spans})))
            counts.update(e for spans in found for _, _, e in spans)
            if mode == "redact":
                if ex.text is not None:
                    ex = replace(ex, text=redact(ex.text, found[0]))
                else:
                    ex = replace(ex, messages=[{**m, "content": redact(m["content"], spans)}
                                               for m, spans in zip(ex.messages, found, strict=True)])
        out.append(ex)
    report = {"mode": mode, "counts": dict(counts.most_common()), "rows_with_phi": len(rows), "examples": rows[:SHOWN],
              "names": f"scanned with spaCy pipeline {model}" if model else
              "not scanned (no spaCy NER pipeline installed, e.g. en_core_web_lg)"}
    return out, report


def clean(examples: list[Example], cfg: DataConfig) -> tuple[list[Example], dict, list[tuple[int, str]]]:
    """All three checks in order (decontaminate, near-duplicates, PHI); returns the kept examples, the report,
    and (row, reason) for each row dropped."""
    report = {}
    removed = []
    if cfg.decontaminate:
        kept, report["decontamination"] = decontaminate(examples, cfg)
        removed += _gone(examples, kept, "benchmark overlap")
        examples = kept
    kept, report["near_duplicates"] = near_duplicates(examples, cfg)
    removed += _gone(examples, kept, "near-duplicate")
    examples = kept
    if cfg.phi != "off":
        examples, report["phi"] = scan_phi(examples, cfg.phi)
    return examples, report, removed


def _gone(before: list[Example], after: list[Example], reason: str) -> list[tuple[int, str]]:
    kept = {id(ex) for ex in after}
    return [(ex.row, reason) for ex in before if id(ex) not in kept]


def hygiene_lines(h: dict) -> list[str]:
    """The findings of `clean` (a DataReport's hygiene dict) as the report lines `medtune data check` prints."""
    out = []
    if "decontamination" in h:
        d = h["decontamination"]
        against = ", ".join(f"{k} ({n} items)" for k, n in d["checked_against"].items())
        out.append(f"  benchmark overlap ({d['ngram']}-gram): {d['contaminated_rows']} rows "
                   f"({'dropped' if d['action'] == 'drop' else 'kept'}) against {against}")
        out += [f"    {e}" for e in d["examples"]]
    if "near_duplicates" in h:
        d = h["near_duplicates"]
        out.append(f"  near-duplicates (Jaccard >= {d['threshold']}): {d['duplicate_rows']} rows "
                   f"({'dropped' if d['action'] == 'drop' else 'kept'})" + (": " + ", ".join(d["examples"]) if d["examples"] else ""))
    if "phi" in h:
        d = h["phi"]
        counts = ", ".join(f"{n} {e}" for e, n in d["counts"].items()) or "none found"
        out.append(f"  PHI ({d['mode']}): {d['rows_with_phi']} rows with identifiers: {counts}; names {d['names']}")
        out += [f"    {e}" for e in d["examples"]]
    return out
