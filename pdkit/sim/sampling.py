"""The simulator's next-token distribution, seeded sampling and logprobs.

Why a distribution at all: clients (evaluation harnesses, agents) read ``logprobs`` and send
``temperature``/``top_p``/``seed``; a sim that ignores them answers a different API than vLLM. The
distribution is still a pure function so that P/D stays exact: at output position ``i`` of a prompt
the candidates are :data:`NUM_CANDIDATES` word tokens drawn by hashing the prompt digest with ``i``;
candidate 0 is :meth:`OutputModel.token` -- today's greedy token, so greedy output does not change.
Logits fall by hashed gaps; the candidates share 99 % of the probability mass and the rest of the
vocabulary shares 1 % evenly. The distribution does not depend on earlier *sampled* tokens (a real
model's does): sampling changes which token is picked at each position, not what is offered.

Sampling follows vLLM's rules: ``temperature < 1e-5`` is greedy; otherwise the logits are divided by
the temperature, cut to ``top_k`` and then to the smallest ``top_p`` nucleus, and one token is drawn
with a counter-based generator keyed by (request seed, prompt digest, position) -- so a seeded request
answers the same on an aggregated worker and on a prefill->decode pair, and an unseeded one draws a
fresh random seed. ``n > 1`` gives choice ``j`` the seed ``seed + j`` (vLLM's parallel sampling).
Reported logprobs are the raw distribution's (vLLM's default ``logprobs_mode``), whatever the
temperature.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

from pdkit.sim.text import OutputModel

NUM_CANDIDATES = 20  # = vLLM's default max_logprobs, so any allowed top-k is covered
CANDIDATE_MASS = 0.99
SAMPLING_EPS = 1e-5  # vLLM's _SAMPLING_EPS: below it a temperature means greedy

# one logprob entry: (token id, logprob, rank) in vLLM's order: the chosen token first, then top-k
LogprobEntry = tuple[int, float, int]


@dataclass(frozen=True)
class SamplingSpec:
    """What one sequence asks of the sampler (already validated by the HTTP layer)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    num_logprobs: int | None = None  # None: no logprobs; k: the chosen token plus the top k

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @staticmethod
    def random_seed() -> int:
        """The seed of a request that sent none (vLLM draws one per request too)."""
        return secrets.randbits(63)


class TokenSampler:
    """Candidates, sampling and logprobs on top of one :class:`OutputModel`."""

    def __init__(self, model: OutputModel) -> None:
        self.model = model
        self._words = model.tokenizer.word_token_ids
        vocab = model.tokenizer.vocab_size
        self._tail_logprob = math.log((1 - CANDIDATE_MASS) / max(1, vocab - NUM_CANDIDATES))
        self._vocab = vocab

    # ------------------------------------------------------------------------------ distribution
    def _candidates_from(self, first: int, key: bytes) -> list[tuple[int, float]]:
        """(token id, logprob) sorted by falling logprob; ``first`` is rank 1."""
        raw = hashlib.shake_128(key).digest(10 * (NUM_CANDIDATES - 1))
        tokens = [first]
        logits = [0.0]
        for r in range(NUM_CANDIDATES - 1):
            chunk = raw[10 * r : 10 * r + 10]
            tok = self._words[int.from_bytes(chunk[:8], "little") % len(self._words)]
            gap = 0.05 + 1.5 * int.from_bytes(chunk[8:], "little") / 65535
            if tok in tokens:
                continue
            tokens.append(tok)
            logits.append(logits[-1] - gap)
        top = max(logits)
        norm = top + math.log(sum(math.exp(x - top) for x in logits))
        mass = math.log(CANDIDATE_MASS)
        return [(t, mass + x - norm) for t, x in zip(tokens, logits, strict=True)]

    def candidates(self, digest: bytes, index: int) -> list[tuple[int, float]]:
        """The distribution at output position ``index`` of the prompt with ``digest``."""
        first = self.model.token(digest, index)
        return self._candidates_from(first, b"cand" + digest + index.to_bytes(8, "little"))

    # ---------------------------------------------------------------------------------- sampling
    def next_token(self, digest: bytes, index: int, spec: SamplingSpec) -> tuple[int, list[LogprobEntry] | None]:
        """The token at output position ``index`` and, when asked for, its logprob entries."""
        if spec.greedy and spec.num_logprobs is None:
            return self.model.token(digest, index), None
        cands = self.candidates(digest, index)
        if spec.greedy:
            pick = 0
        else:
            pick = self._draw(cands, digest, index, spec)
        entries = None
        if spec.num_logprobs is not None:
            entries = self._entries(cands[pick][0], cands[pick][1], pick + 1, cands, spec.num_logprobs)
        return cands[pick][0], entries

    def _draw(self, cands: list[tuple[int, float]], digest: bytes, index: int, spec: SamplingSpec) -> int:
        scaled = [lp / spec.temperature for _, lp in cands]
        if spec.top_k > 0:
            scaled = scaled[: spec.top_k]
        top = scaled[0]
        weights = [math.exp(x - top) for x in scaled]
        total = sum(weights)
        if spec.top_p < 1.0:
            kept, acc = [], 0.0
            for w in weights:
                kept.append(w)
                acc += w / total
                if acc >= spec.top_p:
                    break
            weights, total = kept, sum(kept)
        key = b"draw" + spec.seed.to_bytes(8, "little", signed=True) + digest + index.to_bytes(8, "little")
        u = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") / 2**64 * total
        for i, w in enumerate(weights):
            u -= w
            if u < 0:
                return i
        return len(weights) - 1

    def _entries(
        self, token: int, logprob: float, rank: int, cands: list[tuple[int, float]], k: int
    ) -> list[LogprobEntry]:
        """vLLM's per-position dict as a list: the chosen token first, then ranks 1..k (no duplicates)."""
        out: list[LogprobEntry] = [(token, logprob, rank)]
        for r, (tok, lp) in enumerate(cands[:k]):
            if tok != token:
                out.append((tok, lp, r + 1))
        return out

    # ---------------------------------------------------------------------------- prompt logprobs
    def prompt_logprobs(self, prompt_ids: Sequence[int], k: int) -> list[list[LogprobEntry] | None]:
        """Logprobs of each prompt token given the tokens before it (position 0 has none, as in vLLM).

        The distribution at prompt position ``j`` comes from a digest rolled over ``prompt_ids[:j]``
        (so a prompt's logprobs do not depend on what follows it).
        """
        out: list[list[LogprobEntry] | None] = [None]
        state = hashlib.blake2b(self.model.seed.to_bytes(8, "little", signed=True), digest_size=16).digest()
        for j in range(1, len(prompt_ids)):
            state = hashlib.blake2b(state + array("q", [prompt_ids[j - 1]]).tobytes(), digest_size=16).digest()
            first = self._words[int.from_bytes(state[:8], "little") % len(self._words)]
            cands = self._candidates_from(first, b"prompt" + state)
            actual = prompt_ids[j]
            for r, (tok, lp) in enumerate(cands):
                if tok == actual:
                    entry = (actual, lp, r + 1)
                    break
            else:
                spread = int.from_bytes(state[8:], "little") % max(1, self._vocab - len(cands))
                entry = (actual, self._tail_logprob, len(cands) + 1 + spread)
            out.append(self._entries(entry[0], entry[1], entry[2], cands, k))
        return out
