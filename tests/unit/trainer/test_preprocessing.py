"""Each preprocessing step: what it does to the rows and what it reports."""

from __future__ import annotations

import random

import pytest
from kubetune_trainer.errors import InvalidConfig, InvalidDataset
from kubetune_trainer.preprocessing import (
    PipelineContext,
    Translator,
    add_noise,
    normalize_whitespace,
    run_pipeline,
)
from kubetune_trainer.records import Record

from kubetune.api.finetuningjob import FieldMapping, PreprocessingStep

FULLWIDTH_FULL = "\uff46\uff55\uff4c\uff4c"  # "full" in fullwidth letters (NFKC folds it)


def records(*texts, column="text"):
    return [Record(i, {column: t}) for i, t in enumerate(texts, start=1)]


def run(rows, *steps, **context):
    parsed = [PreprocessingStep.model_validate(s) for s in steps]
    return run_pipeline(rows, parsed, PipelineContext(**context))


def texts(rows, column="text"):
    return [r.fields[column] for r in rows]


def test_filter_on_derived_fields_and_columns(tokenizer):
    rows = [
        Record(i, {"text": t, "lang": lang})
        for i, (t, lang) in enumerate(
            [
                ("short", "en"),
                ("a much longer text here", "en"),
                ("ein langer deutscher text", "de"),
            ],
            1,
        )
    ]
    out, [result] = run(
        rows,
        {"type": "filter", "condition": "word_count >= 3 and lang == 'en' and token_count > 2"},
        tokenizer=tokenizer,
    )
    assert texts(out) == ["a much longer text here"]
    assert (result.rows_in, result.kept, result.dropped, result.added) == (3, 1, 2, 0)
    assert "kept 1, dropped 2" in result.line()


def test_filter_errors_name_the_row_and_field():
    rows = [Record(1, {"text": "x", "n": 1}), Record(2, {"text": "y", "n": "two"})]
    with pytest.raises(InvalidDataset, match=r"row 2: filter 'n > 0'.*field n"):
        run(rows, {"type": "filter", "condition": "n > 0"})
    with pytest.raises(InvalidConfig, match=r"preprocessing\[0\]: filter condition .* column 9"):
        run(rows, {"type": "filter", "condition": "length >< 3"})


def test_token_count_needs_a_tokenizer():
    with pytest.raises(InvalidConfig, match=r"need the base model's tokenizer"):
        run(records("abc"), {"type": "filter", "condition": "token_count > 1"})


@pytest.mark.parametrize(
    ("operation", "before", "after"),
    [
        ("lowercase", ["MiXeD Case"], ["mixed case"]),
        ("strip", ["  padded \n"], ["padded"]),
        ("normalize_whitespace", ["a \t b\n\n\n\nc  ", FULLWIDTH_FULL], ["a b\n\nc", "full"]),
    ],
)
def test_string_transforms(operation, before, after):
    out, [result] = run(records(*before), {"type": "transform", "operation": operation})
    assert texts(out) == after
    assert (result.kept, result.dropped) == (len(before), 0)


def test_transforms_reach_prompt_completion_and_chat_contents():
    rows = [Record(1, {"q": "HI", "a": "THERE", "id": "KEEP"})]
    out, _ = run(
        rows,
        {"type": "transform", "operation": "lowercase"},
        fields=FieldMapping(prompt="q", completion="a"),
    )
    assert out[0].fields == {"q": "hi", "a": "there", "id": "KEEP"}
    chat = [
        Record(
            1,
            {
                "messages": [
                    {"role": "user", "content": "HEY"},
                    {"role": "assistant", "content": "YO"},
                ]
            },
        )
    ]
    out, _ = run(chat, {"type": "transform", "operation": "lowercase"})
    assert [m["content"] for m in out[0].fields["messages"]] == ["hey", "yo"]


def test_deduplicate_keeps_first():
    out, [result] = run(
        records("a", "b", "a", "c", "b"), {"type": "transform", "operation": "deduplicate"}
    )
    assert texts(out) == ["a", "b", "c"]
    assert [r.row for r in out] == [1, 2, 4]
    assert (result.kept, result.dropped) == (3, 2)


def test_truncate_chars_and_tokens(tokenizer):
    out, _ = run(
        records("abcdefgh"),
        {"type": "transform", "operation": "truncate", "params": {"max_chars": "3"}},
    )
    assert texts(out) == ["abc"]
    text = "the cat eats the fish and the dog runs"
    out, _ = run(
        records(text),
        {"type": "transform", "operation": "truncate", "params": {"max_tokens": "4"}},
        tokenizer=tokenizer,
    )
    kept = texts(out)[0]
    assert text.startswith(kept)
    assert len(tokenizer(kept, add_special_tokens=False)["input_ids"]) == 4
    with pytest.raises(InvalidConfig, match="exactly one of params max_chars, max_tokens"):
        run(records("x"), {"type": "transform", "operation": "truncate"})


