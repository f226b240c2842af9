"""The filter language of `preprocessing: [{type: filter, condition: ...}]`.

A small, closed grammar evaluated by walking an AST; user text is never handed
to `eval`. Anything outside the grammar is refused with the column where
parsing stopped.

    condition  := or_expr
    or_expr    := and_expr ("or" and_expr)*
    and_expr   := not_expr ("and" not_expr)*
    not_expr   := "not" not_expr | comparison
    comparison := "(" or_expr ")" | value OP value | "true" | "false"
    OP         := "==" | "!=" | "<" | "<=" | ">" | ">=" | "contains" | "startswith" | "endswith"
    value      := NUMBER | STRING | IDENT

Identifiers are `length` (characters of the example), `word_count`,
`token_count` (tokens of the example) and the dataset's columns.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

COMPARISONS = ("==", "!=", "<=", ">=", "<", ">")
WORD_OPERATORS = ("contains", "startswith", "endswith")
KEYWORDS = ("and", "or", "not", "true", "false", *WORD_OPERATORS)
MAX_CONDITION_LENGTH = 4096
MAX_NESTING = 64

_TOKEN_PATTERNS = [
    ("SPACE", r"[ \t\r\n]+"),
    ("NUMBER", r"-?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?"),
    ("STRING", r"\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'"),
    ("IDENT", r"[A-Za-z_][A-Za-z0-9_]*"),
    ("OP", r"==|!=|<=|>=|<|>"),
    ("LPAREN", r"\("),
    ("RPAREN", r"\)"),
]
_TOKEN_RE = re.compile("|".join(f"(?P<{name}>{pattern})" for name, pattern in _TOKEN_PATTERNS))
_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\", '"': '"', "'": "'"}


class ConditionError(ValueError):
    """The condition is not in the grammar; `column` is 1-based."""

    def __init__(self, condition: str, column: int, problem: str) -> None:
        pointer = " " * (column - 1) + "^"
        super().__init__(
            f"filter condition {condition!r}: {problem} at column {column}\n  {condition}\n  {pointer}"
        )
        self.column = column
        self.problem = problem


class EvaluationError(ValueError):
    """A row cannot be evaluated (unknown column, mismatched types)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Token:
    kind: str  # NUMBER, STRING, IDENT, KEYWORD, OP, LPAREN, RPAREN, END
    text: str
    column: int


def tokenize(condition: str) -> list[Token]:
    """Split a condition into tokens, refusing any character outside the grammar."""
    if len(condition) > MAX_CONDITION_LENGTH:
        raise ConditionError(condition[:40] + "...", 1, "condition is too long")
    tokens: list[Token] = []
    position = 0
    while position < len(condition):
        match = _TOKEN_RE.match(condition, position)
        if match is None:
            raise ConditionError(
                condition, position + 1, f"unexpected character {condition[position]!r}"
            )
        kind = match.lastgroup or ""
        text = match.group()
        if kind == "IDENT" and text.lower() in KEYWORDS:
            kind, text = "KEYWORD", text.lower()
        if kind != "SPACE":
            tokens.append(Token(kind, text, position + 1))
        position = match.end()
    tokens.append(Token("END", "", len(condition) + 1))
    return tokens


# --- AST -------------------------------------------------------------------


@dataclass(frozen=True)
class Literal:
    value: str | float | bool


@dataclass(frozen=True)
class FieldRef:
    name: str
    column: int


@dataclass(frozen=True)
class Compare:
    operator: str
    left: Literal | FieldRef
    right: Literal | FieldRef


@dataclass(frozen=True)
class Not:
    operand: Node


@dataclass(frozen=True)
class BoolOp:
    operator: str  # "and" | "or"
    operands: tuple[Node, ...]


Node = Literal | Compare | Not | BoolOp


