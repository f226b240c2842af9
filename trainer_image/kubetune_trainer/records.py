"""Rows of a dataset and the shape of the examples they hold."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from kubetune.api.finetuningjob import FieldMapping
from kubetune_trainer.errors import InvalidDataset

ShapeKind = Literal["text", "prompt_completion", "messages"]

# Column pairs recognised when spec.dataset.fields is empty, in order of preference.
PROMPT_COMPLETION_PAIRS = [
    ("prompt", "completion"),
    ("question", "answer"),
    ("instruction", "output"),
    ("input", "output"),
]
TEXT_COLUMNS = ("text", "content", "sentence")
MESSAGES_COLUMNS = ("messages", "conversation", "conversations")
CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Record:
    """One row: its columns, and where it came from (for error messages)."""

    row: int  # 1-based position in the source, kept through preprocessing
    fields: dict[str, Any]
    source: str = ""  # e.g. "train.jsonl line 3"; empty: "row <row>"
    origin: str = ""  # how an added row was made, e.g. "noise"

    @property
    def where(self) -> str:
        place = self.source or f"row {self.row}"
        return f"{place} ({self.origin} copy)" if self.origin else place


@dataclass(frozen=True)
class ExampleShape:
    """Which columns make an example: text, prompt/completion, or chat messages."""

    kind: ShapeKind
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    messages: str | None = None

    @property
    def columns(self) -> tuple[str, ...]:
        names = (self.text, self.prompt, self.completion, self.messages)
        return tuple(name for name in names if name)

    @property
    def input_columns(self) -> tuple[str, ...]:
        """Columns that are model input rather than target (what augmentation varies)."""
        if self.kind == "text":
            return (self.text or "",)
        if self.kind == "prompt_completion":
            return (self.prompt or "",)
        return ()

    def describe(self) -> str:
        if self.kind == "text":
            return f"text from column {self.text!r}"
        if self.kind == "prompt_completion":
            return f"prompt {self.prompt!r} / completion {self.completion!r}"
        return f"chat messages from column {self.messages!r}"


def resolve_shape(mapping: FieldMapping | None, columns: Iterable[str]) -> ExampleShape:
    """The example shape from spec.dataset.fields, or guessed from the columns present."""
    columns = list(columns)
    mapping = mapping or FieldMapping()
    if mapping.messages:
        return ExampleShape("messages", messages=mapping.messages)
    if mapping.prompt or mapping.completion:
        if not (mapping.prompt and mapping.completion):
            raise InvalidDataset("dataset.fields: prompt and completion must be set together")
        return ExampleShape(
            "prompt_completion", prompt=mapping.prompt, completion=mapping.completion
        )
    if mapping.text:
        return ExampleShape("text", text=mapping.text)
    for name in MESSAGES_COLUMNS:
        if name in columns:
            return ExampleShape("messages", messages=name)
    for prompt, completion in PROMPT_COMPLETION_PAIRS:
        if prompt in columns and completion in columns:
            return ExampleShape("prompt_completion", prompt=prompt, completion=completion)
    for name in TEXT_COLUMNS:
        if name in columns:
            return ExampleShape("text", text=name)
    if len(columns) == 1:
        return ExampleShape("text", text=columns[0])
    raise InvalidDataset(
        f"cannot tell the example shape from the columns {sorted(columns)}: set dataset.fields "
        "(text, prompt and completion, or messages)"
    )


def columns_of(records: Sequence[Record]) -> list[str]:
    """Columns in first-seen order across the records."""
    seen: dict[str, None] = {}
    for record in records:
        for name in record.fields:
            seen.setdefault(name, None)
    return list(seen)


def messages_of(record: Record, column: str) -> list[dict[str, str]]:
    """The chat messages of a row, checked: a list of {role, content} with string values.

    A JSON string is accepted too (CSV cells hold messages that way)."""
    value = record.fields.get(column)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise InvalidDataset(
                f"{record.where}: field {column!r} is a string that is not a JSON list of "
                f"messages ({err.msg})"
            ) from err
    if not isinstance(value, list) or not value:
        raise InvalidDataset(
            f"{record.where}: field {column!r} must be a non-empty list of "
            f"{{role, content}} messages, got {_type_name(value)}"
        )
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise InvalidDataset(
                f"{record.where}: field {column!r} message {index} must be an object with role "
                f"and content, got {_type_name(message)}"
            )
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise InvalidDataset(
                f"{record.where}: field {column!r} message {index} has role {role!r}; "
                f"expected one of {', '.join(CHAT_ROLES)}"
            )
        if not isinstance(content, str):
            raise InvalidDataset(
                f"{record.where}: field {column!r} message {index} content must be a string, "
                f"got {_type_name(content)}"
            )
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise InvalidDataset(
            f"{record.where}: field {column!r} has no assistant message to learn from"
        )
    return messages


def string_field(record: Record, column: str) -> str:
    """A column that must hold a string, checked."""
    if column not in record.fields:
        raise InvalidDataset(
            f"{record.where}: missing field {column!r} (columns: {sorted(record.fields)})"
        )
    value = record.fields[column]
    if not isinstance(value, str):
        raise InvalidDataset(
            f"{record.where}: field {column!r} must be a string, got {_type_name(value)}"
        )
    return value


def check_example(record: Record, shape: ExampleShape) -> None:
    """Raise InvalidDataset if the row does not hold an example of the shape."""
    if shape.kind == "messages":
        messages_of(record, shape.messages or "")
        return
    for column in shape.columns:
        string_field(record, column)


def example_text(record: Record, shape: ExampleShape) -> str:
    """The example as one string: what `length` and `word_count` measure."""
    if shape.kind == "text":
        return string_field(record, shape.text or "")
    if shape.kind == "prompt_completion":
        return (
            string_field(record, shape.prompt or "")
            + "\n"
            + string_field(record, shape.completion or "")
        )
    return "\n".join(m["content"] for m in messages_of(record, shape.messages or ""))


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(value), f"a {type(value).__name__}"
    )
