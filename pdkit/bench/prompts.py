"""Prompts of exact token lengths, built with the served model's tokenizer.

Why exact: the benchmark compares deployments at fixed input/output shapes (8k/256, 2k/512); a prompt
that is 3% longer on one run skews TTFT and KV-transfer sizes.  Prompts are sequences of random
whole-word tokens (``" word"``): a byte-level BPE tokenizer splits text on word boundaries before merging,
so a sequence of such words encodes back to exactly those tokens.  Every candidate is still measured
with the real tokenizer -- as vLLM will tokenize it (BOS for completions, chat template for chat) -- and
corrected word by word, so a tokenizer that breaks the assumption costs a few iterations, not accuracy.

Random words per request keep requests from sharing prefixes unless a workload wants them to.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any


def resolve_tokenizer_dir(path: str | Path | None) -> Path:
    """A model folder holding ``tokenizer.json`` (a path to the file itself is accepted too)."""
    if path is None:
        from pdkit.model_files import default_model_dir

        return default_model_dir()
    p = Path(path)
    if p.is_file():
        p = p.parent
    if not (p / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{p} has no tokenizer.json (give --tokenizer a model folder or tokenizer.json)")
    return p


class PromptFactory:
    """Builds completion prompts and chat message lists of an exact prompt-token length."""

    def __init__(self, tokenizer_dir: str | Path | None = None, seed: int = 0) -> None:
        from pdkit.sim.text import SimTokenizer  # the vLLM-equal tokenize/render logic lives there

        self.dir = resolve_tokenizer_dir(tokenizer_dir)
        self.tok = SimTokenizer(self.dir)
        self.rng = random.Random(seed)

    @cached_property
    def words(self) -> list[int]:
        """Whole-word token ids that encode back to themselves when decoded alone."""
        out = []
        for tid in self.tok.word_token_ids:
            text = self.tok.decode([tid])
            if self.tok.encode(text, add_special_tokens=False) == [tid]:
                out.append(tid)
        if len(out) < 100:
            raise ValueError(f"tokenizer {self.dir} has too few whole-word tokens to build prompts")
        return out

    def random_text(self, n_tokens: int) -> str:
        """About ``n_tokens`` tokens of random words (exact for byte-level BPE tokenizers)."""
        if n_tokens <= 0:
            return ""
        return self.tok.decode([self.rng.choice(self.words) for _ in range(n_tokens)])

    def completion_len(self, text: str) -> int:
        return len(self.tok.encode(text, add_special_tokens=True))

    def chat_len(self, messages: list[dict[str, Any]]) -> int:
        return len(self.tok.encode_chat(messages))

    def _fit(self, target: int, build: Callable[[str], int], base_words: int) -> str:
        """Random words such that ``build(text)`` (the full prompt length) equals ``target``."""
        words = [self.rng.choice(self.words) for _ in range(max(base_words, 0))]
        for _ in range(64):
            text = self.tok.decode(words)
            diff = target - build(text)
            if diff == 0:
                return text
            if diff > 0:
                words.extend(self.rng.choice(self.words) for _ in range(diff))
            else:
                if not words:
                    break
                del words[diff:]
        raise ValueError(f"cannot build a prompt of exactly {target} tokens with {self.dir}")

    def completion_prompt(self, n_tokens: int, prefix: str = "") -> str:
        """Prompt text of exactly ``n_tokens`` tokens as vLLM counts them (BOS included), after ``prefix``."""
        fixed = self.completion_len(prefix) if prefix else self.completion_len("")
        if n_tokens < fixed:
            raise ValueError(f"input length {n_tokens} is shorter than the fixed part ({fixed} tokens)")
        tail = self._fit(n_tokens, lambda t: self.completion_len(prefix + t), n_tokens - fixed)
        return prefix + tail

    def chat_user_message(
        self, n_tokens: int, history: list[dict[str, Any]] | None = None, prefix: str = ""
    ) -> dict[str, str]:
        """A user message (starting with ``prefix``) making the templated chat prompt ``n_tokens`` long."""
        history = list(history or [])
        head = prefix.lstrip()

        def content(t: str) -> str:
            return head + t if head else t.lstrip()

        fixed = self.chat_len([*history, {"role": "user", "content": head}])
        if n_tokens < fixed:
            raise ValueError(f"prompt length {n_tokens} is shorter than the fixed part ({fixed} tokens)")
        text = self._fit(
            n_tokens, lambda t: self.chat_len([*history, {"role": "user", "content": content(t)}]), n_tokens - fixed
        )
        return {"role": "user", "content": content(text)}
