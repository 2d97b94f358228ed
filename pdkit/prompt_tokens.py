"""The prompt token ids a vLLM 0.26.0 worker computes for an OpenAI request, without importing vLLM.

Why: KV-aware routing hashes the prompt's blocks exactly as the worker will; one token of difference
in the first block changes every hash of the chain.  vLLM's path (``vllm/renderers/hf.py`` and
``transformers``' ``apply_chat_template``), reproduced here:

* ``/v1/completions``: a string prompt is tokenized with ``add_special_tokens`` (request field, default
  True), so the tokenizer's post-processor adds BOS (the embedded model's ``TemplateProcessing`` puts
  ``<s>`` first); a list of ids is used as is.
* ``/v1/chat/completions``: messages are normalised to vLLM's "string" content format (text parts
  joined by ``"\\n"``; keys whose value is None dropped, as transformers does), the model's
  ``chat_template`` from ``tokenizer_config.json`` is rendered in an immutable jinja2 sandbox with
  ``trim_blocks`` / ``lstrip_blocks`` and the ``loopcontrols`` extension, the template variables are the
  special tokens (``bos_token``, ``eos_token``, ...), ``add_generation_prompt`` (request field, default
  True), ``continue_final_message``, ``tools``, ``documents`` and the request's
  ``chat_template_kwargs``; the text is tokenized *without* special tokens (the template writes BOS
  itself).  The request's ``add_special_tokens`` has no effect on chat in vLLM 0.26.0: the renderer
  tokenizes inside ``apply_chat_template`` and hands token ids on, which are not tokenized again
  (checked against vLLM's renderer in the tests).

Not reproduced (the request then still routes, only less precisely): templates that iterate over
content parts ("openai" content format), non-text content, the ``developer`` -> ``system`` role
rewrite, ``truncate_prompt_tokens``, a per-request ``chat_template``.  ``tests/test_prompt_tokens.py``
compares with vLLM's own renderer on CPU.

One module for both sides: the frontend predicts the ids (KV-aware routing) and the simulator
(:class:`pdkit.sim.text.SimTokenizer`, a subclass) computes them, so a prediction and the simulated
engine's cache can only differ where vLLM itself would.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class PromptError(ValueError):
    """The request's prompt cannot be turned into token ids here (the router then skips KV scoring)."""


class PromptTokenizer:
    """Tokenizer + chat template of one model folder (``tokenizer.json``, ``tokenizer_config.json``)."""

    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        if not (model_dir / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{model_dir} has no tokenizer.json (KV-aware routing needs the model's tokenizer)")
        self.model_dir = model_dir
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        cfg_path = model_dir / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        template = self.config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        self.chat_template: str | None = template if isinstance(template, str) else None
        self.special_tokens: dict[str, Any] = {}
        for key in _SPECIAL_KEYS:
            value = self.config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                self.special_tokens[key] = value
        extra = self.config.get("additional_special_tokens")
        if isinstance(extra, list) and extra:
            self.special_tokens["additional_special_tokens"] = [
                t.get("content") if isinstance(t, dict) else t for t in extra
            ]

    # -- completions -----------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch, not encode: the same ids, but the Rust side releases the GIL, so a prompt
        # tokenized in a worker thread (KvAwarePolicy.prepare) leaves the frontend's event loop free.
        return list(self.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids)

    def completion_ids(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        if isinstance(prompt, str):
            return self.encode(prompt, add_special_tokens)
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise PromptError("prompt must be one string or one list of token ids")

    # -- chat ------------------------------------------------------------------------------------

    @cached_property
    def _template(self) -> Any:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if not self.chat_template:
            raise PromptError("the model has no chat template")

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
                   sort_keys: bool = False) -> str:  # fmt: skip
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.chat_template)

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """The prompt text of a chat request, as ``apply_chat_template(tokenize=False)`` renders it."""
        import jinja2

        if not isinstance(messages, list) or not messages:
            raise PromptError("messages must be a non-empty list")
        chat = [_normalize(m) for m in messages]
        if continue_final_message:
            if add_generation_prompt:
                raise PromptError("continue_final_message and add_generation_prompt exclude each other")
            final = chat[-1].get("content")
            if not isinstance(final, str):
                raise PromptError("continue_final_message needs a final message with text content")
            chat[-1]["content"] = final + _CONTINUE_TAG
        kwargs = {k: v for k, v in (chat_template_kwargs or {}).items() if k not in ("chat_template", "tokenize")}
        variables = {**self.special_tokens, **kwargs}
        try:
            text = str(
                self._template.render(
                    messages=chat,
                    tools=tools,
                    documents=documents,
                    add_generation_prompt=add_generation_prompt,
                    **variables,
                )
            )
        except jinja2.TemplateError as exc:
            raise PromptError(f"chat template failed: {exc}") from exc
        if continue_final_message:
            loc = text.rfind(_CONTINUE_TAG.strip())
            if loc < 0:
                raise PromptError("the chat template dropped the final message")
            text = text[:loc] if text[loc : loc + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:loc].rstrip()
        return text

    def chat_ids(self, messages: list[dict[str, Any]], **kw: Any) -> list[int]:
        return self.encode(self.render_chat(messages, **kw), add_special_tokens=False)

    # -- requests --------------------------------------------------------------------------------

    def request_ids(self, body: dict[str, Any], chat: bool) -> list[int]:
        """Token ids of an OpenAI request body (``chat``: a ``/v1/chat/completions`` body)."""
        if chat:
            kwargs = body.get("chat_template_kwargs") or {}
            if not isinstance(kwargs, dict):
                raise PromptError("chat_template_kwargs must be an object")
            if body.get("chat_template"):
                raise PromptError("a per-request chat_template is not reproduced")
            return self.chat_ids(
                body.get("messages"),  # type: ignore[arg-type]
                add_generation_prompt=bool(body.get("add_generation_prompt", True)),
                continue_final_message=bool(body.get("continue_final_message", False)),
                tools=body.get("tools"),
                documents=body.get("documents"),
                chat_template_kwargs=kwargs,
            )
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        return self.completion_ids(prompt, bool(body.get("add_special_tokens", True)))  # type: ignore[arg-type]


@lru_cache(maxsize=8)
def load_prompt_tokenizer(model_dir: str) -> PromptTokenizer:
    """One shared tokenizer per model folder (loading a 2 MB tokenizer.json takes ~100 ms)."""
    return PromptTokenizer(model_dir)


def _normalize(message: Any) -> dict[str, Any]:
    """vLLM's "string" content format plus transformers' None-dropping."""
    if not isinstance(message, dict) or "role" not in message:
        raise PromptError("each message must be an object with a 'role'")
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise PromptError("only text content parts are reproduced")
        content = "\n".join(texts)
    elif content is not None and not isinstance(content, str):
        # vLLM's request model takes a string, a list of parts or null; anything else is its 400.
        raise PromptError("message content must be a string or a list of text parts")
    out = {k: v for k, v in message.items() if v is not None and k != "content"}
    if content is not None:
        out["content"] = content
    return out
