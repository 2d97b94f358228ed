"""Errors that pdkit reports to a person, not as a traceback.

Why a dedicated type: every configuration or CLI mistake must end in one line that names the
offending field and how to fix it, with exit code 2 -- the CLI catches exactly this type.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A deployment that cannot work, explained in one line: ``<field>: <problem>; <fix>``."""

    def __init__(self, field: str, problem: str, fix: str) -> None:
        self.field = field
        self.problem = problem
        self.fix = fix
        super().__init__(f"{field}: {problem}; {fix}")
