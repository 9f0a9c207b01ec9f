"""A recipe's inputs in one call: resolve the model → load its tokenizer → set it up for chat → prepare the data.

`medtune data check` prints them, training fits on them, evaluation reads its rows through `prepare_with` (the
loaded model's tokenizer, so nothing is resolved twice).
"""

from __future__ import annotations

from dataclasses import dataclass

from medtune.data.prepare import PreparedData, prepare_data
from medtune.models import load_tokenizer, resolve_model
from medtune.recipe import Recipe
from medtune.tokenizer import ChatSetup, prepare_tokenizer


@dataclass
class Inputs:
    model_dir: str  # the resolved model folder
    tok: object  # its tokenizer, set up for chat (pad token, added tokens)
    chat: ChatSetup
    data: PreparedData


def prepare_with(recipe: Recipe, tok) -> tuple[ChatSetup, PreparedData]:
    """The recipe's data rendered with `tok`, after setting `tok` up the recipe's way (template, stops, pad)."""
    chat = prepare_tokenizer(tok, recipe.tokenizer)
    return chat, prepare_data(recipe, tok, chat)


def prepare_inputs(recipe: Recipe) -> Inputs:
    """Resolve `recipe.model` (offline first), load its tokenizer, and prepare the data with it."""
    model_dir = resolve_model(recipe.model)
    tok = load_tokenizer(model_dir, recipe.trust_remote_code)
    chat, data = prepare_with(recipe, tok)
    return Inputs(model_dir, tok, chat, data)