def test_template_renders_columns():
    rows = [Record(1, {"q": "2+2?", "a": "4"})]
    out, _ = run(
        rows,
        {
            "type": "transform",
            "operation": "template",
            "params": {"template": "Q: {q} A: {a} {{literal}}"},
        },
    )
    assert out[0].fields["text"] == "Q: 2+2? A: 4 {literal}"
    with pytest.raises(InvalidDataset, match="row 1: template needs field 'z'"):
        run(rows, {"type": "transform", "operation": "template", "params": {"template": "{z}"}})


@pytest.mark.parametrize(
    "template", ["{q.__class__}", "{q[0]}", "{q!r}", "{q:>10}", "{0}", "{", "{}"]
)
def test_template_refuses_anything_but_plain_names(template):
    with pytest.raises(InvalidConfig, match=r"params\.template"):
        run(
            [Record(1, {"q": "x"})],
            {"type": "transform", "operation": "template", "params": {"template": template}},
        )


def test_unknown_operation_and_method():
    with pytest.raises(InvalidConfig, match="operation 'upper' is not one of"):
        run(records("x"), {"type": "transform", "operation": "upper"})
    with pytest.raises(InvalidConfig, match="method 'paraphrase' is not one of"):
        run(records("x"), {"type": "augment", "method": "paraphrase"})


def test_add_noise_is_seeded_and_edits():
    text = "the quick brown fox jumps over the lazy dog"
    first = add_noise(text, random.Random(1), 0.3, "both")
    assert first == add_noise(text, random.Random(1), 0.3, "both")
    assert first != text
    assert add_noise(text, random.Random(1), 0.0, "both") == text
    assert sorted(add_noise("abcdef", random.Random(2), 0.0, "char")) == list("abcdef")


def test_noise_augmentation_adds_copies_of_inputs_only():
    rows = [Record(i, {"q": f"question number {i} here", "a": f"answer {i}"}) for i in range(1, 11)]
    step = {
        "type": "augment",
        "method": "noise",
        "params": {"fraction": "0.5", "probability": "0.5", "seed": "3"},
    }
    out, [result] = run(rows, step, fields=FieldMapping(prompt="q", completion="a"))
    again, _ = run(rows, step, fields=FieldMapping(prompt="q", completion="a"))
    assert [r.fields for r in out] == [r.fields for r in again]
    assert (result.kept, result.dropped, result.added) == (10, 0, 5)
    added = out[10:]
    assert all(r.origin == "noise" for r in added)
    for copy in added:
        original = rows[copy.row - 1]
        assert copy.fields["a"] == original.fields["a"]  # targets stay clean
    assert any(copy.fields["q"] != rows[copy.row - 1].fields["q"] for copy in added)


def test_back_translation_round_trips_through_both_models(translation_model_dir):
    rows = records("the cat eats fish", "the dog runs", "red apple and green grape", "hello world")
    model = str(translation_model_dir)
    step = {
        "type": "augment",
        "method": "back_translation",
        "params": {
            "forward_model": model,
            "backward_model": model,
            "fraction": "0.5",
            "max_new_tokens": "8",
        },
    }
    out, [result] = run(rows, step)
    assert result.kept == 4 and result.dropped == 0
    added = out[4:]
    assert len(added) == result.added
    # The added rows are exactly the models' round trip of the chosen rows' text.
    translator = Translator(model, cache_dir=None, device="cpu")
    for copy in added:
        original = texts(rows)[copy.row - 1]
        expected = translator(translator([original], 8), 8)[0].strip()
        assert copy.fields["text"] == expected
        assert copy.origin == "back_translation"
    assert "2 rows tried" in result.description


def test_back_translation_needs_both_models():
    with pytest.raises(InvalidConfig, match="needs params forward_model and backward_model"):
        run(
            records("x"),
            {"type": "augment", "method": "back_translation", "params": {"forward_model": "m"}},
        )


def test_normalize_whitespace_keeps_paragraphs():
    assert normalize_whitespace("a\u00a0b  c\r\n\n d") == "a b c\n\nd"


def test_augmented_copies_never_cross_the_train_eval_split():
    from kubetune_trainer.preparation import preprocess_and_split

    rows = [Record(i, {"q": f"question number {i} here", "a": f"answer {i}"}) for i in range(1, 41)]
    steps = [
        PreprocessingStep.model_validate(s)
        for s in (
            {"type": "transform", "operation": "deduplicate"},
            {"type": "augment", "method": "noise", "params": {"fraction": "1.0", "seed": "3"}},
            {"type": "transform", "operation": "lowercase"},
        )
    ]
    context = PipelineContext(fields=FieldMapping(prompt="q", completion="a"))
    train, evaluation, lines = preprocess_and_split(rows, steps, context, 0.25, seed=5)
    assert len(evaluation) == 10 and len(train) == 60  # 30 rows and a copy of each
    assert {r.row for r in train}.isdisjoint({r.row for r in evaluation})
    assert all(r.origin == "" for r in evaluation)  # evaluation rows are never augmented
    assert all(r.fields["q"] == r.fields["q"].lower() for r in evaluation)  # later steps run
    assert lines[1].endswith("(training rows)") and "added 30" in lines[1]
