"""The chat template, stop tokens and pad token are decided once, and the pad token is never a stop token."""

from __future__ import annotations

import logging

import pytest

from medtune.errors import MedtuneError
from medtune.recipe import TokenizerConfig
from medtune.tokenizer import ChatSetup, prepare_tokenizer, shipped_template

OWN_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def test_chatml_setup(tiny_tokenizer):
    chat = prepare_tokenizer(tiny_tokenizer, TokenizerConfig(template="chatml"))
    assert chat == ChatSetup(template="chatml", stop_tokens=["<|im_end|>", "</s>"], stop_token_ids=[4, 2],
                             pad_token="<|endoftext|>", pad_token_id=5, added_tokens=0)
    assert tiny_tokenizer.chat_template == shipped_template("chatml")
    assert (tiny_tokenizer.pad_token, tiny_tokenizer.pad_token_id) == ("<|endoftext|>", 5)
    assert tiny_tokenizer.padding_side == "right"


def test_auto_picks_chatml_when_the_vocabulary_has_im_start(tiny_tokenizer):
    assert tiny_tokenizer.chat_template is None
    chat = prepare_tokenizer(tiny_tokenizer, TokenizerConfig())
    assert chat.template == "chatml" and "<|im_end|>" in chat.stop_tokens
    assert tiny_tokenizer.chat_template == shipped_template("chatml")


def test_llama2_setup(tiny_tokenizer):
    chat = prepare_tokenizer(tiny_tokenizer, TokenizerConfig(template="llama2", padding_side="left"))
    assert chat == ChatSetup(template="llama2", stop_tokens=["</s>"], stop_token_ids=[2], pad_token="<|endoftext|>",
                             pad_token_id=5, added_tokens=0)
    assert tiny_tokenizer.chat_template == shipped_template("llama2")
    assert tiny_tokenizer.padding_side == "left"


@pytest.mark.parametrize("template", ["auto", "chatml", "llama2"])
@pytest.mark.parametrize("preset", [None, "<|im_end|>", "</s>"])
def test_auto_pad_is_never_a_stop_token(tiny_tokenizer, template, preset):
    if preset is not None:
        tiny_tokenizer.pad_token = preset  # e.g. a tokenizer that ships pad = eos
    chat = prepare_tokenizer(tiny_tokenizer, TokenizerConfig(template=template))
    assert chat.pad_token not in chat.stop_tokens
    if template != "llama2":  # with llama2, <|im_end|> is an ordinary token and may pad
        assert chat.pad_token not in ("<|im_end|>", "</s>")
    assert chat.pad_token != "</s>"
    assert chat.pad_token_id not in chat.stop_token_ids
    assert tiny_tokenizer.pad_token_id == chat.pad_token_id


def test_pad_token_that_is_not_a_stop_token_is_kept(tiny_tokenizer):
    tiny_tokenizer.pad_token = "<unk>"
    chat = prepare_tokenizer(tiny_tokenizer, TokenizerConfig(template="chatml"))
    assert (chat.pad_token, chat.pad_token_id) == ("<unk>", 0)


def test_pad_token_eos_warns_and_copies_eos(tiny_tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="medtune"):
        chat = prepare_tokenizer(tiny_tokenizer, TokenizerConfig(template="chatml", pad_token="eos"))
    assert (chat.pad_token, chat.pad_token_id) == ("</s>", 2)
    assert tiny_tokenizer.pad_token_id == tiny_tokenizer.eos_token_id == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "medtune"]
    assert len(warnings) == 1 and "tokenizer.pad_token=eos" in warnings[0].getMessage()


def test_explicit_pad_token(tiny_tokenizer, caplog):
    chat = prepare_tokenizer(tiny_tokenizer, TokenizerConfig(template="chatml", pad_token="<unk>"))
    assert (chat.pad_token, chat.pad_token_id) == ("<unk>", 0)
    with caplog.at_level(logging.WARNING, logger="medtune"):
        chat = prepare_tokenizer(tiny_tokenizer, TokenizerConfig(template="chatml", pad_token="<|im_end|>"))
    assert chat.pad_token == "<|im_end|>"
    assert any("also a stop token" in r.getMessage() for r in caplog.records)


def test_pad_token_not_in_vocabulary(tiny_tokenizer):
    with pytest.raises(MedtuneError) as err:
        prepare_tokenizer(tiny_tokenizer, TokenizerConfig(template="chatml", pad_token="<nope>"))
    assert str(err.value) == "field 'tokenizer.pad_token': pad token '<nope>' is not in the vocabulary"


