"""data.pipeline: resolve → tokenizer → chat setup → prepared data, in one call."""

from __future__ import annotations

from medtune.data.pipeline import prepare_inputs, prepare_with
from medtune.models import load_tokenizer, resolve_model
from medtune.recipe import load_recipe


def test_prepare_inputs_sets_the_tokenizer_up_and_renders_the_rows(tiny_model_dir):
    recipe = load_recipe(None, [f"model={tiny_model_dir}", "data.path=demo:qa", "data.format=qa", "data.limit=12",
                                "data.max_length=64", "data.eval_ratio=0.25"])
    inputs = prepare_inputs(recipe)
    assert inputs.model_dir == resolve_model(str(tiny_model_dir))
    assert (len(inputs.data.train), len(inputs.data.eval)) == (9, 3)
    # the tokenizer it returns is the one the data was rendered with: chat tokens added, pad set the recipe's way
    assert inputs.tok.pad_token == inputs.chat.pad_token
    assert inputs.tok.convert_tokens_to_ids(inputs.chat.stop_tokens) == inputs.chat.stop_token_ids
    first = inputs.tok.decode(inputs.data.train[0].input_ids)
    assert first.startswith("<|im_start|>user\nWhat is ") and "<|im_end|>\n<|im_start|>assistant\n" in first
    # the same rows through a tokenizer loaded separately (eval's road: the loaded model's tokenizer)
    chat, data = prepare_with(recipe, load_tokenizer(inputs.model_dir))
    assert chat == inputs.chat
    assert [s.input_ids for s in data.train + data.eval] == [s.input_ids for s in inputs.data.train + inputs.data.eval]
    assert [s.labels for s in data.train] == [s.labels for s in inputs.data.train]
    assert data.report.to_dict() == inputs.data.report.to_dict()
