"""Rows to token ids and labels.

Labels are the input ids with -100 where no loss is taken: the prompt of a
prompt/completion pair, everything but assistant turns in chat data. The EOS
that ends an example is always a label, even when the tokenizer pads with the
EOS token: padding is masked by position (attention mask), never by token id,
so the model learns to stop.

Examples longer than max_seq_length are truncated on the right and counted;
a row left with no label tokens after truncation is an error naming the row.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from kubetune_trainer.errors import InvalidConfig, InvalidDataset
from kubetune_trainer.records import ExampleShape, Record, messages_of, string_field

IGNORE_INDEX = -100
GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # aligned with input_ids (not shifted); IGNORE_INDEX = no loss

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def label_tokens(self) -> int:
        """Tokens the loss is taken on (predicting position i+1 from i)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


@dataclass(frozen=True)
class EncodedSplit:
    examples: list[Example]
    tokens: int
    truncated: int


class Encoder:
    def __init__(self, tokenizer, shape: ExampleShape, max_seq_length: int) -> None:
        self.tokenizer = tokenizer
        self.shape = shape
        self.max_seq_length = max_seq_length
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise InvalidConfig("the base model's tokenizer has no EOS token")
        if shape.kind == "messages" and not getattr(tokenizer, "chat_template", None):
            raise InvalidConfig(
                "chat data needs a chat template, and the base model's tokenizer has none"
            )

    def encode_all(self, records: Sequence[Record]) -> EncodedSplit:
        examples, truncated = [], 0
        for record in records:
            example, was_truncated = self.encode(record)
            examples.append(example)
            truncated += was_truncated
        return EncodedSplit(examples, sum(len(e) for e in examples), truncated)

    def encode(self, record: Record) -> tuple[Example, bool]:
        if self.shape.kind == "text":
            ids = self._with_eos(self._tokens(string_field(record, self.shape.text or "")))
            labels = list(ids)
        elif self.shape.kind == "prompt_completion":
            prompt = self._tokens(string_field(record, self.shape.prompt or ""))
            completion = self._with_eos(
                self._tokens(string_field(record, self.shape.completion or ""), special=False)
            )
            ids = prompt + completion
            labels = [IGNORE_INDEX] * len(prompt) + completion
        else:
            ids, labels = self._encode_chat(record)
        truncated = len(ids) > self.max_seq_length
        example = Example(ids[: self.max_seq_length], labels[: self.max_seq_length])
        if example.label_tokens == 0:
            raise InvalidDataset(
                f"{record.where}: no tokens left to learn from"
                + (
                    f" after truncation to maxSeqLength {self.max_seq_length} (the example has "
                    f"{len(ids)} tokens); raise hyperparameters.maxSeqLength or drop long rows "
                    "with a filter such as `token_count < N`"
                    if truncated
                    else " (the completion or assistant turn is empty)"
                )
            )
        return example, truncated

    def prompt_ids(self, text: str) -> list[int]:
        """A prompt's tokens, exactly as a prompt/completion example starts."""
        return self._tokens(text)

    def chat_prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """A conversation's tokens up to the assistant's next turn (the chat template
        with its generation prompt), as training renders that part of a chat."""
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        encoded = self.tokenizer(text, add_special_tokens=self._adds_bos(text))
        return self._single_bos(list(encoded["input_ids"]))

    def _adds_bos(self, text: str) -> bool:
        """Whether tokenizing `text` should add the BOS: not if the template wrote it."""
        bos_text = self.tokenizer.bos_token
        return not (bos_text and text.startswith(bos_text))

    def _tokens(self, text: str, special: bool = True) -> list[int]:
        ids = list(self.tokenizer(text, add_special_tokens=special)["input_ids"])
        return self._single_bos(ids)

    def _single_bos(self, ids: list[int]) -> list[int]:
        # Templates that write the BOS themselves plus a tokenizer that adds one give two.
        if self.bos_id is not None and len(ids) >= 2 and ids[0] == ids[1] == self.bos_id:
            return ids[1:]
        return ids

    def _with_eos(self, ids: list[int]) -> list[int]:
        return ids if ids and ids[-1] == self.eos_id else [*ids, self.eos_id]

    def _encode_chat(self, record: Record) -> tuple[list[int], list[int]]:
        """Render with the chat template; label the assistant turns.

        A template that marks assistant turns with {% generation %} gives the mask
        itself. Otherwise each assistant turn is located by rendering the
        conversation up to it: that only works if every such rendering is a prefix of
        the whole conversation's. Templates that render a turn differently once it is
        no longer the last (reasoning templates drop earlier thinking blocks) fail
        that check and are refused: a guessed span would spill into the next turn."""
        messages = messages_of(record, self.shape.messages or "")
        if self._has_generation_markers():
            return self._encode_chat_with_mask(record, messages)
        render = self.tokenizer.apply_chat_template
        text = render(messages, tokenize=False)
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = render(messages[:index], tokenize=False, add_generation_prompt=True)
            through = render(messages[: index + 1], tokenize=False)
            if not (text.startswith(before) and text.startswith(through)):
                raise InvalidConfig(
                    f"{record.where}: the base model's chat template renders assistant turn "
                    f"{index + 1} differently in the whole conversation than on its own, so "
                    "its tokens cannot be told apart from the next turn's. Use a template "
                    "that marks assistant turns with {% generation %} ... {% endgeneration %} "
                    "(transformers' assistant mask), or prompt/completion fields"
                )
            spans.append((len(before), len(through)))
        encoded = self.tokenizer(
            text, add_special_tokens=self._adds_bos(text), return_offsets_mapping=True
        )
        ids = list(encoded["input_ids"])
        offsets = list(encoded["offset_mapping"])
        if self.bos_id is not None and len(ids) >= 2 and ids[0] == ids[1] == self.bos_id:
            ids, offsets = ids[1:], offsets[1:]
        labels = [
            token
            if any(start <= begin < end for start, end in spans) and end_offset > begin
            else IGNORE_INDEX
            for token, (begin, end_offset) in zip(ids, offsets, strict=True)
        ]
        return ids, labels

    def _has_generation_markers(self) -> bool:
        template = getattr(self.tokenizer, "chat_template", None) or ""
        return isinstance(template, str) and GENERATION_MARKER.search(template) is not None

    def _encode_chat_with_mask(self, record: Record, messages) -> tuple[list[int], list[int]]:
        rendered = self.tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = list(rendered["input_ids"])
        mask = list(rendered["assistant_masks"])
        if self.bos_id is not None and len(ids) >= 2 and ids[0] == ids[1] == self.bos_id:
            ids, mask = ids[1:], mask[1:]
        if not any(mask):
            raise InvalidConfig(
                f"{record.where}: the chat template's {{% generation %}} markers select no "
                "tokens: check that they enclose the assistant content"
            )
        return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
