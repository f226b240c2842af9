"""Rows to tokens and labels: EOS kept, prompts and non-assistant turns masked, one BOS."""

from __future__ import annotations

import pytest
from kubetune_trainer.encoding import IGNORE_INDEX, Encoder
from kubetune_trainer.errors import InvalidDataset
from kubetune_trainer.records import ExampleShape, Record

TEXT = ExampleShape("text", text="text")
PAIR = ExampleShape("prompt_completion", prompt="q", completion="a")
CHAT = ExampleShape("messages", messages="messages")


def test_pad_is_eos_in_the_test_tokenizer(tokenizer):
    # The case the usual collators get wrong: they mask every pad id, hence every EOS.
    assert tokenizer.pad_token_id == tokenizer.eos_token_id


def test_text_keeps_eos_as_a_label_and_one_bos(tokenizer):
    example, truncated = Encoder(tokenizer, TEXT, 64).encode(Record(1, {"text": "the cat"}))
    assert not truncated
    assert example.input_ids[0] == tokenizer.bos_token_id
    assert example.input_ids[1] != tokenizer.bos_token_id
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert example.labels[-1] == tokenizer.eos_token_id
    assert example.labels == example.input_ids


def test_prompt_is_masked_completion_and_eos_are_labels(tokenizer):
    record = Record(1, {"q": "Q: capital of france?\nA:", "a": " paris"})
    example, _ = Encoder(tokenizer, PAIR, 64).encode(record)
    prompt_ids = tokenizer("Q: capital of france?\nA:")["input_ids"]
    completion_ids = tokenizer(" paris", add_special_tokens=False)["input_ids"]
    assert example.input_ids == prompt_ids + completion_ids + [tokenizer.eos_token_id]
    assert example.labels == [IGNORE_INDEX] * len(prompt_ids) + completion_ids + [
        tokenizer.eos_token_id
    ]


def test_chat_labels_only_assistant_turns_and_single_bos(tokenizer):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi there"},
        {"role": "user", "content": "color of the sun?"},
        {"role": "assistant", "content": "yellow"},
    ]
    example, _ = Encoder(tokenizer, CHAT, 128).encode(Record(1, {"messages": messages}))
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered.startswith(tokenizer.bos_token)
    assert example.input_ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(example.input_ids) == rendered
    learned = [
        t
        for t, label in zip(example.input_ids, example.labels, strict=True)
        if label != IGNORE_INDEX
    ]
    assert tokenizer.decode(learned) == "hi there</s>\nyellow</s>\n"
    # Each assistant turn ends with EOS, and that EOS is learned.
    assert learned.count(tokenizer.eos_token_id) == 2


def test_chat_messages_are_checked(tokenizer):
    encoder = Encoder(tokenizer, CHAT, 64)
    with pytest.raises(InvalidDataset, match="row 3: field 'messages' has no assistant message"):
        encoder.encode(Record(3, {"messages": [{"role": "user", "content": "x"}]}))
    with pytest.raises(InvalidDataset, match="message 0 has role 'robot'"):
        encoder.encode(Record(3, {"messages": [{"role": "robot", "content": "x"}]}))
    with pytest.raises(InvalidDataset, match="message 1 content must be a string, got a number"):
        encoder.encode(
            Record(
                3,
                {
                    "messages": [
                        {"role": "user", "content": "x"},
                        {"role": "assistant", "content": 5},
                    ]
                },
            )
        )


def test_long_examples_are_truncated_and_counted(tokenizer):
    encoder = Encoder(tokenizer, TEXT, 8)
    long_text = " ".join(["the cat eats fish"] * 10)
    split = encoder.encode_all([Record(1, {"text": long_text}), Record(2, {"text": "hi"})])
    assert split.truncated == 1
    assert len(split.examples[0]) == 8
    assert split.tokens == sum(len(e) for e in split.examples)


def test_prompt_longer_than_max_length_is_an_error_naming_the_row(tokenizer):
    encoder = Encoder(tokenizer, PAIR, 8)
    record = Record(
        5, {"q": " ".join(["what is the capital"] * 10), "a": " paris"}, source="d.jsonl line 5"
    )
    with pytest.raises(
        InvalidDataset,
        match=r"d.jsonl line 5: no tokens left to learn from after truncation to maxSeqLength 8",
    ):
        encoder.encode(record)


# A reasoning-style template: the last assistant turn gets a thinking block that
# earlier turns lose, so rendering a conversation up to a middle turn is not a
# prefix of the whole conversation.
REASONING_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' and loop.last %}"
    "<|assistant|>\n<think>ok</think>{{ message['content'] }}{{ eos_token }}\n"
    "{% else %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
MASKED_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>\n"
    "{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}\n"
    "{% else %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TWO_TURNS = [
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "hi there"},
    {"role": "user", "content": "color of the sun?"},
    {"role": "assistant", "content": "yellow"},
]


def _with_template(tokenizer, template):
    import copy

    other = copy.deepcopy(tokenizer)
    other.chat_template = template
    return other


def _learned(tokenizer, example):
    return tokenizer.decode(
        [t for t, label in zip(example.input_ids, example.labels, strict=True) if label >= 0]
    )


def test_a_template_that_renders_turns_differently_is_refused(tokenizer):
    from kubetune_trainer.errors import InvalidConfig

    reasoning = _with_template(tokenizer, REASONING_TEMPLATE)
    with pytest.raises(InvalidConfig, match=r"row 3.*assistant turn 2.*\{% generation %\}"):
        Encoder(reasoning, CHAT, 128).encode(Record(3, {"messages": TWO_TURNS}))
    # A single assistant turn is the last one everywhere: nothing to tell apart.
    example, _ = Encoder(reasoning, CHAT, 128).encode(Record(1, {"messages": TWO_TURNS[:2]}))
    assert _learned(reasoning, example) == "<think>ok</think>hi there</s>\n"


def test_the_templates_assistant_mask_is_used_when_it_has_one(tokenizer):
    masked = _with_template(tokenizer, MASKED_TEMPLATE)
    example, _ = Encoder(masked, CHAT, 128).encode(Record(1, {"messages": TWO_TURNS}))
    assert example.input_ids.count(masked.bos_token_id) == 1
    assert _learned(masked, example) == "hi there</s>yellow</s>"
