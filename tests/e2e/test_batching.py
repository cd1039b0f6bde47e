"""Batched steps on the demo model: the same greedy tokens as one session at a time in one process.

Packing reorders float sums (other matmul shapes, a masked attention over more keys), so batched
hidden states differ from single ones by float32 noise: about 1e-4 in the demo model's logits. Greedy
tokens stay equal while no step has a closer tie between its top two logits. The closest in these
prompts is "Say hello." at its second token (2.5e-4 apart); the in-process test checks that it and
every other step keep their token, and that the noise stays within LOGIT_NOISE.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from coop.launcher import LocalPool
from coop.model.client_part import ClientPart
from coop.model.engine import SpanEngine, StepInput
from coop.pipeline.generation import collect_tokens
from coop.pipeline.heads import head_batcher
from coop.pipeline.local import LocalChain
from coop.pipeline.sampling import SamplingParams

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?",
    "Name a colour.",
    "What is 2+2?",
    "Say hello.",
    "Write a long story about a brave knight and a dragon.",
    "List three fruits.",
    "Who wrote Hamlet?",
    "Translate 'good morning' into French.",
]
MAX_TOKENS = [24, 8, 12, 16, 32, 20, 10, 14]
SPANS = {"batch-a": "0:10", "batch-b": "10:20", "batch-c": "20:30"}
# The most a logit may move when its step runs packed with others (float32 reordering of sums).
LOGIT_NOISE = 1e-3


@pytest.fixture(scope="module")
def pool(demo_model_dir: str) -> Iterator[LocalPool]:
    pool = LocalPool(demo_model_dir)
    try:
        pool.start_dht()
        pool.start_nodes(SPANS)  # at their defaults: batched steps, the CPU weight layout measured by each node
        pool.start_coordinator()
        yield pool
    finally:
        pool.stop()


def test_eight_concurrent_mixed_requests_equal_single_process(
    pool: LocalPool, reference: Callable[[str, int], list[int]]
) -> None:
    def ask(i: int) -> list[int]:
        body = {
            "model": "smollm2-demo",
            "messages": [{"role": "user", "content": QUESTIONS[i]}],
            "temperature": 0,
            "max_tokens": MAX_TOKENS[i],
        }
        response = httpx.post(f"{pool.url}/v1/chat/completions", json=body, timeout=300)
        assert response.status_code == 200, response.text
        return list(response.json()["coop"]["token_ids"])

    for _ in range(2):  # the second round finds the nodes warm and every session active at once
        with ThreadPoolExecutor(max_workers=len(QUESTIONS)) as threads:
            answers = list(threads.map(ask, range(len(QUESTIONS))))
        for i, tokens in enumerate(answers):
            assert tokens == reference(QUESTIONS[i], MAX_TOKENS[i]), QUESTIONS[i]


@pytest.fixture(scope="module")
def engine(demo_model_dir: str, demo_client: ClientPart) -> SpanEngine:
    """The whole demo model as one span, in this process."""
    return SpanEngine.load(demo_model_dir, 0, demo_client.manifest.num_blocks, device="cpu")


def test_no_near_tie_in_the_demo_prompts_can_flip(engine: SpanEngine, demo_client: ClientPart) -> None:
    """Greedy decoding of all prompts in lockstep, packed and single: equal tokens, and margins >> noise."""
    prompts = [demo_client.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    for i, prompt in enumerate(prompts):
        engine.open_session(f"single-{i}", max_length=len(prompt) + MAX_TOKENS[i])
        engine.open_session(f"packed-{i}", max_length=len(prompt) + MAX_TOKENS[i])
    inputs = [torch.tensor([p]) for p in prompts]
    positions = [0] * len(prompts)
    tokens: dict[str, list[list[int]]] = {"single": [[] for _ in prompts], "packed": [[] for _ in prompts]}
    worst_noise, smallest_margin, where = 0.0, float("inf"), ""
    live = set(range(len(prompts)))  # as in a real run, a prompt stops at EOS or at its max_tokens
    while live:
        hidden = {i: demo_client.embed(inputs[i]) for i in sorted(live)}
        packed = engine.step_batch([StepInput(f"packed-{i}", h, positions[i]) for i, h in hidden.items()])
        for (i, h), output in zip(hidden.items(), packed, strict=True):
            single_logits = demo_client.logits(engine.step(f"single-{i}", h, positions[i]))[0, -1]
            assert isinstance(output, torch.Tensor), output
            packed_logits = demo_client.logits(output)[0, -1]
            worst_noise = max(worst_noise, float((packed_logits - single_logits).abs().max()))
            top2 = torch.topk(single_logits, 2).values
            if float(top2[0] - top2[1]) < smallest_margin:
                smallest_margin, where = float(top2[0] - top2[1]), f"{QUESTIONS[i]!r} token {len(tokens['single'][i])}"
            tokens["single"][i].append(int(single_logits.argmax()))
            tokens["packed"][i].append(int(packed_logits.argmax()))
            positions[i] += h.shape[1]
            inputs[i] = torch.tensor([[tokens["single"][i][-1]]])
            if tokens["single"][i][-1] in demo_client.eos_token_ids or len(tokens["single"][i]) == MAX_TOKENS[i]:
                live.discard(i)
    assert tokens["packed"] == tokens["single"]
    assert worst_noise < LOGIT_NOISE
    assert smallest_margin > worst_noise, f"near tie at {where}: {smallest_margin} apart, noise {worst_noise}"


class Lockstep:
    """An in-process batched node: a step runs once every open session has one waiting, all in one engine batch,
    so their heads come back together, as they do from a swarm's last node."""

    def __init__(self, engine: SpanEngine) -> None:
        self.engine = engine
        self.open = 0
        self._waiting: list[tuple[StepInput, asyncio.Future[torch.Tensor]]] = []

    async def step(self, step: StepInput) -> torch.Tensor:
        future: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        self._waiting.append((step, future))
        await self._run_when_all_wait()
        return await future

    async def leave(self) -> None:
        self.open -= 1
        await self._run_when_all_wait()

    async def _run_when_all_wait(self) -> None:
        if not self._waiting or len(self._waiting) < self.open:
            return
        batch, self._waiting = self._waiting, []
        results = await asyncio.to_thread(self.engine.step_batch, [step for step, _ in batch])
        for (_, future), result in zip(batch, results, strict=True):
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)


