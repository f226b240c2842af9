"""sdpa_varlen: per-example SDPA on padding-free rows, exactly transformers' SDPA with its
block-diagonal mask, and transformers' SDPA unchanged for everything else."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kubetune_trainer import attention
from kubetune_trainer.attention import is_block_causal, segment_lengths

from .test_collation import collator, make_examples


def load(folder, implementation):
    from transformers import AutoModelForCausalLM

    attention.register()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation=implementation
    )
    model.config.use_cache = False
    return model


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    return load(tiny_model_dir, "sdpa"), load(tiny_model_dir, "sdpa_varlen")


def test_segments_start_where_positions_restart() -> None:
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1, 2, 3]])
    assert segment_lengths(positions) == [3, 2, 1, 4]
    assert segment_lengths(torch.arange(7)[None]) == [7]


def test_only_the_packed_rows_mask_is_recognised() -> None:
    lengths = [3, 1, 4]
    example = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))
    packed = (example[:, None] == example[None, :]) & torch.ones(8, 8, dtype=torch.bool).tril()
    assert is_block_causal(packed[None, None], lengths)
    assert not is_block_causal(torch.ones(8, 8, dtype=torch.bool).tril()[None, None], lengths)
    leaky = packed.clone()
    leaky[5, 0] = True  # one score across examples
    assert not is_block_causal(leaky[None, None], lengths)
    padded = packed.clone()
    padded[:, 4] = False  # a padding column inside an example
    assert not is_block_causal(padded[None, None], lengths)


def test_grouped_query_attention_per_example_equals_the_dense_mask() -> None:
    torch.manual_seed(0)
    lengths = [5, 11, 2, 7]
    n = sum(lengths)
    query, key, value = torch.randn(1, 4, n, 8), torch.randn(1, 2, n, 8), torch.randn(1, 2, n, 8)
    positions = torch.cat([torch.arange(length) for length in lengths])[None]
    example = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    mask = ((example[:, None] == example[None, :]) & torch.ones(n, n).bool().tril())[None, None]
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    ours, _ = attention.sdpa_varlen_attention_forward(
        module, query, key, value, mask, position_ids=positions
    )
    dense = F.scaled_dot_product_attention(
        query, key.repeat_interleave(2, 1), value.repeat_interleave(2, 1), attn_mask=mask
    ).transpose(1, 2)
    assert ours.shape == (1, n, 4, 8)
    torch.testing.assert_close(ours, dense, rtol=0, atol=1e-6)


def test_padding_free_training_matches_sdpa_and_each_example_alone(models) -> None:
    dense_model, varlen_model = models
    examples = make_examples([9, 4, 13, 6, 3, 17], seed=3)
    from kubetune_trainer.training import to_dataset

    batch = collator("padding_free")(list(to_dataset(examples)))
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    losses = []
    for model in (dense_model, varlen_model):
        model.zero_grad()
        output = model(**inputs, labels=batch["labels"])
        output.loss.backward()
        losses.append(output)
    # The per-example path really ran (not the SDPA fallback).
    assert attention._last is not None and attention._last[2] == [len(e) for e in examples]
    torch.testing.assert_close(losses[1].loss, losses[0].loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(losses[1].logits, losses[0].logits, rtol=0, atol=1e-5)
    for (name, dense), (_, varlen) in zip(
        dense_model.named_parameters(), varlen_model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(varlen.grad, dense.grad, rtol=1e-5, atol=1e-6, msg=name)
    start = 0
    with torch.no_grad():
        for example in examples:
            alone = varlen_model(input_ids=torch.tensor([example.input_ids])).logits[0]
            end = start + len(example)
            torch.testing.assert_close(losses[1].logits[0, start:end], alone, atol=1e-5, rtol=0)
            start = end


def test_padded_batches_and_generation_are_plain_sdpa(models, tokenizer) -> None:
    dense_model, varlen_model = models
    examples = make_examples([9, 4, 13], seed=4)
    from kubetune_trainer.training import to_dataset

    batch = collator("padded")(list(to_dataset(examples)))
    with torch.no_grad():
        dense = dense_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        varlen = varlen_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    torch.testing.assert_close(varlen.logits, dense.logits, rtol=0, atol=0)
    tokenizer.padding_side = "left"
    prompts = tokenizer(["hello there", "a much longer prompt than that"], padding=True)
    prompts = {key: torch.tensor(value) for key, value in prompts.items()}
    for model in (dense_model, varlen_model):
        model.config.use_cache = True
    try:
        generated = [
            model.generate(**prompts, max_new_tokens=6, do_sample=False, pad_token_id=0)
            for model in (dense_model, varlen_model)
        ]
    finally:
        for model in (dense_model, varlen_model):
            model.config.use_cache = False
    assert torch.equal(generated[0], generated[1])
