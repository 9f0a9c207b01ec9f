"""render(): which tokens carry loss, with exact expected ids built independently of medtune's masking code."""

from __future__ import annotations

import re

import pytest

from medtune.data.formats import Example, to_example
from medtune.data.readers import Row
from medtune.data.render import IGNORE, Dropped, Sample, has_generation_markers, render
from medtune.errors import MedtuneError
from medtune.recipe import DataConfig, TokenizerConfig
from medtune.tokenizer import prepare_tokenizer, shipped_template

SYSTEM = "You are a careful doctor."
Q1, A1 = "What is a fever?", "A high body temperature, usually above 38 C."
Q2, A2 = "Should I worry about it?", "See a doctor if it lasts more than three days."
CHAT = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q1}, {"role": "assistant", "content": A1},
        {"role": "user", "content": Q2}, {"role": "assistant", "content": A2}]
MESSAGES = DataConfig(format="messages", max_length=1024)


def chat_example(messages=CHAT, source="chats.jsonl", row=7) -> Example:
    return Example(source, row, messages=[dict(m) for m in messages])


def enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def expected_from_pieces(tok, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Token ids of the rendered text piece by piece (pieces end at pre-tokenizer boundaries), and the labels
    that follow from which pieces are answers."""
    ids, labels = [], []
    for text, learned in pieces:
        piece = enc(tok, text)
        ids += piece
        labels += piece if learned else [IGNORE] * len(piece)
    return ids, labels


def loss_runs(tok, sample: Sample) -> list[str]:
    """Decoded runs of consecutive loss-bearing tokens."""
    runs, run = [], []
    for tid, lab in zip(sample.input_ids, sample.labels, strict=True):
        if lab != IGNORE:
            run.append(tid)
        elif run:
            runs.append(tok.decode(run))
            run = []
    if run:
        runs.append(tok.decode(run))
    return runs


def test_chatml_two_turn_labels_are_exactly_the_answers(tiny_tokenizer):
    chat = prepare_tokenizer(tiny_tokenizer, TokenizerConfig(template="chatml"))
    sample, truncated = render(chat_example(), tiny_tokenizer, MESSAGES, chat.stop_tokens)

    assert tiny_tokenizer.apply_chat_template(CHAT, tokenize=False) == (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>assistant\n"
        f"{A1}<|im_end|>\n<|im_start|>user\n{Q2}<|im_end|>\n<|im_start|>assistant\n{A2}<|im_end|>\n")
    ids, labels = expected_from_pieces(tiny_tokenizer, [
        (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>assistant\n", False),
        (f"{A1}<|im_end|>", True),
        (f"\n<|im_start|>user\n{Q2}<|im_end|>\n<|im_start|>assistant\n", False),
        (f"{A2}<|im_end|>", True),
        ("\n", False),
    ])
    assert sample.input_ids == ids
    assert sample.labels == labels
    assert truncated is False
    assert (sample.source, sample.row) == ("chats.jsonl", 7)
    assert loss_runs(tiny_tokenizer, sample) == [f"{A1}<|im_end|>", f"{A2}<|im_end|>"]
    assert sample.labels.count(chat.stop_token_ids[0]) == 2  # both <|im_end|> that close an answer, no other
    assert sample.num_loss_tokens == len(enc(tiny_tokenizer, A1)) + len(enc(tiny_tokenizer, A2)) + 2


def test_llama2_two_turn_labels_are_exactly_the_answers(tiny_tokenizer):
    chat = prepare_tokenizer(tiny_tokenizer, TokenizerConfig(template="llama2"))
    sample, _ = render(chat_example(), tiny_tokenizer, MESSAGES, chat.stop_tokens)

    assert tiny_tokenizer.apply_chat_template(CHAT, tokenize=False) == (
        f"<s>[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\n{Q1} [/INST] {A1} </s><s>[INST] {Q2} [/INST] {A2} </s>")

    def answer(text: str) -> list[tuple[str, bool]]:
        # The template writes ' ' + answer + ' </s>'; byte-level BPE glues that space to the answer's first word
        # (" A"), and then that token carries loss. Only a space left as a token of its own is prompt.
        first = enc(tiny_tokenizer, " " + text.split()[0])
        if tiny_tokenizer.decode(first[:1]) == " ":
            return [(" ", False), (text + " </s>", True)]
        return [(" " + text + " </s>", True)]

    ids, labels = expected_from_pieces(tiny_tokenizer, [
        (f"<s>[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\n{Q1} [/INST]", False), *answer(A1),
        (f"<s>[INST] {Q2} [/INST]", False), *answer(A2),
    ])
    assert sample.input_ids == ids
    assert sample.labels == labels
    assert [r.removeprefix(" ") for r in loss_runs(tiny_tokenizer, sample)] == [f"{A1} </s>", f"{A2} </s>"]
    eos = tiny_tokenizer.eos_token_id
    assert sample.input_ids.count(eos) == 2 and sample.labels.count(eos) == 2
    assert sample.labels.count(tiny_tokenizer.bos_token_id) == 0


def test_template_without_generation_markers_gives_the_same_labels(tiny_tokenizer):
    chat = prepare_tokenizer(tiny_tokenizer, TokenizerConfig(template="chatml"))
    marked, _ = render(chat_example(), tiny_tokenizer, MESSAGES, chat.stop_tokens)

    text = shipped_template("chatml")
    assert text.count("{%- generation -%}") == 1 and text.count("{%- endgeneration -%}") == 1
    unmarked = re.sub(r"\{#.*?#\}", "", text, flags=re.S)  # its comment mentions the tag too (see the next test)
    unmarked = unmarked.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")
    assert has_generation_markers(tiny_tokenizer.chat_template) and not has_generation_markers(unmarked)
    tiny_tokenizer.chat_template = unmarked
    fallback, _ = render(chat_example(), tiny_tokenizer, MESSAGES, chat.stop_tokens)

    assert fallback.input_ids == marked.input_ids
    assert fallback.labels == marked.labels


def test_generation_tag_inside_a_comment_is_not_a_marker():
    assert not has_generation_markers("{#- answers go in {% generation %} blocks -#}{{ messages[0]['content'] }}")


def test_template_whose_prefixes_render_differently_is_a_user_error(tiny_tokenizer):
    chat = prepare_tokenizer(tiny_tokenizer, TokenizerConfig(template="chatml"))
    # The header counts the messages, so a conversation's prefix is not a prefix of the whole.
    tiny_tokenizer.chat_template = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(MedtuneError) as err:
        render(chat_example(), tiny_tokenizer, MESSAGES, chat.stop_tokens)
    assert "chats.jsonl" in str(err.value) and "row 7" in str(err.value)
    assert "field 'tokenizer.template'" in str(err.value)


@pytest.mark.parametrize("template", ["chatml", "llama2"])
def test_train_on_prompt_labels_every_token(tiny_tokenizer, template):
    chat = prepare_tokenizer(tiny_tokenizer, TokenizerConfig(template=template))
    cfg = DataConfig(format="messages", train_on_prompt=True, max_length=1024)
    sample, _ = render(chat_example(), tiny_tokenizer, cfg, chat.stop_tokens)
    assert sample.labels == sample.input_ids
    assert sample.input_ids == enc(tiny_tokenizer, tiny_tokenizer.apply_chat_template(CHAT, tokenize=False))


def test_system_prompt_from_the_recipe_is_prompt_not_answer(tiny_tokenizer):
    chat = prepare_tokenizer(tiny_tokenizer, TokenizerConfig(template="chatml"))
    row = Row("qa.jsonl", 2, {"question": Q1, "answer": A1})
    ex = to_example(row, DataConfig(format="qa"), system_prompt=SYSTEM)
    sample, _ = render(ex, tiny_tokenizer, DataConfig(format="qa"), chat.stop_tokens)
    ids, labels = expected_from_pieces(tiny_tokenizer, [
        (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>assistant\n", False),
        (f"{A1}<|im_end|>", True), ("\n", False)])
    assert (sample.input_ids, sample.labels) == (ids, labels)


# ---- format=text -------------------------------------------------------------------------------------------

TEXT = DataConfig(format="text", max_length=1024)
PASSAGE = "Anemia is a lack of healthy red blood cells."


def text_sample(tok, text, cfg=TEXT):
    sample, truncated = render(Example("notes.jsonl", 1, text=text), tok, cfg, ["</s>"])
    assert truncated is False
    return sample


def test_text_labels_are_the_ids_and_eos_is_appended(tiny_tokenizer):
    sample = text_sample(tiny_tokenizer, PASSAGE)
    assert sample.input_ids == [1, *enc(tiny_tokenizer, PASSAGE), 2]  # <s> from the tokenizer, </s> from medtune
    assert sample.labels == sample.input_ids


def test_text_that_ends_with_eos_gets_no_second_one(tiny_tokenizer):
    sample = text_sample(tiny_tokenizer, PASSAGE + "</s>")
    assert sample.input_ids == [1, *enc(tiny_tokenizer, PASSAGE), 2]
    assert sample.labels == sample.input_ids


def test_text_that_starts_with_bos_gets_no_second_one(tiny_tokenizer):
    sample = text_sample(tiny_tokenizer, "<s>" + PASSAGE)
    assert sample.input_ids == [1, *enc(tiny_tokenizer, PASSAGE), 2]
    assert sample.labels == sample.input_ids


def test_text_add_eos_false_keeps_the_text_as_is(tiny_tokenizer):
    sample = text_sample(tiny_tokenizer, PASSAGE, DataConfig(format="text", add_eos=False, max_length=1024))
    assert sample.input_ids == [1, *enc(tiny_tokenizer, PASSAGE)]
    assert sample.labels == sample.input_ids


# ---- overlong policies --------------------------------------------------------------------------------------

LONG_ANSWER = " ".join(["Drink water and rest, and see a doctor if the fever lasts."] * 12)


def qa_example(question=Q1, answer=LONG_ANSWER) -> Example:
    return Example("qa.jsonl", 3, messages=[{"role": "user", "content": question},
                                            {"role": "assistant", "content": answer}])


def test_overlong_truncate_cuts_the_answer_at_max_length(tiny_tokenizer):
    chat = prepare_tokenizer(tiny_tokenizer, TokenizerConfig(template="chatml"))
    full, truncated = render(qa_example(), tiny_tokenizer, DataConfig(format="qa", max_length=4096), chat.stop_tokens)
    assert truncated is False
    prompt_len = next(i for i, t in enumerate(full.labels) if t != IGNORE)
    max_length = prompt_len + 5
    assert len(full.input_ids) > max_length

    cut, truncated = render(qa_example(), tiny_tokenizer, DataConfig(format="qa", max_length=max_length),
                            chat.stop_tokens)
    assert truncated is True
    assert len(cut.input_ids) == len(cut.labels) == max_length
    assert cut.input_ids == full.input_ids[:max_length]
    assert cut.labels == full.labels[:max_length]
    assert cut.num_loss_tokens == 5


def test_overlong_drop_raises_dropped(tiny_tokenizer):
    chat = prepare_tokenizer(tiny_tokenizer, TokenizerConfig(template="chatml"))
    with pytest.raises(Dropped, match="longer than max_length") as dropped:
        render(qa_example(), tiny_tokenizer, DataConfig(format="qa", max_length=32, overlong="drop"), chat.stop_tokens)
    assert dropped.value.reason == "longer than max_length"


def test_overlong_error_names_the_row(tiny_tokenizer):
    chat = prepare_tokenizer(tiny_tokenizer, TokenizerConfig(template="chatml"))
    full, _ = render(qa_example(), tiny_tokenizer, DataConfig(format="qa", max_length=4096), chat.stop_tokens)
    with pytest.raises(MedtuneError) as err:
        render(qa_example(), tiny_tokenizer, DataConfig(format="qa", max_length=32, overlong="error"), chat.stop_tokens)
    msg = str(err.value)
    assert msg.startswith("qa.jsonl, row 3, field 'prompt': ")
    assert f"example is {len(full.input_ids)} tokens, longer than data.max_length=32" in msg
    assert err.value.kind == "too long"


@pytest.mark.parametrize("fmt, field", [("qa", "prompt"), ("messages", "messages")])
def test_prompt_longer_than_max_length_is_an_error_naming_file_row_and_field(tiny_tokenizer, fmt, field):
    chat = prepare_tokenizer(tiny_tokenizer, TokenizerConfig(template="chatml"))
    long_question = " ".join(["I have had a cough and a fever for three days."] * 6)
    prompt_len = len(enc(tiny_tokenizer, f"<|im_start|>user\n{long_question}<|im_end|>\n<|im_start|>assistant\n"))
    assert prompt_len > 16
    with pytest.raises(MedtuneError) as err:
        render(qa_example(long_question, "Rest."), tiny_tokenizer, DataConfig(format=fmt, max_length=16),
               chat.stop_tokens)
    assert str(err.value).startswith(f"qa.jsonl, row 3, field '{field}': prompt is {prompt_len} tokens, longer than "
                                     "data.max_length=16")
    # ... while overlong=drop skips the row instead.
    with pytest.raises(Dropped):
        render(qa_example(long_question, "Rest."), tiny_tokenizer,
               DataConfig(format=fmt, max_length=16, overlong="drop"), chat.stop_tokens)


def test_num_loss_tokens_never_counts_the_first_token():
    assert Sample([1, 2, 3], [1, 2, 3], "f", 1).num_loss_tokens == 2
    assert Sample([1, 2, 3], [IGNORE, IGNORE, 3], "f", 1).num_loss_tokens == 1
