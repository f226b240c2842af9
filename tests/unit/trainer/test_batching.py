"""Packing keeps examples apart; accumulation matches the larger batch; length grouping."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from kubetune_trainer.batching import batch_order, collate_packed, collate_padded
from kubetune_trainer.encoding import IGNORE_INDEX, Example
from kubetune_trainer.modeling import packing_supported
from kubetune_trainer.training import Trainer

from kubetune.api.finetuningjob import ResolvedHyperparameters

from .helpers import DEFAULT_HYPERPARAMETERS


def make_examples(lengths, vocab=900, prompt=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for length in lengths:
        ids = torch.randint(5, vocab, (length,), generator=generator).tolist()
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        examples.append(Example(ids, labels))
    return examples


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.config.use_cache = False
    return model


def test_packed_rows_keep_examples_apart():
    examples = make_examples([5, 3, 7])
    batch = collate_packed(examples)
    assert batch.input_ids.shape == (1, 15)
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6]
    labels = batch.labels[0].tolist()
    start = 0
    for example in examples:
        end = start + len(example)
        # Each position predicts the next token of its own example, never the next example.
        assert labels[start : end - 1] == example.labels[1:]
        assert labels[end - 1] == IGNORE_INDEX
        start = end
    assert batch.real_tokens == 15


def test_padded_rows_mask_padding_by_position_not_token_id():
    examples = [Example([1, 2, 9], [1, 2, 9]), Example([1, 9], [1, 9])]  # 9 plays EOS == pad
    batch = collate_padded(examples, pad_token_id=9)
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch.labels.tolist() == [[2, 9, IGNORE_INDEX], [9, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch.real_tokens == 5


def test_packed_forward_equals_separate_passes(model):
    examples = make_examples([9, 4, 13, 6], seed=1)
    batch = collate_packed(examples)
    with torch.no_grad():
        packed_logits = model(**batch.model_inputs("cpu"), use_cache=False).logits[0]
        leaky_logits = model(input_ids=batch.input_ids, use_cache=False).logits[0]
    start = 0
    worst_leak = 0.0
    for example in examples:
        end = start + len(example)
        ids = torch.tensor([example.input_ids])
        labels = torch.tensor([[*example.labels[1:], IGNORE_INDEX]])
        with torch.no_grad():
            alone = model(input_ids=ids, use_cache=False).logits[0]
        loss_alone = F.cross_entropy(alone, labels[0], ignore_index=IGNORE_INDEX)
        loss_packed = F.cross_entropy(
            packed_logits[start:end], labels[0], ignore_index=IGNORE_INDEX
        )
        torch.testing.assert_close(packed_logits[start:end], alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loss_packed, loss_alone, atol=1e-6, rtol=1e-6)
        worst_leak = max(worst_leak, (leaky_logits[start:end] - alone).abs().max().item())
        start = end
    # Without restarting positions the same row attends across examples: the check above
    # would fail for it.
    assert worst_leak > 1e-3
    assert packing_supported(model, torch.device("cpu"))


def test_length_grouped_order_is_seeded_and_complete():
    lengths = [3, 50, 4, 48, 5, 47, 6, 49] * 8
    batches = batch_order(lengths, 4, seed=1, epoch=0)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))
    assert batches == batch_order(lengths, 4, seed=1, epoch=0)
    assert batches != batch_order(lengths, 4, seed=1, epoch=1)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    naive = [list(range(i, i + 4)) for i in range(0, len(lengths), 4)]
    padded_naive = sum(len(b) * max(lengths[i] for i in b) for b in naive)
    assert padded < 0.7 * padded_naive


def _trainer(model, *, batch_size, accumulation, packed):
    hp = ResolvedHyperparameters.model_validate(
        {
            **DEFAULT_HYPERPARAMETERS,
            "batchSize": batch_size,
            "gradientAccumulationSteps": accumulation,
            "effectiveBatchSize": batch_size * accumulation,
        }
    )
    return Trainer(
        model=model,
        train_examples=make_examples([4] * 8),
        eval_examples=[],
        hyperparameters=hp,
        packed=packed,
        pad_token_id=0,
        device=torch.device("cpu"),
        autocast_dtype=None,
        checkpoint_dir=Path("/nonexistent"),
    )


def _gradients(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("packed", [True, False])
def test_accumulation_equals_the_larger_batch(model, packed):
    # Uneven lengths and prompt masks: a per-micro-batch mean would weight tokens unequally.
    examples = make_examples([20, 3, 5, 17, 2, 30], prompt=1, seed=2)
    big = copy.deepcopy(model)
    small = copy.deepcopy(model)
    large_batch = _trainer(big, batch_size=6, accumulation=1, packed=packed)
    accumulated = _trainer(small, batch_size=2, accumulation=3, packed=packed)
    loss_large = large_batch.accumulate_gradients([large_batch.collate(examples)])
    micro = [accumulated.collate(examples[i : i + 2]) for i in range(0, 6, 2)]
    loss_accumulated = accumulated.accumulate_gradients(micro)
    assert loss_accumulated == pytest.approx(loss_large, rel=1e-5)
    large_grads, small_grads = _gradients(big), _gradients(small)
    assert large_grads.keys() == small_grads.keys()
    for name, grad in large_grads.items():
        torch.testing.assert_close(small_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)
    # Averaging per-micro-batch means instead would give a different loss.
    naive = sum(accumulated.accumulate_gradients([b]) for b in micro) / len(micro)
    assert abs(naive - loss_large) > 1e-3


def test_packed_and_padded_gradients_agree(model):
    examples = make_examples([11, 3, 7, 2], seed=3)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    packed = _trainer(a, batch_size=4, accumulation=1, packed=True)
    padded = _trainer(b, batch_size=4, accumulation=1, packed=False)
    assert packed.accumulate_gradients([packed.collate(examples)]) == pytest.approx(
        padded.accumulate_gradients([padded.collate(examples)]), rel=1e-5
    )
    for name, grad in _gradients(a).items():
        torch.testing.assert_close(_gradients(b)[name], grad, atol=1e-6, rtol=1e-4, msg=name)
