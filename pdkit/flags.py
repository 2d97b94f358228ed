"""Command-line flags declared once, on the settings they set: typer options and argv derived from them.

Why: a process's settings used to be written three times (the settings class, the typer signature of
its command with its own defaults and help, and the launch plan's argv builder), and commands sharing
options (``launch agg`` / ``launch disagg``) each repeated a ~30-parameter list.  Here a settings field
carries its flag as ``Annotated[T, Flag("--port", "help")]``; :func:`takes_settings` turns a command
parameter annotated with such a dataclass into one typer option per flagged field (the command receives
the built instance), and :func:`to_flags` turns setting values back into the argv that sets them, so the
launcher can never spell a flag the command does not have.

Rules of a flag: ``decl`` is click's declaration (``"--x"``, ``"--x/--no-x"`` for a bool pair, or
several names separated by spaces); the CLI parses ``cli_type`` where it differs from the field's own
(a ``Literal`` the command checks itself, with its own message); ``cli_default`` is the CLI's default
where it differs from the field's.  A CLI value of ``None`` leaves the field at its own default (so a
default factory, e.g. one reading the environment, still runs); ``parse`` maps the CLI's value to the
field's (``"" -> None``); a ``ValueError`` it raises is the command's usage error: its message goes to
``takes_settings``'s ``on_error`` (one line, exit 2, where the command's own checks would put it).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import typer

__all__ = ["Flag", "takes_settings", "to_flags"]

F = TypeVar("F", bound=Callable[..., Any])
_UNSET: Any = object()


@dataclass(frozen=True)
class Flag:
    """A setting's command-line flag (see the module docstring for the rules)."""

    decl: str
    help: str
    envvar: str | None = None
    cli_type: Any = _UNSET
    cli_default: Any = _UNSET
    parse: Callable[[Any], Any] | None = None

    @property
    def names(self) -> list[str]:
        return self.decl.split()

    def option(self) -> Any:
        """The ``typer.Option`` this flag is."""
        return typer.Option(*self.names, help=self.help, envvar=self.envvar)


def _flag_of(annotation: Any) -> tuple[Any, Flag | None]:
    """``Annotated[T, Flag(...)]`` -> ``(T, flag)``; any other annotation -> ``(annotation, None)``."""
    if typing.get_origin(annotation) is Annotated:
        base, *extras = typing.get_args(annotation)
        flags = [x for x in extras if isinstance(x, Flag)]
        if flags:
            return base, flags[0]
    return annotation, None


def flagged_fields(cls: type) -> dict[str, tuple[Any, Flag, Any]]:
    """``name -> (type, flag, default)`` of ``cls``'s fields that have a flag, in field order."""
    hints = typing.get_type_hints(cls, include_extras=True)
    out: dict[str, tuple[Any, Flag, Any]] = {}
    for field in dataclasses.fields(cls):
        base, flag = _flag_of(hints[field.name])
        if flag is not None:
            out[field.name] = (base, flag, field.default)
    return out


def _options(cls: type) -> list[inspect.Parameter]:
    """One keyword parameter per flagged field of ``cls``, as typer reads it."""
    params = []
    for name, (base, flag, default) in flagged_fields(cls).items():
        tp = base if flag.cli_type is _UNSET else flag.cli_type
        cli_default = default if flag.cli_default is _UNSET else flag.cli_default
        if cli_default is dataclasses.MISSING:
            cli_default = inspect.Parameter.empty
        params.append(
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, default=cli_default, annotation=Annotated[tp, flag.option()]
            )
        )
    return params


def _build(cls: type, values: dict[str, Any], on_error: Callable[[str], BaseException] | None) -> Any:
    fields = flagged_fields(cls)
    kwargs = {}
    for name, (_base, flag, _default) in fields.items():
        value = values.pop(name)
        if value is None:
            continue  # the field's own default (or factory)
        try:
            kwargs[name] = flag.parse(value) if flag.parse is not None else value
        except ValueError as exc:
            if on_error is None:
                raise typer.BadParameter(str(exc), param_hint=flag.names[0].split("/")[0]) from None
            raise on_error(str(exc)) from None
    return cls(**kwargs)


def takes_settings(func: F | None = None, *, on_error: Callable[[str], BaseException] | None = None) -> Any:
    """Decorate a typer command: each parameter annotated with a dataclass becomes that dataclass's flags.

    The flags take the parameter's place in the command's signature (so in ``--help``); the command is
    called with the dataclass built from them (fields without a flag keep their defaults).  ``on_error``
    (``@takes_settings(on_error=...)``): turns a flag's parse error message into the exception to raise
    (e.g. the command's one-line exit 2); without it, click's usage error.
    """
    if func is None:
        return functools.partial(takes_settings, on_error=on_error)
    hints = typing.get_type_hints(func, include_extras=True)
    params: list[inspect.Parameter] = []
    groups: dict[str, type] = {}
    for name, param in inspect.signature(func).parameters.items():
        annotation = hints.get(name, param.annotation)
        if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
            groups[name] = annotation
            params += _options(annotation)
        else:
            base, flag = _flag_of(annotation)
            if flag is not None:  # a lone flag of the command's own: ``Annotated[T, Flag(...)]``
                annotation = Annotated[base, flag.option()]
            params.append(param.replace(annotation=annotation, kind=inspect.Parameter.KEYWORD_ONLY))

    @functools.wraps(func)
    def command(**values: Any) -> Any:
        for name, cls in groups.items():
            values[name] = _build(cls, values, on_error)
        return func(**values)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    del command.__wrapped__  # typer must read the signature above, not the function's own
    return command


def to_flags(cls: type, **values: Any) -> list[str]:
    """The argv that sets ``values`` (fields of ``cls``, in the order given) on ``cls``'s command.

    ``None`` is left out (the command's default); a bool is its ``--x`` / ``--no-x`` flag (a lone
    ``--x`` only when true); anything else is ``--x str(value)``.
    """
    fields = flagged_fields(cls)
    argv: list[str] = []
    for name, value in values.items():
        _base, flag, _default = fields[name]
        if value is None:
            continue
        first = flag.names[0]
        if isinstance(value, bool):
            on, _, off = first.partition("/")
            argv += [on] if value else ([off] if off else [])
        else:
            argv += [first, str(value)]
    return argv
