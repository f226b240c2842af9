"""The filter language: what it accepts, how it evaluates, and that it refuses the rest."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kubetune_trainer.expressions import (
    Condition,
    ConditionError,
    EvaluationError,
    parse,
)

ROW = {"length": 42, "word_count": 7, "text": "hello world", "label": "spam", "score": 0.5}


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ("length > 10", True),
        ("length <= 41", False),
        ("length == 42 and word_count != 7", False),
        ("length == 42 or word_count != 7", True),
        ("not length > 100", True),
        ("not (length > 10 and label == 'spam')", False),
        ('text contains "world"', True),
        ("text startswith 'hello' and text endswith 'world'", True),
        ('label == "ham" or (score >= 0.5 and score < 1)', True),
        ("1 < length", True),
        ("length > 1e1", True),
        ("true and not false", True),
        ("LENGTH > 10 AND label == 'spam'", False),  # keywords are case-insensitive, names not
    ],
)
def test_conditions_evaluate(condition, expected):
    row = {**ROW, "LENGTH": 0}
    assert Condition(condition).matches(row) is expected


@pytest.mark.parametrize(
    ("condition", "column", "problem"),
    [
        ("length >> 10", 9, "expected a field, number or string"),
        ("__import__('os').system('x')", 17, "unexpected character '.'"),
        ("length > 10; rm", 12, "unexpected character ';'"),
        ("length.real > 1", 7, "unexpected character '.'"),
        ("length > ", 10, "expected a field, number or string but found the end"),
        ("(length > 1", 12, "expected ')'"),
        ("length > 1 and", 15, "expected a field"),
        ("length", 7, "expected a comparison"),
        ("", 1, "empty condition"),
        ("length > 1)", 11, "unexpected ')'"),
        ("text contains 'unterminated", 15, "unexpected character"),
        ("length + 1 > 2", 8, "unexpected character '+'"),
        ("[1] == 1", 1, "unexpected character '['"),
        ("f(length) > 1", 2, "expected a comparison"),
    ],
)
def test_refusals_point_at_the_column(condition, column, problem):
    with pytest.raises(ConditionError) as caught:
        parse(condition)
    assert caught.value.column == column
    assert problem in caught.value.problem
    # The message shows the condition and a caret under the column.
    lines = str(caught.value).splitlines()
    assert lines[-1].index("^") - 2 == column - 1


def test_type_mismatch_names_the_field():
    with pytest.raises(EvaluationError) as caught:
        Condition("label > 3").matches(ROW)
    assert caught.value.field == "label"
    with pytest.raises(EvaluationError, match="unknown field 'nope'"):
        Condition("nope == 1").matches(ROW)


def test_deep_nesting_is_refused_not_a_recursion_error():
    with pytest.raises(ConditionError, match="nested too deeply"):
        parse("(" * 200 + "length > 1" + ")" * 200)
    with pytest.raises(ConditionError, match="nested too deeply"):
        parse("not " * 200 + "length > 1")


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=60))
def test_any_text_parses_or_is_refused_cleanly(text):
    try:
        condition = Condition(text)
    except ConditionError as err:
        assert 1 <= err.column <= len(text) + 1
        return
    with contextlib.suppress(EvaluationError):
        assert condition.matches(ROW) in (True, False)


ALPHABET = st.sampled_from(
    [
        "length",
        "label",
        "text",
        "score",
        "and",
        "or",
        "not",
        "(",
        ")",
        "==",
        "<",
        ">=",
        "contains",
        "'spam'",
        '"x"',
        "3",
        "-1.5",
        "true",
        " ",
        "__class__",
        ".",
        "lambda",
        "[",
        "]",
        "+",
        "import",
        ",",
        ":",
        "{",
        "}",
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(ALPHABET, max_size=12).map(" ".join))
def test_token_soup_parses_or_is_refused_cleanly(text):
    try:
        condition = Condition(text)
    except ConditionError:
        return
    # Whatever parsed uses only grammar constructs: evaluation gives a bool or a clean error.
    with contextlib.suppress(EvaluationError):
        assert condition.matches(ROW) in (True, False)


comparisons = st.builds(
    lambda field, op, number: (f"{field} {op} {number}", (field, op, number)),
    st.sampled_from(["length", "word_count", "score"]),
    st.sampled_from(["==", "!=", "<", "<=", ">", ">="]),
    st.integers(-5, 60),
)


def _reference(field, op, number):
    value = ROW[field]
    return {
        "==": value == number,
        "!=": value != number,
        "<": value < number,
        "<=": value <= number,
        ">": value > number,
        ">=": value >= number,
    }[op]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(comparisons, min_size=1, max_size=4), st.lists(st.booleans(), min_size=3, max_size=3)
)
def test_boolean_structure_matches_python_semantics(parts, flags):
    texts = [t for t, _ in parts]
    values = [_reference(*args) for _, args in parts]
    joiner = " and " if flags[0] else " or "
    condition = joiner.join(f"({t})" for t in texts)
    expected = all(values) if flags[0] else any(values)
    if flags[1]:
        condition, expected = f"not ({condition})", not expected
    assert Condition(condition).matches(ROW) is expected
