"""Prompt token ids: equal to the simulator's tokenization and to vLLM 0.26.0's own renderer (CPU)."""

from __future__ import annotations

from typing import Any

import pytest

from pdkit.model_files import default_model_dir
from pdkit.prompt_tokens import PromptError, PromptTokenizer
from pdkit.sim.text import SimTokenizer

MODEL = default_model_dir()

CHATS: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": "hello there"}]},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "why is the sky blue?"}]},
    {
        "messages": [
            {"role": "system", "content": "you are a router test"},
            {"role": "user", "content": [{"type": "text", "text": "two"}, {"type": "text", "text": "parts"}]},
            {"role": "assistant", "content": "ok, noted"},
            {"role": "user", "content": "and now?  spaces\n\nnewlines, ünïcode <s> inside"},
        ]
    },
    {"messages": [{"role": "user", "content": "no generation prompt"}], "add_generation_prompt": False},
    {"messages": [{"role": "user", "content": "with BOS on top"}], "add_special_tokens": True},
    {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}],
        "add_generation_prompt": False,
        "continue_final_message": True,
    },  # fmt: skip
]
PROMPTS = ["plain prompt", "  leading spaces and <s> special", "ünïcode — dashes", "x" * 300, ""]


@pytest.fixture(scope="module")
def tok() -> PromptTokenizer:
    return PromptTokenizer(MODEL)


def test_bos_comes_from_the_post_processor_for_completions_and_from_the_template_for_chat(
    tok: PromptTokenizer,
) -> None:
    bos = tok.tokenizer.token_to_id("<s>")
    ids = tok.request_ids({"prompt": "hello"}, chat=False)
    assert ids[0] == bos and ids.count(bos) == 1
    assert tok.request_ids({"prompt": "hello", "add_special_tokens": False}, chat=False) == ids[1:]
    chat = tok.request_ids({"messages": [{"role": "user", "content": "hello"}]}, chat=True)
    assert chat[0] == bos and chat[1] != bos  # the template writes BOS; none is added on top
    assert tok.request_ids({"prompt": [5, 6, 7]}, chat=False) == [5, 6, 7]
    assert tok.request_ids({"prompt": ["hello"]}, chat=False) == ids


@pytest.mark.parametrize("body", CHATS)
def test_chat_equals_simulator(tok: PromptTokenizer, body: dict[str, Any]) -> None:
    sim = SimTokenizer(MODEL)
    if body.get("add_special_tokens"):
        pytest.skip("the simulator adds BOS here, vLLM 0.26.0 does not (test_chat_equals_vllm_renderer)")
    text = sim.render_chat(
        body["messages"],
        body.get("add_generation_prompt", True),
        continue_final_message=bool(body.get("continue_final_message", False)),
        tools=body.get("tools"),
        documents=body.get("documents"),
        chat_template_kwargs=body.get("chat_template_kwargs"),
    )
    expected = sim.encode(text, add_special_tokens=False)
    assert tok.request_ids(body, chat=True) == expected


@pytest.mark.parametrize("prompt", PROMPTS)
def test_completion_equals_simulator(tok: PromptTokenizer, prompt: str) -> None:
    assert tok.request_ids({"prompt": prompt}, chat=False) == SimTokenizer(MODEL).encode(prompt)


def test_unreproducible_requests_say_so(tok: PromptTokenizer) -> None:
    with pytest.raises(PromptError):
        tok.request_ids({"messages": []}, chat=True)
    with pytest.raises(PromptError):
        tok.request_ids({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, chat=True)
    with pytest.raises(PromptError):
        tok.request_ids({"prompt": {"not": "a prompt"}}, chat=False)
    with pytest.raises(PromptError):
        tok.request_ids({"messages": [{"role": "user", "content": "x"}], "chat_template": "{{ 1 }}"}, chat=True)


@pytest.fixture(scope="module")
def vllm_renderer() -> Any:
    pytest.importorskip("vllm")
    import types

    from vllm.config import ModelConfig
    from vllm.renderers.registry import renderer_from_config

    mc = ModelConfig(model=str(MODEL), tokenizer=str(MODEL))
    # VllmConfig would probe for an accelerator; the renderer only reads these two attributes.
    cfg = types.SimpleNamespace(model_config=mc, parallel_config=types.SimpleNamespace(_api_process_rank=0))
    renderer = renderer_from_config(cfg)  # type: ignore[arg-type]
    yield renderer
    renderer.shutdown()


@pytest.mark.vllm
@pytest.mark.parametrize("body", CHATS)
def test_chat_equals_vllm_renderer(tok: PromptTokenizer, vllm_renderer: Any, body: dict[str, Any]) -> None:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    req = ChatCompletionRequest.model_validate({"model": "synth", **body})
    mc = vllm_renderer.model_config
    _, prompt = vllm_renderer.render_messages(req.messages, req.build_chat_params(None, "auto"))
    tokenized = vllm_renderer.tokenize_prompt(prompt, req.build_tok_params(mc))
    assert tok.request_ids(body, chat=True) == list(tokenized["prompt_token_ids"])


@pytest.mark.vllm
@pytest.mark.parametrize("prompt", [p for p in PROMPTS if p])
def test_completion_equals_vllm_renderer(tok: PromptTokenizer, vllm_renderer: Any, prompt: str) -> None:
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    for extra in ({}, {"add_special_tokens": False}):
        req = CompletionRequest.model_validate({"model": "synth", "prompt": prompt, **extra})
        dict_prompt = vllm_renderer.render_prompt({"prompt": prompt})
        tokenized = vllm_renderer.tokenize_prompt(dict_prompt, req.build_tok_params(vllm_renderer.model_config))
        assert tok.request_ids({"prompt": prompt, **extra}, chat=False) == list(tokenized["prompt_token_ids"])
