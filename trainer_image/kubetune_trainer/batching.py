"""Micro-batches: length-grouped order, and packed (padding-free) or padded tensors.

Packed batches lay the examples of a micro-batch end to end in one row, with
position_ids restarting at 0 for each example and no attention mask. The
model's mask builder then keeps attention inside each example (it derives the
boundaries from the position_ids; this needs use_cache=False). Labels are
shifted within each example, so no position is asked to predict the first
token of the next example.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kubetune_trainer.encoding import IGNORE_INDEX, Example

MEGABATCH_FACTOR = 16  # length grouping sorts within windows of this many batches


def shifted_labels(example: Example) -> list[int]:
    """Label for each position: the next token of the same example, or IGNORE_INDEX."""
    return [*example.labels[1:], IGNORE_INDEX]


def batch_order(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Seeded, length-grouped batches of example indices for one epoch.

    Examples are shuffled, then sorted by length within windows of a few batches,
    so that each batch holds examples of similar length (less padding, and even
    packed rows) while the order still changes every epoch."""
    rng = random.Random(seed * 1_000_003 + epoch)
    indices = list(range(len(lengths)))
    rng.shuffle(indices)
    window = batch_size * MEGABATCH_FACTOR
    batches = []
    for start in range(0, len(indices), window):
        chunk = sorted(indices[start : start + window], key=lambda i: -lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


@dataclass
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor  # already shifted: labels[t] is the target of position t
    position_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    example_lengths: tuple[int, ...] = ()

    @property
    def real_tokens(self) -> int:
        """Non-padding tokens."""
        return sum(self.example_lengths)

    @property
    def label_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def model_inputs(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        inputs = {"input_ids": self.input_ids.to(device)}
        if self.position_ids is not None:
            inputs["position_ids"] = self.position_ids.to(device)
        if self.attention_mask is not None:
            inputs["attention_mask"] = self.attention_mask.to(device)
        return inputs


def collate_packed(examples: Sequence[Example]) -> Batch:
    """One row holding every example, positions restarting per example, no padding."""
    input_ids, labels, positions = [], [], []
    for example in examples:
        input_ids.extend(example.input_ids)
        labels.extend(shifted_labels(example))
        positions.extend(range(len(example)))
    return Batch(
        input_ids=torch.tensor([input_ids], dtype=torch.long),
        labels=torch.tensor([labels], dtype=torch.long),
        position_ids=torch.tensor([positions], dtype=torch.long),
        example_lengths=tuple(len(e) for e in examples),
    )


def collate_padded(examples: Sequence[Example], pad_token_id: int) -> Batch:
    """Right-padded rows with an attention mask; padding positions carry no label."""
    width = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example)
        input_ids[row, :length] = torch.tensor(example.input_ids)
        labels[row, :length] = torch.tensor(shifted_labels(example))
        attention_mask[row, :length] = 1
    return Batch(
        input_ids=input_ids,
        labels=labels,
        attention_mask=attention_mask,
        example_lengths=tuple(len(e) for e in examples),
    )
