"""STUB (frontdoor branch only): no-op stand-ins for the validation helper's module.

The frontend calls these before any hop; another helper writes the real module (vLLM 0.26's 400s for
bad sampling parameters and context lengths).  When merging, take that helper's file over this one.
"""

from __future__ import annotations

from typing import Any


def validate_request(path: str, body: dict[str, Any]) -> None:
    """STUB: the real one raises RequestError(400, ...) with vLLM's message for a bad parameter."""


def check_context_length(prompt_tokens: int, body: dict[str, Any], max_model_len: int, *, exact: bool) -> None:
    """STUB: the real one raises RequestError(400, ...) when prompt + max_tokens exceeds max_model_len."""
