"""docs/configuration.md, generated from the deployment's pydantic models (pdkit/config.py).

Why generated: every setting is explained once, in its field's docstring next to its type and default
(``use_attribute_docstrings``); a hand-kept table beside it drifts.  Regenerate after changing a setting::

    python -m pdkit.config_docs > docs/configuration.md

tests/test_config_docs.py fails while the file is stale or a field has no docstring.
"""

from __future__ import annotations

import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from pdkit.config import ROLES, Deployment

DOC_PATH = Path("docs") / "configuration.md"
COMMAND = "python -m pdkit.config_docs > docs/configuration.md"

INTRO = f"""\
<!-- Generated from pdkit/config.py by `{COMMAND}`; edit the field docstrings there, not this file. -->

# Configuration reference

Every key of a deployment, as YAML (`--config FILE` or a preset from `configs/`) or as the flags that set
it; built-in defaults < YAML file < CLI flags, and unknown keys are errors (README.md, "Configuration
reference").  A nested key is written dotted here (`frontend.port`) and nested in YAML
(`frontend: {{port: 8000}}`).  A default of `null` means unset: the description says what that does.
"""


def _text(doc: str | None) -> str:
    """A docstring as Markdown: paragraphs joined into lines, reST ``code`` as `code`."""
    paragraphs = re.split(r"\n\s*\n", (doc or "").strip())
    return "\n\n".join(" ".join(p.split()).replace("``", "`") for p in paragraphs if p.strip())


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    if tp is Path:
        return "path"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is typing.Annotated:  # inside a union (``Port | None``); a field's own bounds are its metadata
        base, *metadata = typing.get_args(tp)
        return _type_name(base) + _bounds(metadata)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def _bounds(metadata: list[Any]) -> str:
    """``Field(ge=1, le=65535)``'s bounds as `` (>= 1, <= 65535)`` (annotated_types' Ge, Gt, Le, Lt)."""
    out = []
    metadata = [x for m in metadata for x in (m.metadata if isinstance(m, FieldInfo) else [m])]
    for m in metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                out.append(f"{sign} {getattr(m, attr)}")
    return f" ({', '.join(out)})" if out else ""


def _value(value: Any) -> str:
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        return f"`{value}`"
    return f"`{json.dumps(value)}`"


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _rows(prefix: str, instances: list[BaseModel]) -> list[str]:
    """One table row per field of ``instances``' model (its defaults: one per instance, ``a / b`` if they differ)."""
    rows = []
    model = type(instances[0])
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        if _is_section(info.annotation):
            anchor = "-".join(ROLES) if name in ROLES else name  # GitHub's anchors of the headings below
            desc = f"{_text(info.description)} [Section below](#{anchor})."
            rows.append(f"| `{key}` | section | | {_cell(desc)} |")
            continue
        defaults = [_value(getattr(inst, name)) for inst in instances]
        default = defaults[0] if len(set(defaults)) == 1 else " / ".join(defaults)
        kind = _type_name(info.annotation) + _bounds(info.metadata)
        rows.append(f"| `{key}` | {_cell(kind)} | {_cell(default)} | {_cell(_text(info.description))} |")
    return rows


def _table(rows: list[str]) -> list[str]:
    return ["| key | type | default | description |", "| --- | --- | --- | --- |", *rows]


def generate() -> str:
    """The whole of docs/configuration.md."""
    dep = Deployment()
    out = [INTRO, "## Top level", "", _text(Deployment.__doc__), "", *_table(_rows("", [dep]))]
    done: set[type[BaseModel]] = set()
    for name, info in Deployment.model_fields.items():
        section = info.annotation
        if not _is_section(section) or section in done:
            continue
        done.add(section)
        if name in ROLES:
            roles = " / ".join(ROLES)
            heading = f"## {', '.join(ROLES)}"
            lines = [
                f"One section per worker role, `<role>` = {', '.join(f'`{r}`' for r in ROLES)}; "
                f"a default written `a / b / c` is {roles}'s.",
                "",
                *(f"* `{r}`: {_text(Deployment.model_fields[r].description)}" for r in ROLES),
            ]
            rows = _rows("<role>.", [getattr(dep, r) for r in ROLES])
        else:
            heading, lines, rows = f"## {name}", [], _rows(f"{name}.", [getattr(dep, name)])
        out += ["", heading, "", _text(section.__doc__), ""]
        out += [*lines, ""] if lines else []
        out += _table(rows)
    return "\n".join(out) + "\n"


def undocumented() -> list[str]:
    """Dotted keys of the fields that have no description (docstring), if any."""
    missing: list[str] = []
    seen: set[type[BaseModel]] = set()

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            if not (info.description or "").strip():
                missing.append(prefix + name)
            if _is_section(info.annotation) and info.annotation not in seen:
                seen.add(info.annotation)
                walk(info.annotation, f"{'<role>' if name in ROLES else name}.")

    walk(Deployment, "")
    return missing


if __name__ == "__main__":
    print(generate(), end="")
