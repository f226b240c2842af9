"""Variable-length attention over PyTorch's SDPA, for padding-free batches.

A padding-free micro-batch is one row of concatenated examples whose
`position_ids` restart at 0 for each example. flash-attention's varlen kernel
attends within each example only; without it (CPUs, GPUs without flash-attn)
transformers gives SDPA a dense block-diagonal mask over the whole row, so
every one of the row's n² scores is computed and most are thrown away. This
attention splits the row at the restarts and runs causal SDPA per example:
the work falls from n² to the sum of the examples' squared lengths (about 4x
less attention time on a row of 8 examples of similar length on a CPU).

No library offers this for SDPA: transformers has varlen paths for
flash-attention and a block mask for flex-attention (which needs a compiler on
CPUs). It plugs into transformers' own extension points (AttentionInterface
and AttentionMaskInterface) under the name `sdpa_varlen`; anything that is not
a single packed row (padding masks, caches, sliding windows, generation) is
handed to transformers' SDPA attention unchanged.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "sdpa_varlen"

# The last row's segmentation: every layer of one forward pass sees the same
# position_ids and mask tensors, so they are checked once per forward, not per layer.
_last: tuple[torch.Tensor, torch.Tensor | None, list[int] | None] | None = None


def segment_lengths(position_ids: torch.Tensor) -> list[int]:
    """Lengths of the examples in one packed row: a new example starts wherever the
    position does not follow on from the one before."""
    row = position_ids.reshape(-1)
    starts = torch.nonzero(row[1:] != row[:-1] + 1).reshape(-1) + 1
    bounds = [0, *starts.tolist(), row.numel()]
    return [end - start for start, end in itertools.pairwise(bounds)]


def is_block_causal(mask: torch.Tensor, lengths: list[int]) -> bool:
    """Whether a (1, 1, n, n) boolean mask is exactly the packed row's: causal within each
    example, nothing across. Checked without building a second n x n mask: each diagonal
    block is lower-triangular and those blocks hold every allowed pair."""
    square = mask.reshape(mask.shape[-2], mask.shape[-1])
    start = 0
    for length in lengths:
        block = square[start : start + length, start : start + length]
        if not torch.equal(block, torch.ones_like(block).tril()):
            return False
        start += length
    allowed = sum(length * (length + 1) // 2 for length in lengths)
    return int(torch.count_nonzero(square)) == allowed


def _packed_lengths(query, key, mask, position_ids) -> list[int] | None:
    """The examples' lengths when this call is one packed row that can be split, else None."""
    global _last
    if position_ids is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return None
    if _last is not None and _last[0] is position_ids and _last[1] is mask:
        return _last[2]
    n = query.shape[2]
    lengths = segment_lengths(position_ids)
    # Split only when there are several examples and the mask is exactly the packed
    # row's: any other pattern (padding, windows, bidirectional overlays), or no mask
    # (transformers saw no restarts to isolate), stays with SDPA.
    packed_row_mask = (
        mask is not None
        and mask.dtype == torch.bool
        and mask.shape[:2] == (1, 1)
        and mask.shape[-2:] == (n, n)
    )
    found = (
        lengths if len(lengths) > 1 and packed_row_mask and is_block_causal(mask, lengths) else None
    )
    _last = (position_ids, mask, found)
    return found


def sdpa_varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    special = any(kwargs.get(name) is not None for name in ("sliding_window", "softcap"))
    lengths = (
        None
        if not causal or special or kwargs.get("position_bias") is not None
        else _packed_lengths(query, key, attention_mask, kwargs.get("position_ids"))
    )
    if lengths is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
    gqa = query.shape[1] != key.shape[1]
    outputs = [
        F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa
        )
        for q, k, v in zip(
            query.split(lengths, dim=2),
            key.split(lengths, dim=2),
            value.split(lengths, dim=2),
            strict=True,
        )
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def register() -> str:
    """Make `attn_implementation="sdpa_varlen"` loadable; idempotent. Returns the name."""
    AttentionInterface.register(NAME, sdpa_varlen_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
