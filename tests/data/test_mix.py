"""data.sources and data.replay: a seeded datasets.interleave_datasets mix, each source in its own format."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import yaml
from datasets import Dataset, interleave_datasets

from medtune.data.prepare import prepare_data
from medtune.data.readers import read_rows
from medtune.errors import MedtuneError
from medtune.recipe import load_recipe
from medtune.tokenizer import prepare_tokenizer


def jsonl(records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


@pytest.fixture
def files(write_file):
    qa = write_file("qa.jsonl", jsonl({"question": f"What helps with cough {n}?", "answer": f"Rest {n}."}
                                      for n in range(30)))
    ins = write_file("ins.jsonl", jsonl({"instruction": f"Explain fever {n}.", "output": f"Fever {n} is heat."}
                                        for n in range(12)))
    return str(qa), str(ins)


def recipe_file(write_file, data: dict):
    return load_recipe(write_file("r.yaml", yaml.safe_dump({"data": {"max_length": 64, "eval_ratio": 0, **data}})), [])


def prepared(tok, recipe):
    return prepare_data(recipe, tok, prepare_tokenizer(tok, recipe.tokenizer))


def reference_counts(sizes, probabilities, seed, strategy):
    """What datasets itself draws for these sizes: the counts the mix must reproduce exactly."""
    indexed = [Dataset.from_dict({"source": [i] * n}) for i, n in enumerate(sizes)]
    mixed = interleave_datasets(indexed, probabilities=probabilities, seed=seed, stopping_strategy=strategy)
    return Counter(mixed["source"])


@pytest.mark.parametrize("strategy", ["all_exhausted", "first_exhausted"])
def test_sources_mix_in_the_seeded_interleave_proportions(tiny_tokenizer, write_file, files, strategy):
    qa, ins = files
    recipe = recipe_file(write_file, {"stopping_strategy": strategy, "sources": [
        {"path": qa, "weight": 3, "format": "qa"}, {"path": ins, "weight": 1, "format": "instruction"}]})
    data = prepared(tiny_tokenizer, recipe)
    want = reference_counts([30, 12], [0.75, 0.25], recipe.train.seed, strategy)
    got = Counter(s.source for s in data.train)
    assert (got[qa], got[ins]) == (want[0], want[1])
    assert data.report.sources[qa] == {"format": "qa", "probability": 0.75, "read": 30, "held_out": 0, "used": want[0]}
    assert data.report.sources[ins] == {"format": "instruction", "probability": 0.25, "read": 12, "held_out": 0, "used": want[1]}
    if strategy == "all_exhausted":  # every row of the smaller source was drawn at least once
        assert {s.row for s in data.train if s.source == ins} == set(range(1, 13))


def test_each_source_is_rendered_in_its_own_format(tiny_tokenizer, write_file, files):
    qa, ins = files
    recipe = recipe_file(write_file, {"format": "text", "sources": [
        {"path": qa, "format": "qa"}, {"path": ins, "format": "instruction"}]})
    data = prepared(tiny_tokenizer, recipe)
    by_source = {}
    for s in data.train:
        by_source.setdefault(s.source, s)
    for path, field in ((qa, "answer"), (ins, "output")):
        sample = by_source[path]
        row = read_rows(path)[sample.row - 1].data
        answer = tiny_tokenizer.decode([t for t, lab in zip(sample.input_ids, sample.labels, strict=True) if lab != -100])
        assert row[field] in answer
    assert data.report.format == "qa, instruction"


def test_replay_share_of_general_data(tiny_tokenizer, write_file, files):
    qa, _ = files
    recipe = recipe_file(write_file, {"path": qa, "format": "qa", "replay": {"path": "demo:general", "share": 0.2}})
    data = prepared(tiny_tokenizer, recipe)
    general = next(k for k in data.report.sources if k != qa)
    want = reference_counts([30, 80], [0.8, 0.2], recipe.train.seed, "all_exhausted")
    assert [data.report.sources[qa]["used"], data.report.sources[general]["used"]] == [want[0], want[1]]
    assert len(data.train) == want[0] + want[1]
    assert abs(want[1] / (want[0] + want[1]) - 0.2) < 0.05  # all_exhausted draws until all 80 rows were seen
    assert any(f"source {general} (qa): p=0.200" in line for line in data.report.lines())


def test_held_out_rows_are_split_per_source_before_the_mix_repeats_any(tiny_tokenizer, write_file, files):
    qa, ins = files
    recipe = recipe_file(write_file, {"eval_ratio": 0.25, "sources": [{"path": qa, "format": "qa"},
                                                                      {"path": ins, "format": "instruction"}]})
    data = prepared(tiny_tokenizer, recipe)
    train, held = {(s.source, s.row) for s in data.train}, {(s.source, s.row) for s in data.eval}
    assert not train & held and len(held) == len(data.eval) == 8 + 3  # round(30 x 0.25), round(12 x 0.25)
    assert (data.report.sources[qa]["held_out"], data.report.sources[ins]["held_out"]) == (8, 3)
    want = reference_counts([22, 9], [0.5, 0.5], recipe.train.seed, "all_exhausted")
    assert Counter(s.source for s in data.train) == {qa: want[0], ins: want[1]}


def test_single_path_unchanged_without_sources(tiny_tokenizer, write_file, files):
    qa, _ = files
    data = prepared(tiny_tokenizer, recipe_file(write_file, {"path": qa, "format": "qa"}))
    assert [s.row for s in data.train] == list(range(1, 31)) and data.report.sources == {}


@pytest.mark.parametrize(("data", "field"), [
    ({"sources": [{"path": "qa", "weight": 0}]}, "data.sources.0.weight"),
    ({"sources": [{"path": "demo:qa"}, {"path": "nowhere.jsonl"}]}, "data.sources[1].path"),
    ({"replay": {"path": "demo:nothing"}}, "data.replay.path"),
    ({"replay": {"path": "demo:general", "share": 1.5}}, "data.replay.share"),
])
def test_bad_mix_names_the_field(tiny_tokenizer, write_file, data, field):
    with pytest.raises(MedtuneError) as e:
        prepared(tiny_tokenizer, recipe_file(write_file, {"format": "qa", **data}))
    assert field in str(e.value)


def test_eval_data_file_is_read_alone_not_through_the_runs_mix(write_file, files):
    from medtune.eval.inputs import eval_recipe

    qa, ins = files
    path = write_file("mix.yaml", yaml.safe_dump({"data": {"sources": [{"path": qa}, {"path": ins}],
                                                          "replay": {"path": "demo:general"}}}))
    recipe = eval_recipe("any-model", "demo:general", str(path), ["data.format=qa"])
    assert (recipe.data.path, recipe.data.sources, recipe.data.replay.path) == ("demo:general", [], None)
    assert eval_recipe("any-model", None, str(path)).data.replay.path == "demo:general"  # held-out split: the mix
