"""Guarantees of the training core on TRL: packed examples stay apart, EOS is learned,
accumulation matches the larger batch, and padded and packed batches agree."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from kubetune_trainer.encoding import IGNORE_INDEX, Example
from kubetune_trainer.modeling import packing_supported
from kubetune_trainer.training import build_trainer, sft_arguments, to_dataset
from transformers import TrainerCallback

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


def collator(strategy, pad_token_id=0):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(
        pad_token_id=pad_token_id, padding_free=strategy == "padding_free"
    )


def test_padding_free_rows_keep_examples_apart(model):
    examples = make_examples([9, 4, 13, 6], seed=1)
    batch = collator("padding_free")(list(to_dataset(examples)))
    assert batch["input_ids"].shape == (1, 32)
    assert batch["position_ids"][0].tolist()[:13] == [*range(9), *range(4)]
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        leaky = model(input_ids=batch["input_ids"]).logits[0]
    start, worst_leak = 0, 0.0
    for example in examples:
        end = start + len(example)
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([example.input_ids])).logits[0]
        torch.testing.assert_close(packed[start:end], alone, atol=1e-5, rtol=1e-5)
        # The first token of each example is never a target of the previous one.
        assert batch["labels"][0, start].item() == IGNORE_INDEX
        worst_leak = max(worst_leak, (leaky[start:end] - alone).abs().max().item())
        start = end
    assert worst_leak > 1e-3  # without restarting positions the row would attend across
    assert packing_supported(model, torch.device("cpu"))


def test_bfd_packed_rows_keep_examples_apart(model, tokenizer):
    from trl.data_utils import pack_dataset

    examples = make_examples([30, 7, 20, 12, 25], seed=4)
    packed = pack_dataset(to_dataset(examples), 40, "bfd")
    rows = list(packed)
    assert all(sum(row["seq_lengths"]) == len(row["input_ids"]) <= 40 for row in rows)
    assert sorted(n for row in rows for n in row["seq_lengths"]) == sorted(map(len, examples))
    batch = collator("padding_free")(rows[:1])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    by_length = {len(e): e for e in examples}
    start = 0
    for length in rows[0]["seq_lengths"]:
        ids = torch.tensor([by_length[length].input_ids])
        with torch.no_grad():
            alone = model(input_ids=ids).logits[0]
        torch.testing.assert_close(logits[start : start + length], alone, atol=1e-5, rtol=1e-5)
        start += length


def test_padding_is_masked_by_position_so_eos_is_learned():
    eos = 9  # the pad token is EOS, as for most base models
    examples = [Example([1, 2, eos], [1, 2, eos]), Example([1, eos], [1, eos])]
    batch = collator("padded", pad_token_id=eos)(list(to_dataset(examples)))
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    # Labels are unshifted (the model shifts): the EOS ending each example is a target.
    assert batch["labels"].tolist() == [[1, 2, eos], [1, eos, IGNORE_INDEX]]


class GradientsAtFirstStep(TrainerCallback):
    def __init__(self):
        self.gradients = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.gradients is None:
            self.gradients = {
                n: p.grad.detach().clone()
                for n, p in model.named_parameters()
                if p.grad is not None
            }


def first_step_gradients(model, tokenizer, tmp_path, examples, *, batch, accumulation, strategy):
    hp = ResolvedHyperparameters.model_validate(
        {
            **DEFAULT_HYPERPARAMETERS,
            "batchSize": batch,
            "gradientAccumulationSteps": accumulation,
            "effectiveBatchSize": batch * accumulation,
            "packingStrategy": strategy,
            "maxSteps": 1,
            "maxGradNorm": 0.0,
        }
    )
    args = sft_arguments(
        hp,
        output_dir=tmp_path / f"{strategy}-{batch}x{accumulation}",
        on_cpu=True,
        has_eval=False,
        collective_timeout_seconds=60,
        fsdp={},
    )
    grab = GradientsAtFirstStep()
    trainer = build_trainer(
        copy.deepcopy(model),
        tokenizer,
        args,
        train=examples,
        evaluation=[],
        callbacks=[grab],
        keep_fp32_adapters=True,
    )
    trainer.train()
    return grab.gradients


@pytest.mark.parametrize("strategy", ["padding_free", "padded"])
def test_accumulation_equals_the_larger_batch(model, tokenizer, tmp_path, strategy):
    # Uneven lengths and prompt masks: a mean per micro-batch would weight tokens unequally.
    examples = make_examples([20, 3, 5, 17, 2, 30], prompt=1, seed=2)
    large = first_step_gradients(
        model, tokenizer, tmp_path, examples, batch=6, accumulation=1, strategy=strategy
    )
    accumulated = first_step_gradients(
        model, tokenizer, tmp_path, examples, batch=2, accumulation=3, strategy=strategy
    )
    assert large.keys() == accumulated.keys() and large
    for name, gradient in large.items():
        torch.testing.assert_close(accumulated[name], gradient, atol=1e-6, rtol=1e-4, msg=name)


def test_padded_and_padding_free_gradients_agree(model, tokenizer, tmp_path):
    examples = make_examples([11, 3, 7, 2], seed=3)
    padded = first_step_gradients(
        model, tokenizer, tmp_path, examples, batch=4, accumulation=1, strategy="padded"
    )
    flat = first_step_gradients(
        model, tokenizer, tmp_path, examples, batch=4, accumulation=1, strategy="padding_free"
    )
    for name, gradient in padded.items():
        torch.testing.assert_close(flat[name], gradient, atol=1e-6, rtol=1e-4, msg=name)


def test_a_mean_per_micro_batch_would_differ(model):
    """The equivalences above are not trivially true: averaging per micro-batch
    losses over uneven micro-batches changes the loss."""
    examples = make_examples([20, 3, 5, 17, 2, 30], prompt=1, seed=2)

    def token_losses(batch_examples):
        losses = []
        for example in batch_examples:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([example.input_ids])).logits[0, :-1]
            labels = torch.tensor(example.labels[1:])
            losses.append(F.cross_entropy(logits, labels, reduction="none")[labels != -100])
        return torch.cat(losses)

    token_mean = token_losses(examples).mean()
    per_batch = torch.stack([token_losses(examples[i : i + 2]).mean() for i in (0, 2, 4)]).mean()
    assert abs(token_mean - per_batch) > 1e-3
