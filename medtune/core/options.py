"""One options dataclass per stage is the single source of that stage's options: the library function takes it, the
CLI's flags are made from it (medtune.cli.options.stage_options), and `medtune run`'s config section is checked
against it (config_keys).

A field is declared with `option(default, help, flags=..., aliases=...)`:
- help: the --help text of the flag;
- flags: the flag names when they are not `--field-name` (e.g. ("--format",) for `fmt`, or
  ("--token-stats/--no-token-stats",));
- aliases: other names the config and the library accept for the field (e.g. `format` for `fmt`): old spellings
  keep working, and `from_kwargs` maps them onto the field;
- cli_type: the command line's type when it differs from the field's (a comma-separated str for a list);
- metavar: the flag's value name in --help;
- cli: False for a field that only the library and the config take; config: False for one the config does not.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Callable


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    flags: tuple[str, ...] = (),  # noqa: A002
    aliases: tuple[str, ...] = (),
    cli_type: Any = None,
    metavar: str | None = None,
    cli: bool = True,
    config: bool = True,
    factory: Callable[[], Any] | None = None,
) -> Any:
    meta = {
        "help": help,
        "flags": tuple(flags),
        "aliases": tuple(aliases),
        "cli_type": cli_type,
        "metavar": metavar,
        "cli": cli,
        "config": config,
    }
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def fields(cls) -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(cls)


def field_types(cls) -> dict[str, Any]:
    """The fields' types, evaluated (the modules use `from __future__ import annotations`)."""
    return typing.get_type_hints(cls)


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def aliases(cls) -> dict[str, str]:
    """Every other accepted name → the field's name."""
    return {a: f.name for f in fields(cls) for a in f.metadata.get("aliases", ())}


def config_keys(cls) -> set[str]:
    """The keys a config section for this stage may hold: the fields and their aliases."""
    return {n for f in fields(cls) if f.metadata.get("config", True) for n in (f.name, *f.metadata.get("aliases", ()))}


def from_kwargs(cls, opts=None, where: str | None = None, **given):
    """`opts` (or the defaults) with `given` applied; aliases mapped onto their fields; an unknown name is refused
    with the closest known one."""
    from medtune.core.errors import BadInput

    names, alias = {f.name for f in fields(cls)}, aliases(cls)
    updates = {}
    for key, value in given.items():
        name = alias.get(key, key)
        if name not in names:
            close = difflib.get_close_matches(key, sorted(names | set(alias)), n=1)
            raise BadInput(
                f"unknown option {key!r}",
                where=where,
                hint=f"did you mean {close[0]!r}?" if close else f"known: {', '.join(sorted(names))}",
            )
        updates[name] = value
    return dataclasses.replace(opts if opts is not None else cls(), **updates)
