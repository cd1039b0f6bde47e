"""The coordinator's batched heads: packed rows give each session the tokens an unbatched head gives it."""

from __future__ import annotations

import asyncio

import pytest
import torch

from coop.model.client_part import ClientPart
from coop.pipeline.heads import HeadBatcher, HeadRequest, head_batcher
from coop.pipeline.sampling import SamplingParams, make_generator, sample_token

HIDDEN = 64
GREEDY = SamplingParams(max_tokens=8)
SAMPLED = SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=7)


@pytest.fixture(scope="module")
def client(tiny_llama_dir: str) -> ClientPart:
    return ClientPart.load(tiny_llama_dir, device="cpu")


def _hidden(n: int, seed: int) -> torch.Tensor:
    return torch.randn(1, n, HIDDEN, generator=torch.Generator().manual_seed(seed))


def _unbatched(client: ClientPart, hidden: torch.Tensor, drafts: list[int]) -> list[int]:
    """What generation kept before heads were batched: one head call per step."""
    if not drafts:
        return [int(client.logits(hidden)[0, -1].argmax())]
    predicted = client.logits(hidden, last_only=False)[0].argmax(dim=-1).tolist()
    kept: list[int] = []
    for draft, guess in zip(drafts, predicted, strict=False):
        if draft != guess:
            break
        kept.append(draft)
    return [*kept, predicted[len(kept)]]


def test_packed_greedy_rows_keep_the_unbatched_tokens(client: ClientPart) -> None:
    """Decode rows, a prompt, and steps with drafts (one agreeing with the argmax) in one packed call."""
    hiddens = [_hidden(1, 0), _hidden(9, 1), _hidden(1, 2), _hidden(3, 3), _hidden(1, 4), _hidden(4, 5)]
    agreeing = _unbatched(client, hiddens[3], [0, 0])[:1]  # the first draft the model agrees with
    drafts: list[list[int]] = [[], [], [], [agreeing[0], 5], [], [1, 2, 3]]
    batcher = HeadBatcher(client)
    batch = [HeadRequest(h, d, GREEDY, None) for h, d in zip(hiddens, drafts, strict=True)]
    kept = batcher.run_batch(client, batch)
    assert kept == [_unbatched(client, h, d) for h, d in zip(hiddens, drafts, strict=True)]
    assert len(kept[3]) >= 2  # the agreeing draft was kept, then the model's own next token
    assert batcher.rows_packed == len(batch)


def test_sampled_rows_keep_their_own_parameters_and_generators(client: ClientPart) -> None:
    hiddens = [_hidden(1, 10 + i) for i in range(4)]
    generators = [make_generator(SAMPLED) for _ in range(3)]
    batch = [HeadRequest(h, [], SAMPLED, g) for h, g in zip(hiddens, generators, strict=False)]
    batch.append(HeadRequest(hiddens[3], [], GREEDY, None))
    kept = HeadBatcher(client).run_batch(client, batch)
    # each sampled row drew from its own generator: replaying a fresh one with the same seed gives its token
    for request, tokens in zip(batch[:3], kept, strict=False):
        logits = client.logits_at(request.hidden, [0])[0]
        assert tokens == [sample_token(logits, SAMPLED, make_generator(SAMPLED))]
    assert kept[3] == _unbatched(client, hiddens[3], [])


def test_greedy_rows_at_a_near_tie_are_computed_again_alone(tiny_llama_dir: str) -> None:
    tied = ClientPart.load(tiny_llama_dir, device="cpu")
    head = tied.model.get_output_embeddings()
    zero = torch.nn.Linear(head.in_features, head.out_features, bias=False)
    torch.nn.init.zeros_(zero.weight)
    tied.model.set_output_embeddings(zero)  # every logit 0: every greedy row is a tie
    batcher = HeadBatcher(tied)
    batch = [HeadRequest(_hidden(1, i), [], GREEDY, None) for i in range(4)]
    batch.append(HeadRequest(_hidden(1, 9), [], SAMPLED, make_generator(SAMPLED)))
    kept = batcher.run_batch(tied, batch)
    assert kept[:4] == [[0]] * 4
    assert batcher.rows_recomputed == 4  # the greedy rows, not the sampled one


def test_a_dense_cpu_head_runs_few_rows_one_by_one(tiny_llama_dir: str) -> None:
    """A packed head batches from 2 rows; one left dense (repacked on each call) only from 4."""
    client = ClientPart.load(tiny_llama_dir, device="cpu", weight_layout="packed")
    assert HeadBatcher(client).min_packed_rows == 2
    packed = client.model.get_output_embeddings()
    dense = torch.nn.Linear(packed.in_features, packed.out_features, bias=False)
    dense.weight = client.model.get_input_embeddings().weight  # the tied weights, unpacked
    client.model.set_output_embeddings(dense)
    batcher = HeadBatcher(client)
    assert batcher.min_packed_rows == 4
    batch = [HeadRequest(_hidden(1, i), [], GREEDY, None) for i in range(batcher.min_packed_rows - 1)]
    assert batcher.run_batch(client, batch) == [_unbatched(client, r.hidden, []) for r in batch]
    assert batcher.rows_packed == 0


def test_concurrent_sessions_share_the_client_parts_batcher(client: ClientPart) -> None:
    hiddens = [_hidden(1 + i % 3, 20 + i) for i in range(8)]

    async def run() -> list[list[int]]:
        heads = head_batcher(client)
        return list(await asyncio.gather(*(heads.kept_tokens(h, [], GREEDY, None) for h in hiddens)))

    assert asyncio.run(run()) == [_unbatched(client, h, []) for h in hiddens]
    assert head_batcher(client) is head_batcher(client)
    assert head_batcher(client).batches_run <= len(hiddens)
