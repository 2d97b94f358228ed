"""The embedded synthetic model: what pdkit serves when no ``--model`` is given.

Why it exists: a P/D deployment must be startable and checkable on a GPU machine that cannot download
anything.  The folder holds a Llama-architecture ``config.json`` (8B shape) and a BPE tokenizer that was
generated once and is shipped as a file -- never regenerated at run time, because a tokenizer trained
at run time differs between Python versions and the token ids (and with them every comparison of
outputs) would differ too.  vLLM serves it with ``--load-format dummy``; dummy weights are seeded, so
every instance computes the same function and greedy outputs compare token for token.
"""

from __future__ import annotations

from pathlib import Path

SYNTHETIC_MODEL_NAME = "synth-llama-8b"
SYNTHETIC_SERVED_NAME = "synth"


def default_model_dir() -> Path:
    """Path of the shipped synthetic model folder (config + tokenizer, no weights)."""
    return Path(__file__).resolve().parent / "models" / SYNTHETIC_MODEL_NAME


def is_synthetic(model: str | Path) -> bool:
    """True when ``model`` is the embedded synthetic model (served with dummy weights)."""
    try:
        return Path(model).resolve() == default_model_dir()
    except OSError:
        return False


def has_weights(model_dir: Path) -> bool:
    """True when a local model folder holds weight files; without them vLLM needs ``--load-format dummy``."""
    patterns = ("*.safetensors", "*.bin", "*.pt", "*.gguf")
    return any(next(model_dir.glob(p), None) is not None for p in patterns)
