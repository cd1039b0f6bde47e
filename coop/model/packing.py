"""Packed batches: the steps of several sessions run as one sequence through the unchanged model.

The tokens of all steps sit side by side in one sequence (batch size 1, as transformers' continuous
batching does), each at its own session's position. A 4D mask lets every token attend only to its
own session's cache and to the earlier tokens of its own step, and `PackedCaches` routes each
session's keys and values to and from its own `DynamicCache`. `coop.model.engine.SpanEngine.step_batch`
runs them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache


def full_attention_only(config: object) -> bool:
    """Whether every layer attends to the whole past: packed batches build a full causal mask, so models
    with sliding-window layers run their steps one at a time."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None:
        return all(t == "full_attention" for t in layer_types)
    return getattr(text, "sliding_window", None) is None


def packed_attention_mask(
    counts: Sequence[int],
    past: Sequence[int],
    *,
    attn_implementation: str,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """The 4D mask [1, 1, total_q, total_k] of a pack whose steps bring `counts` tokens to caches of
    `past` tokens, in the format of the model's attention function (sdpa: booleans; eager: additive)."""
    total_q, total_k = sum(counts), sum(past) + sum(counts)
    mask = torch.zeros(1, 1, total_q, total_k, dtype=torch.bool, device=device)  # True: may attend
    q0 = k0 = 0
    for n, length in zip(counts, past, strict=True):
        mask[0, 0, q0 : q0 + n, k0 : k0 + length + n] = torch.ones(n, length + n, dtype=torch.bool, device=device).tril(
            diagonal=length
        )
        q0, k0 = q0 + n, k0 + length + n
    if attn_implementation == "eager":  # eager adds its mask to the scores
        return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


def packed_positions(starts: Sequence[int], counts: Sequence[int], device: torch.device) -> torch.Tensor:
    """Position ids [1, total_q]: each step's tokens at its own session's positions."""
    return torch.cat([torch.arange(p, p + n, device=device) for p, n in zip(starts, counts, strict=True)]).unsqueeze(0)


class PackedCaches:
    """The cache of a packed batch: the keys and values of each session's tokens go to its own DynamicCache.

    Attention layers call `update` with the new keys and values of the whole pack [1, heads, total_q, dim];
    it returns every session's cached and new keys side by side [1, heads, total_k, dim], the layout the
    batch's 4D mask is built for.
    """

    def __init__(self, caches: list[DynamicCache], counts: list[int]) -> None:
        self._caches = caches
        self._counts = counts
        self.quarantined: dict[int, int] = {}  # index of a session whose keys or values went non-finite -> block

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = [], []
        pairs = zip(key_states.split(self._counts, dim=2), value_states.split(self._counts, dim=2), strict=True)
        for cache, (k, v) in zip(self._caches, pairs, strict=True):
            full_k, full_v = cache.update(k, v, layer_idx)
            keys.append(full_k)
            values.append(full_v)
        packed_k, packed_v = torch.cat(keys, dim=2), torch.cat(values, dim=2)
        if bool(torch.isfinite(packed_k).all()) and bool(torch.isfinite(packed_v).all()):
            return packed_k, packed_v
        # A masked-out key still meets every query (NaN * 0 is NaN): a session whose states overflowed
        # would poison the rows of the others. Its keys and values are zeroed for this pass, and it fails.
        for index, (k, v) in enumerate(zip(keys, values, strict=True)):
            if not (bool(torch.isfinite(k).all()) and bool(torch.isfinite(v).all())):
                self.quarantined.setdefault(index, layer_idx)
                keys[index], values[index] = torch.zeros_like(k), torch.zeros_like(v)
        return torch.cat(keys, dim=2), torch.cat(values, dim=2)
