"""Generation metrics of evaluation: pure functions that score one generated text.

Each metric compares a model's generated ``prediction`` with the example's reference
(or a regex / JSON Schema from the spec) and returns a float in [0, 1]; ``aggregate``
averages them over an evaluation set. The work is left to well-kept libraries:
ROUGE-L is Google's ``rouge_score`` (the implementation Hugging Face ``evaluate``'s
rouge wraps; ``evaluate.load`` cannot be used since it fetches its script from the
Hub and the trainer runs offline) and JSON Schema validation is ``jsonschema``.
Both are imported on first use, so ``check_regex`` and the string metrics need
neither (rouge_score imports all of nltk, about a second).

This module has no torch and no I/O (its metric names come from the API models): generating the predictions is the caller's job.
"""

from __future__ import annotations

import functools
import json
import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

from kubetune.api.evaluation import GENERATION_METRICS

METRIC_NAMES = tuple(metric.value for metric in GENERATION_METRICS)
MAX_REGEX_LENGTH = 1000
# Perplexity is exp(loss) with the loss capped here: exp(50) ~ 5e21 never overflows.
MAX_LOSS_FOR_PERPLEXITY = 50.0

_WHITESPACE = re.compile(r"\s+")
_TRAILING_PUNCTUATION = re.compile(r"[\s.!?]+\Z")
# A whole answer in a Markdown code fence: ```json ... ``` (the tag is optional).
_FENCE = re.compile(r"\A```(?:json)?[ \t]*\n?(.*?)\n?[ \t]*```\Z", re.DOTALL | re.IGNORECASE)
# Words for ROUGE: runs of Unicode letters and digits.
_WORD = re.compile(r"[^\W_]+")


def normalize(text: str) -> str:
    """The form in which exact_match and contains compare texts.

    Unicode NFKC (full-width letters and digits become ASCII, ligatures split),
    casefold (a stronger lower(): "Straße" == "STRASSE"), every run of whitespace
    (newlines included) becomes one space, leading and trailing whitespace goes, and
    so does sentence punctuation (. ! ?, any run of them) at the very end: "Paris."
    and "paris" are equal. Punctuation elsewhere is kept.
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _WHITESPACE.sub(" ", text).strip()
    return _TRAILING_PUNCTUATION.sub("", text)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the normalized texts are equal, else 0.0."""
    return 1.0 if normalize(prediction) == normalize(reference) else 0.0


def contains(prediction: str, reference: str) -> float:
    """1.0 if the normalized reference occurs in the normalized prediction.

    An empty reference (after normalization) scores 0.0: it would match anything.
    """
    needle = normalize(reference)
    return 1.0 if needle and needle in normalize(prediction) else 0.0


class _UnicodeWords:
    """rouge_score's tokenizer interface; its default keeps only [a-z0-9] runs, so
    "café" would lose its é and non-Latin text would score 0. For ASCII text the
    tokens are the same as the default's (lowercased alphanumeric runs)."""

    def tokenize(self, text: str) -> list[str]:
        return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


@functools.cache
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_UnicodeWords())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of words), in [0, 1]."""
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


def regex_match(prediction: str, pattern: re.Pattern[str]) -> float:
    """1.0 if the pattern matches anywhere in the stripped prediction (re.search)."""
    return 1.0 if pattern.search(prediction.strip()) else 0.0


def check_regex(pattern: str) -> str | None:
    """Why the pattern cannot be used (None if it can)."""
    if not isinstance(pattern, str):
        return f"the regex must be a string, not {type(pattern).__name__}"
    if len(pattern) > MAX_REGEX_LENGTH:
        return (
            f"the regex is {len(pattern)} characters long; at most {MAX_REGEX_LENGTH} are allowed"
        )
    try:
        re.compile(pattern)
    except re.error as error:
        where = f" at position {error.pos}" if error.pos is not None else ""
        return f"the regex {pattern!r} is not valid: {error.msg}{where}"
    return None


def check_schema(schema: dict[str, Any]) -> str | None:
    """Why the JSON Schema cannot be used (None if it can): checked against the
    metaschema of its declared draft ($schema; the latest draft when absent)."""
    if not isinstance(schema, dict):
        return f"the JSON Schema must be an object, not {type(schema).__name__}"
    import jsonschema

    declared = schema.get("$schema")
    if declared is not None and not isinstance(declared, str):
        return "the JSON Schema's $schema must be a string (the URI of a draft)"
    validator_class = _validator_class(schema)
    if validator_class is None:
        return f"the JSON Schema declares an unknown draft: $schema is {declared!r}"
    try:
        validator_class.check_schema(schema)
    except jsonschema.SchemaError as error:
        where = "/".join(str(part) for part in error.path) or "(root)"
        return f"the JSON Schema is not valid at {where}: {error.message}"
    return None


def _validator_class(schema: dict[str, Any]) -> Any:
    from jsonschema.validators import validator_for

    if "$schema" in schema:
        return validator_for(schema, default=None)  # None for an unknown draft
    return validator_for(schema)  # the latest draft


@functools.lru_cache(maxsize=32)
def _validator(schema_json: str) -> Any:
    schema = json.loads(schema_json)
    problem = check_schema(schema)
    if problem:
        raise ValueError(problem)
    return _validator_class(schema)(schema)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def json_schema_valid(prediction: str, schema: dict[str, Any]) -> float:
    """1.0 if the prediction is a JSON document valid against the schema, else 0.0.

    The prediction is stripped and may be wrapped whole in a ```json ... ``` fence.
    NaN and Infinity are not JSON. "format" is an annotation only, as the drafts
    say by default. A bad schema raises ValueError (see check_schema).
    """
    validator = _validator(json.dumps(schema, sort_keys=True))
    text = prediction.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        document = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return 0.0
    return 1.0 if validator.is_valid(document) else 0.0


_REFERENCE_METRICS = {"exact_match": exact_match, "contains": contains, "rouge_l": rouge_l}


def score_example(
    metrics: Sequence[str],
    prediction: str,
    reference: str | None,
    *,
    pattern: re.Pattern[str] | None = None,
    schema: dict[str, Any] | None = None,
) -> dict[str, float]:
    """The scores of one generated example, by metric name.

    exact_match, contains and rouge_l are skipped when there is no reference;
    "regex" needs ``pattern`` and "json_schema" needs ``schema`` (ValueError
    otherwise). Names that are not generation metrics ("loss", "perplexity",
    "token_accuracy", ...) are ignored: the caller computes those.
    """
    scores: dict[str, float] = {}
    for name in metrics:
        if name in _REFERENCE_METRICS:
            if reference is not None:
                scores[name] = _REFERENCE_METRICS[name](prediction, reference)
        elif name == "regex":
            if pattern is None:
                raise ValueError('the "regex" metric needs a pattern')
            scores[name] = regex_match(prediction, pattern)
        elif name == "json_schema":
            if schema is None:
                raise ValueError('the "json_schema" metric needs a schema')
            scores[name] = json_schema_valid(prediction, schema)
    return scores


def aggregate(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The mean of each metric over the rows that have it (in first-seen order)."""
    values: dict[str, list[float]] = {}
    for row in rows:
        for name, value in row.items():
            values.setdefault(name, []).append(value)
    return {name: math.fsum(vs) / len(vs) for name, vs in values.items()}


def perplexity(loss: float) -> float:
    """exp(loss), with the loss capped at MAX_LOSS_FOR_PERPLEXITY so it never overflows."""
    return math.exp(min(loss, MAX_LOSS_FOR_PERPLEXITY))
