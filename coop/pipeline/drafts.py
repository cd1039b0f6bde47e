"""Prompt-lookup drafts for multi-token steps: guess the next tokens from the session's own tokens.

Through a swarm a step of five tokens costs about one pipeline round trip, as a step of one does, so
every draft token that greedy decoding agrees with saves a round trip. Drafts need no second model:
when the session's last few tokens occurred before, the tokens that followed them then are proposed
(text that repeats, quotes or rewrites its prompt is made of such runs).

How many tokens to propose adapts to how the last proposals fared (as transformers' assisted
generation does): two more after a proposal accepted whole, one fewer after a rejection. A rejected
draft token still costs its compute on every node, so text that does not repeat soon proposes one
token at a time, and after a single draft token is rejected it proposes none for PAUSE_STEPS steps.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_NGRAM = 3  # the longest suffix looked up; longer matches are tried first
MIN_NGRAM = 2  # a single repeated token predicts too little to be worth a draft
PAUSE_STEPS = 4  # one-token steps after a rejected one-token draft


class NgramDrafter:
    """Proposes up to `max_tokens` draft tokens per step, fewer while proposals are being rejected."""

    def __init__(self, max_tokens: int, *, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> None:
        if max_tokens < 1 or not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need max_tokens >= 1 and 1 <= min_ngram <= max_ngram, got {max_tokens=}")
        self.max_tokens = max_tokens
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.size = max_tokens  # how many to propose next time
        self.paused = 0  # steps left without drafts
        self.proposed = 0  # totals over the session, for benchmarks and logs
        self.accepted = 0

    def propose(self, tokens: Sequence[int], limit: int) -> list[int]:
        """At most min(size, limit) tokens that followed the latest earlier occurrence of the longest
        suffix of `tokens` (MAX_NGRAM down to MIN_NGRAM tokens long); [] when there is none."""
        count = min(self.size, limit)
        if self.paused > 0:
            self.paused -= 1
            return []
        if count < 1:
            return []
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            suffix = list(tokens[-n:])
            for start in range(len(tokens) - n - 1, -1, -1):
                if list(tokens[start : start + n]) == suffix:
                    return list(tokens[start + n : start + n + count])
        return []

    def update(self, proposed: int, accepted: int) -> None:
        """Record how many of the `proposed` draft tokens greedy decoding agreed with."""
        self.proposed += proposed
        self.accepted += accepted
        if accepted == proposed:
            self.size = min(self.size + 2, self.max_tokens)
        elif accepted == 0 and proposed == 1:
            self.paused = PAUSE_STEPS
        else:
            self.size = max(self.size - 1, 1)
