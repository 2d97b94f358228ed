"""Tokenization, chat templating and the deterministic "model" of the simulator.

Why deterministic: P/D correctness is judged by comparing outputs -- an aggregated worker and a
prefill->decode pair must answer token for token the same.  The simulator's output is therefore a pure
function of (seed, prompt token ids): token ``i`` is picked by hashing the prompt's digest with ``i``.
That stream is the greedy answer; :mod:`pdkit.sim.sampling` builds a distribution around it for
``temperature``/``top_p``/``seed`` and ``logprobs``. The text never contains EOS, so requests end by
``max_tokens`` (finish_reason ``length``) unless a ``stop`` string appears.

Generated tokens are drawn from the tokenizer's whole-word tokens (a leading space marker followed by
lowercase ASCII letters) so that the text reads as words and decoding token by token equals decoding
the whole sequence -- streaming deltas then need no incremental detokenizer.

Prompts are tokenized as vLLM does, by the same code the frontend's KV-aware routing predicts them
with (:mod:`pdkit.prompt_tokens`): completions add the tokenizer's special tokens (BOS); chat renders
the model's chat template and tokenizes the result *without* adding special tokens.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from pdkit.prompt_tokens import PromptError, PromptTokenizer

# The simulator's chat errors are the shared tokenizer's (kept under this name for its callers).
ChatTemplateError = PromptError


class SimTokenizer(PromptTokenizer):
    """The embedded model's tokenizer and chat template (vLLM-equal, :mod:`pdkit.prompt_tokens`) plus
    what the simulated engine needs beyond the prompt: decoding, vocabulary facts, EOS."""

    def __init__(self, model_dir: str | Path) -> None:
        super().__init__(model_dir)
        self.bos_token: str | None = self.special_tokens.get("bos_token")
        self.eos_token: str | None = self.special_tokens.get("eos_token")
        self.eos_token_id = self.tokenizer.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size())

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def token_str(self, token_id: int) -> str:
        """One token as vLLM's logprobs show it (decoded alone, special tokens kept)."""
        return self.decode([token_id], skip_special_tokens=False)

    @cached_property
    def max_chars_per_token(self) -> int:
        """The longest vocabulary entry: vLLM's bound for refusing over-long text before tokenizing it."""
        return max(len(tok) for tok in self.tokenizer.get_vocab())

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a chat request as vLLM computes them (template writes BOS; none added)."""
        return self.chat_ids(messages, add_generation_prompt=add_generation_prompt)

    @cached_property
    def word_token_ids(self) -> list[int]:
        """Whole-word tokens (space marker + lowercase letters, 3+ letters), sorted by id."""
        out = []
        for tok, tid in self.tokenizer.get_vocab().items():
            if (
                tok.startswith("\u0120")
                and len(tok) >= 4
                and tok[1:].isascii()
                and tok[1:].isalpha()
                and tok[1:].islower()
            ):
                out.append(tid)
        if not out:  # a tokenizer without byte-level markers: fall back to every non-special id
            out = [i for i in range(self.vocab_size) if i != self.eos_token_id]
        return sorted(out)


@lru_cache(maxsize=8)
def load_tokenizer(model_dir: str) -> SimTokenizer:
    """One shared (read-only) tokenizer per model folder: loading it is the slowest part of a start."""
    tok = SimTokenizer(model_dir)
    _ = tok.word_token_ids  # computed once here, not on the first request
    _ = tok.max_chars_per_token
    return tok


MAX_CONTINUATION = 32  # longest prompt tail recognised as the model's own answer (see OutputModel.continuation)


class OutputModel:
    """The simulator's "weights": token ``i`` of the answer to ``prompt_ids`` (pure function)."""

    def __init__(self, tokenizer: SimTokenizer, seed: int = 0) -> None:
        self.tokenizer = tokenizer
        self.seed = seed
        self._words = tokenizer.word_token_ids

    def prompt_digest(self, prompt_ids: Sequence[int]) -> bytes:
        h = hashlib.blake2b(digest_size=16, person=b"pdkit-sim")
        h.update(self.seed.to_bytes(8, "little", signed=True))
        h.update(array("q", prompt_ids).tobytes())
        return h.digest()

    def continuation(self, prompt_ids: Sequence[int]) -> tuple[bytes, int]:
        """(digest, index of the first output token): where this prompt sits in the model's answers.

        Why: a real model is a function of the whole token sequence, so a prompt that ends with the
        model's own greedy answer to a shorter prompt (a P/D decode *seeded* with the prefill's first
        token, or a local re-prefill of prompt + tokens already streamed) continues that answer.  The
        simulator's answer is keyed by (prompt digest, position), so such a prompt is recognised here:
        the longest tail of at most :data:`MAX_CONTINUATION` tokens that equals the greedy answer to the
        rest wins; then the answer goes on from that position.  Any other prompt: (its digest, 0).
        One pass over the prompt (the hash states of the last prefixes are copies taken on the way).
        """
        n = len(prompt_ids)
        kmax = max(0, min(MAX_CONTINUATION, n - 1))
        h = hashlib.blake2b(digest_size=16, person=b"pdkit-sim")
        h.update(self.seed.to_bytes(8, "little", signed=True))
        h.update(array("q", prompt_ids[: n - kmax]).tobytes())
        prefixes: list[tuple[int, bytes]] = []
        for j in range(n - kmax, n):
            prefixes.append((j, h.copy().digest()))
            h.update(array("q", [prompt_ids[j]]).tobytes())
        for j, digest in prefixes:  # shortest prefix first = longest continuation
            if all(self.token(digest, i) == prompt_ids[j + i] for i in range(n - j)):
                return digest, n - j
        return h.digest(), 0

    def token(self, digest: bytes, index: int) -> int:
        raw = hashlib.blake2b(digest + index.to_bytes(8, "little"), digest_size=8).digest()
        return self._words[int.from_bytes(raw, "little") % len(self._words)]

    def tokens(self, prompt_ids: Sequence[int], n: int) -> list[int]:
        """The greedy answer's first ``n`` tokens, as the engine produces them."""
        d, start = self.continuation(prompt_ids)
        return [self.token(d, start + i) for i in range(n)]

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])