def test_unknown_template_name(tiny_tokenizer):
    with pytest.raises(MedtuneError) as err:
        prepare_tokenizer(tiny_tokenizer, TokenizerConfig(template="vicuna"))
    assert str(err.value) == ("field 'tokenizer.template': unknown template 'vicuna': use auto, chatml, llama2 or a "
                              "path to a .jinja file")


def test_template_from_a_jinja_file(tiny_tokenizer, write_file):
    path = write_file("mine.jinja", OWN_TEMPLATE + "{{ '<|im_end|>' }}")
    chat = prepare_tokenizer(tiny_tokenizer, TokenizerConfig(template=str(path)))
    assert chat.template == str(path)
    assert tiny_tokenizer.chat_template == OWN_TEMPLATE + "{{ '<|im_end|>' }}"
    assert chat.stop_tokens == ["<|im_end|>", "</s>"]


def test_auto_uses_the_tokenizers_own_template(tiny_tokenizer):
    tiny_tokenizer.chat_template = OWN_TEMPLATE
    chat = prepare_tokenizer(tiny_tokenizer, TokenizerConfig(template="auto"))
    assert chat.template == "tokenizer"
    assert tiny_tokenizer.chat_template == OWN_TEMPLATE
    assert chat.stop_tokens == ["</s>"]  # no end-of-turn marker in this template: eos only
    assert chat.pad_token == "<|endoftext|>"


def test_prepared_tokenizer_saves_and_reloads_the_same(tiny_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    prepare_tokenizer(tiny_tokenizer, TokenizerConfig(template="chatml"))
    tiny_tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.chat_template == shipped_template("chatml")
    assert (again.pad_token, again.pad_token_id) == ("<|endoftext|>", 5)
    chat = prepare_tokenizer(again, TokenizerConfig(template="auto"))  # what a later command does with the run's copy
    assert (chat.stop_tokens, chat.pad_token) == (["<|im_end|>", "</s>"], "<|endoftext|>")


@pytest.fixture
def plain_tokenizer(build_bpe_tokenizer):
    """A tokenizer with only <unk>, <s>, </s>: no ChatML tokens, no pad candidates but <unk>."""
    return build_bpe_tokenizer(["What is a fever?", "A high temperature."] * 20, ["<unk>", "<s>", "</s>"], 300)


def test_auto_picks_llama2_without_chatml_tokens(plain_tokenizer):
    chat = prepare_tokenizer(plain_tokenizer, TokenizerConfig())
    assert chat == ChatSetup(template="llama2", stop_tokens=["</s>"], stop_token_ids=[2], pad_token="<unk>",
                             pad_token_id=0, added_tokens=0)


def test_chatml_without_its_tokens_is_a_user_error(plain_tokenizer):
    with pytest.raises(MedtuneError) as err:
        prepare_tokenizer(plain_tokenizer, TokenizerConfig(template="chatml"))
    assert str(err.value).startswith("field 'tokenizer.template': template chatml needs the token <|im_start|>")


def test_a_pad_token_is_added_when_no_candidate_is_free(build_bpe_tokenizer):
    tok = build_bpe_tokenizer(["What is a fever?", "A high temperature."] * 20, ["<s>", "</s>"], 300)
    size = len(tok)
    chat = prepare_tokenizer(tok, TokenizerConfig(template="llama2"))
    assert (chat.pad_token, chat.pad_token_id, chat.added_tokens) == ("<|pad|>", size, 1)
    assert len(tok) == size + 1


def test_tiny_model_folder_loads_with_auto_classes(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert tok.convert_ids_to_tokens(list(range(6))) == ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>",
                                                         "<|endoftext|>"]
    assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>"} <= set(tok.all_special_tokens)
    assert tok.chat_template is None and tok("fever")["input_ids"][0] == tok.bos_token_id == 1
    assert tok.decode(tok("<|im_start|>user\nWhat is a fever?<|im_end|>", add_special_tokens=False)["input_ids"]) \
        == "<|im_start|>user\nWhat is a fever?<|im_end|>"
    cfg = model.config
    assert (type(model).__name__, cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == \
        ("LlamaForCausalLM", len(tok), 64, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.tie_word_embeddings) == (4, 2, True)
    assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert 50_000 < sum(p.numel() for p in model.parameters()) < 500_000