class _Parser:
    """Recursive descent over the token list, one method per grammar rule."""

    def __init__(self, condition: str) -> None:
        self.condition = condition
        self.tokens = tokenize(condition)
        self.index = 0
        self.depth = 0

    def fail(self, problem: str, token: Token | None = None) -> ConditionError:
        token = token or self.peek()
        return ConditionError(self.condition, token.column, problem)

    def peek(self) -> Token:
        return self.tokens[self.index]

    def advance(self) -> Token:
        token = self.tokens[self.index]
        self.index += 1
        return token

    def at_keyword(self, word: str) -> bool:
        token = self.peek()
        return token.kind == "KEYWORD" and token.text == word

    def parse(self) -> Node:
        if self.peek().kind == "END":
            raise self.fail("empty condition")
        node = self.or_expr()
        if self.peek().kind != "END":
            raise self.fail(f"unexpected {self.describe(self.peek())}")
        return node

    def or_expr(self) -> Node:
        operands = [self.and_expr()]
        while self.at_keyword("or"):
            self.advance()
            operands.append(self.and_expr())
        return operands[0] if len(operands) == 1 else BoolOp("or", tuple(operands))

    def and_expr(self) -> Node:
        operands = [self.not_expr()]
        while self.at_keyword("and"):
            self.advance()
            operands.append(self.not_expr())
        return operands[0] if len(operands) == 1 else BoolOp("and", tuple(operands))

    def not_expr(self) -> Node:
        if self.at_keyword("not"):
            self.advance()
            return Not(self.nested(self.not_expr))
        return self.comparison()

    def nested(self, rule: Callable[[], Node]) -> Node:
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise self.fail("condition is nested too deeply")
        try:
            return rule()
        finally:
            self.depth -= 1

    def comparison(self) -> Node:
        token = self.peek()
        if token.kind == "LPAREN":
            self.advance()
            node = self.nested(self.or_expr)
            if self.peek().kind != "RPAREN":
                raise self.fail(f"expected ')' but found {self.describe(self.peek())}")
            self.advance()
            return node
        if token.kind == "KEYWORD" and token.text in ("true", "false"):
            self.advance()
            return Literal(token.text == "true")
        left = self.value()
        operator = self.peek()
        if operator.kind == "OP" or (
            operator.kind == "KEYWORD" and operator.text in WORD_OPERATORS
        ):
            self.advance()
        else:
            raise self.fail(
                f"expected a comparison (== != < <= > >= contains startswith endswith) "
                f"but found {self.describe(operator)}"
            )
        right = self.value()
        return Compare(operator.text, left, right)

    def value(self) -> Literal | FieldRef:
        token = self.peek()
        if token.kind == "NUMBER":
            self.advance()
            return Literal(float(token.text))
        if token.kind == "STRING":
            self.advance()
            return Literal(_unquote(token.text))
        if token.kind == "IDENT":
            self.advance()
            return FieldRef(token.text, token.column)
        raise self.fail(f"expected a field, number or string but found {self.describe(token)}")

    @staticmethod
    def describe(token: Token) -> str:
        return "the end of the condition" if token.kind == "END" else repr(token.text)


def _unquote(text: str) -> str:
    body = text[1:-1]
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), body)


def parse(condition: str) -> Node:
    """The AST of a condition, or ConditionError pointing at the offending column."""
    if not isinstance(condition, str):
        raise ConditionError(str(condition), 1, "condition must be a string")
    return _Parser(condition).parse()


def fields_used(node: Node) -> set[str]:
    """Names of every field a condition reads."""
    if isinstance(node, FieldRef):
        return {node.name}
    if isinstance(node, Compare):
        return fields_used(node.left) | fields_used(node.right)
    if isinstance(node, Not):
        return fields_used(node.operand)
    if isinstance(node, BoolOp):
        return set().union(*(fields_used(op) for op in node.operands))
    return set()


def evaluate(node: Node, lookup: Callable[[str], Any]) -> bool:
    """Evaluate a parsed condition; `lookup(name)` returns a field's value."""
    if isinstance(node, Literal):
        return bool(node.value)
    if isinstance(node, Not):
        return not evaluate(node.operand, lookup)
    if isinstance(node, BoolOp):
        if node.operator == "and":
            return all(evaluate(op, lookup) for op in node.operands)
        return any(evaluate(op, lookup) for op in node.operands)
    return _compare(node, lookup)


def _resolve(operand: Literal | FieldRef, lookup: Callable[[str], Any]) -> Any:
    if isinstance(operand, Literal):
        return operand.value
    value = lookup(operand.name)
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    if value is None or isinstance(value, str):
        return value
    raise EvaluationError(
        f"field {operand.name!r} is a {type(value).__name__}; conditions compare strings "
        "and numbers only",
        operand.name,
    )


def _compare(node: Compare, lookup: Callable[[str], Any]) -> bool:
    left, right = _resolve(node.left, lookup), _resolve(node.right, lookup)
    op = node.operator
    if op in ("==", "!="):
        return (left == right) == (op == "==")
    names = [o.name for o in (node.left, node.right) if isinstance(o, FieldRef)]
    if left is None or right is None:
        return False  # a missing (null) value satisfies no ordering or text test
    if op in WORD_OPERATORS:
        if not (isinstance(left, str) and isinstance(right, str)):
            raise EvaluationError(
                f"{op!r} needs strings on both sides (field {', '.join(names) or '-'})",
                names[0] if names else None,
            )
        if op == "contains":
            return right in left
        return left.startswith(right) if op == "startswith" else left.endswith(right)
    if type(left) is not type(right):
        raise EvaluationError(
            f"cannot compare a {type(left).__name__} with a {type(right).__name__} "
            f"using {op!r} (field {', '.join(names) or '-'})",
            names[0] if names else None,
        )
    return {
        "<": left < right,
        "<=": left <= right,
        ">": left > right,
        ">=": left >= right,
    }[op]


class Condition:
    """A parsed condition, ready to test rows."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.ast = parse(text)
        self.fields = fields_used(self.ast)

    def matches(self, lookup: Callable[[str], Any] | Mapping[str, Any]) -> bool:
        if isinstance(lookup, Mapping):
            mapping = lookup

            def lookup(name: str) -> Any:
                if name not in mapping:
                    raise EvaluationError(f"unknown field {name!r}", name)
                return mapping[name]

        return evaluate(self.ast, lookup)
