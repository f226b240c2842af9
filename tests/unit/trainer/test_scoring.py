"""Generation metrics: each against hand-computed values, and the spec checks' messages."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from kubetune_trainer import scoring
from kubetune_trainer.scoring import (
    METRIC_NAMES,
    aggregate,
    check_regex,
    check_schema,
    contains,
    exact_match,
    json_schema_valid,
    normalize,
    perplexity,
    regex_match,
    rouge_l,
    score_example,
)


def test_metric_names() -> None:
    assert METRIC_NAMES == ("exact_match", "contains", "rouge_l", "regex", "json_schema")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  Hello,\n\tWORLD!  ", "hello, world"),  # whitespace runs, case, final "!"
        ("Paris.", "paris"),
        ("Wait...", "wait"),  # a run of final punctuation
        ("Is it?!", "is it"),
        ("Done .", "done"),  # the space before it goes too
        ("e.g. this.", "e.g. this"),  # only at the very end
        ("a.b", "a.b"),
        ("Hello, world", "hello, world"),  # a final comma is not sentence punctuation
        ("Straße", "strasse"),  # casefold, not lower()
        ("\uff30\uff41\uff52\uff49\uff53\uff01", "paris"),  # NFKC: full-width "Paris!"
        ("ﬁne", "fine"),  # NFKC: the ligature
        ("Wait…", "wait"),  # NFKC: the ellipsis is "..."
        ("", ""),
        (" ?! ", ""),
    ],
)
def test_normalize(text: str, expected: str) -> None:
    assert normalize(text) == expected


def test_exact_match() -> None:
    assert exact_match("Paris.", "  paris ") == 1.0
    assert exact_match("The capital is\nParis", "the capital is paris!") == 1.0
    assert exact_match("Paris", "Paris, France") == 0.0
    assert exact_match("Paris", "Pariss") == 0.0


def test_contains() -> None:
    assert contains("The answer is Paris.", "paris") == 1.0
    assert contains("The answer is PARIS, France", "Paris.") == 1.0  # reference normalized too
    assert contains("Paris", "The answer is Paris") == 0.0  # not the other way round
    assert contains("Parisian cafés", "paris") == 1.0  # a substring, not a word match
    assert contains("anything", "") == 0.0
    assert contains("anything", " . ") == 0.0  # empty once normalized


def test_rouge_l_by_hand() -> None:
    # Lin (2004)'s example. Reference "police killed the gunman" (4 words).
    # "police kill the gunman": LCS = police, the, gunman = 3; P = 3/4, R = 3/4, F = 3/4.
    assert rouge_l("police kill the gunman", "police killed the gunman") == pytest.approx(0.75)
    # "the gunman kill police": LCS = the, gunman = 2; P = R = 2/4; F = 1/2.
    assert rouge_l("the gunman kill police", "police killed the gunman") == pytest.approx(0.5)
    # Reference "the cat sat on the mat" (6), prediction "the cat lay on the red mat" (7):
    # LCS = the, cat, on, the, mat = 5; P = 5/7, R = 5/6;
    # F = 2PR / (P + R) = (50/42) / (65/42) = 10/13.
    assert rouge_l("The cat lay on the red mat.", "the cat sat on the mat") == pytest.approx(
        10 / 13
    )
    assert rouge_l("identical words here", "Identical, words: here!") == pytest.approx(1.0)
    assert rouge_l("nothing shared", "completely different") == 0.0
    assert rouge_l("", "a reference") == 0.0


def test_rouge_l_keeps_non_latin_words() -> None:
    # rouge_score's default tokenizer keeps only [a-z0-9] and would give 0 here.
    # Reference "привет друг" (2), prediction "привет мир" (2): LCS = 1; P = R = 1/2; F = 1/2.
    assert rouge_l("Привет мир", "привет друг") == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        ("The cat, it's on the mat!", "the cat is on the mat"),
        ("foo_bar = 42; don't", "foo bar 42 do not"),
        ("A-B-C  d\ne", "a b c d e f"),
    ],
)
def test_rouge_l_matches_rouge_score_default_on_ascii(prediction: str, reference: str) -> None:
    from rouge_score import rouge_scorer

    default = rouge_scorer.RougeScorer(["rougeL"]).score(reference, prediction)["rougeL"]
    assert 0.0 < default.fmeasure < 1.0
    assert rouge_l(prediction, reference) == pytest.approx(default.fmeasure)


def test_regex_match_searches_the_stripped_prediction() -> None:
    assert regex_match("the answer is 42", re.compile(r"\d+")) == 1.0  # search, not match
    assert regex_match("the answer is 42", re.compile(r"^\d+$")) == 0.0
    assert regex_match("  42 \n", re.compile(r"^\d+$")) == 1.0  # stripped first
    assert regex_match("YES", re.compile(r"^(yes|no)$")) == 0.0  # case is the pattern's
    assert regex_match("YES", re.compile(r"^(yes|no)$", re.IGNORECASE)) == 1.0


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name"],
    "additionalProperties": False,
}


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ('{"name": "Ada", "age": 36}', 1.0),
        ('  {"name": "Ada"}\n', 1.0),
        ('```json\n{"name": "Ada", "age": 36}\n```', 1.0),
        ('```JSON\n  {"name": "Ada"}  \n```', 1.0),
        ('```\n{"name": "Ada"}\n```', 1.0),
        ('```json {"name": "Ada"}```', 1.0),
        ('Here it is:\n```json\n{"name": "Ada"}\n```', 0.0),  # the fence must be everything
        ('```json\n{"name": "Ada"}', 0.0),  # unclosed fence
        ("{name: 'Ada'}", 0.0),  # not JSON
        ('{"name": "Ada",}', 0.0),
        ('{"name": "Ada"} and more', 0.0),
        ("", 0.0),
        ('{"age": 36}', 0.0),  # required name missing
        ('{"name": "Ada", "age": -1}', 0.0),  # minimum
        ('{"name": "Ada", "age": 36.5}', 0.0),  # not an integer
        ('{"name": "Ada", "email": "a@b.c"}', 0.0),  # additionalProperties
        ('["Ada"]', 0.0),  # not an object
    ],
)
def test_json_schema_valid(prediction: str, expected: float) -> None:
    assert json_schema_valid(prediction, PERSON) == expected


def test_json_schema_nan_is_not_json() -> None:
    assert json_schema_valid("1.5", {"type": "number"}) == 1.0
    assert json_schema_valid("NaN", {"type": "number"}) == 0.0
    assert json_schema_valid("-Infinity", {"type": "number"}) == 0.0


def test_json_schema_uses_the_declared_draft() -> None:
    # In draft 4, exclusiveMaximum is a boolean modifying "maximum"; from draft 6 on it is a
    # number, so the same schema is invalid under the latest draft.
    draft4 = {
        "$schema": "http://json-schema.org/draft-04/schema#",
        "type": "number",
        "maximum": 10,
        "exclusiveMaximum": True,
    }
    assert check_schema(draft4) is None
    assert json_schema_valid("9", draft4) == 1.0
    assert json_schema_valid("10", draft4) == 0.0
    latest = {key: value for key, value in draft4.items() if key != "$schema"}
    message = check_schema(latest)
    assert message is not None
    assert "exclusiveMaximum" in message
    assert "True is not of type 'number'" in message


def test_json_schema_valid_refuses_a_bad_schema() -> None:
    with pytest.raises(ValueError, match="strnig"):
        json_schema_valid("{}", {"type": "strnig"})


def test_check_schema_messages() -> None:
    assert check_schema(PERSON) is None
    assert check_schema({}) is None
    assert check_schema({"$schema": "https://json-schema.org/draft/2020-12/schema"}) is None
    assert check_schema({"type": "strnig"}) == (
        "the JSON Schema is not valid at type: 'strnig' is not valid under any of the given schemas"
    )
    assert check_schema({"required": "name"}) == (
        "the JSON Schema is not valid at required: 'name' is not of type 'array'"
    )
    nested = {"properties": {"age": {"minimum": "zero"}}}
    assert check_schema(nested) == (
        "the JSON Schema is not valid at properties/age/minimum: 'zero' is not of type 'number'"
    )
    assert check_schema({"$schema": "https://example.com/my-draft"}) == (
        "the JSON Schema declares an unknown draft: $schema is 'https://example.com/my-draft'"
    )
    assert check_schema({"$schema": 7}) == (
        "the JSON Schema's $schema must be a string (the URI of a draft)"
    )
    assert check_schema(["type", "object"]) == "the JSON Schema must be an object, not list"  # type: ignore[arg-type]


def test_check_regex_messages() -> None:
    assert check_regex(r"^\d+$") is None
    assert check_regex("x" * 1000) is None
    assert check_regex("x" * 1001) == (
        "the regex is 1001 characters long; at most 1000 are allowed"
    )
    assert check_regex("(abc") == (
        "the regex '(abc' is not valid: missing ), unterminated subpattern at position 0"
    )
    assert check_regex("a{2,1}") == (
        "the regex 'a{2,1}' is not valid: min repeat greater than max repeat at position 2"
    )
    assert check_regex(42) == "the regex must be a string, not int"  # type: ignore[arg-type]


def test_score_example_reference_metrics() -> None:
    metrics = ["exact_match", "contains", "rouge_l", "loss", "perplexity", "token_accuracy"]
    scores = score_example(metrics, "The answer is Paris.", "Paris")
    # The LCS is "paris": P = 1/4, R = 1/1, F = 2 * (1/4) / (5/4) = 2/5.
    assert scores == {"exact_match": 0.0, "contains": 1.0, "rouge_l": pytest.approx(0.4)}
    assert score_example(metrics, "The answer is Paris.", None) == {}


def test_score_example_regex_and_schema() -> None:
    scores = score_example(
        ["regex", "json_schema", "exact_match"],
        '{"name": "Ada"}',
        None,
        pattern=re.compile(r'"name"'),
        schema=PERSON,
    )
    assert scores == {"regex": 1.0, "json_schema": 1.0}
    with pytest.raises(ValueError, match="needs a pattern"):
        score_example(["regex"], "x", None, schema=PERSON)
    with pytest.raises(ValueError, match="needs a schema"):
        score_example(["json_schema"], "x", "x", pattern=re.compile("x"))
    assert score_example(["loss"], "x", None) == {}  # nothing needed for ignored names


def test_aggregate_means_over_the_rows_that_have_the_metric() -> None:
    rows = [
        {"exact_match": 1.0, "rouge_l": 0.5},
        {"exact_match": 0.0},
        {"exact_match": 1.0, "rouge_l": 1.0, "regex": 0.0},
    ]
    assert aggregate(rows) == {
        "exact_match": pytest.approx(2 / 3),
        "rouge_l": pytest.approx(0.75),
        "regex": 0.0,
    }
    assert list(aggregate(rows)) == ["exact_match", "rouge_l", "regex"]
    assert aggregate([]) == {}
    assert aggregate([{"contains": 0.1}] * 10) == {"contains": pytest.approx(0.1)}


def test_perplexity_is_capped() -> None:
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert perplexity(49.0) == pytest.approx(math.exp(49.0))
    assert perplexity(50.0) == math.exp(50.0)
    assert perplexity(1e6) == math.exp(50.0)  # math.exp(1e6) would raise OverflowError
    assert perplexity(float("inf")) == math.exp(50.0)


def test_rouge_scorer_is_built_once() -> None:
    assert scoring._rouge_scorer() is scoring._rouge_scorer()


def test_import_pulls_in_neither_torch_nor_the_metric_libraries() -> None:
    code = (
        "import sys, kubetune_trainer.scoring as s\n"
        "s.check_regex('a+'); s.exact_match('a', 'a')\n"
        "print(sorted(m for m in ('torch', 'rouge_score', 'nltk', 'jsonschema') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(scoring.__file__).parents[1])}
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env=env,
    )
    assert result.stdout.strip() == "[]"