class LockstepChain(LocalChain):
    def __init__(self, lockstep: Lockstep, *, max_length: int, draft_tokens: int) -> None:
        super().__init__([lockstep.engine], max_length=max_length, draft_tokens=draft_tokens)
        self.lockstep = lockstep
        lockstep.open += 1

    async def step(self, hidden: torch.Tensor, start_position: int, token_ids: Sequence[int] = ()) -> torch.Tensor:
        rewind = start_position < self._stepped
        output = await self.lockstep.step(StepInput(self.session_id, hidden, start_position, rewind))
        self._stepped = start_position + hidden.shape[1]
        return output

    async def close(self) -> None:
        await super().close()
        await self.lockstep.leave()


def test_heads_of_eight_sessions_packed_equal_single_process(
    engine: SpanEngine, demo_client: ClientPart, reference: Callable[[str, int], list[int]]
) -> None:
    """8 concurrent mixed requests (lengths, one-token and multi-token steps) whose steps come back together:
    the coordinator's heads run packed (coop.pipeline.heads), and every session keeps its greedy tokens."""
    heads = head_batcher(demo_client)
    packed_before = heads.rows_packed

    async def ask(lockstep: Lockstep, i: int) -> list[int]:
        prompt = demo_client.encode_chat([{"role": "user", "content": QUESTIONS[i]}])
        chain = LockstepChain(lockstep, max_length=len(prompt) + MAX_TOKENS[i], draft_tokens=4 * (i % 2))
        try:
            return await collect_tokens(demo_client, chain, prompt, SamplingParams(max_tokens=MAX_TOKENS[i]))
        finally:
            await chain.close()

    async def run() -> list[list[int]]:
        lockstep = Lockstep(engine)
        return list(await asyncio.gather(*(ask(lockstep, i) for i in range(len(QUESTIONS)))))

    answers = asyncio.run(run())
    for i, tokens in enumerate(answers):
        assert tokens == reference(QUESTIONS[i], MAX_TOKENS[i]), QUESTIONS[i]
    assert heads.rows_packed > packed_before
