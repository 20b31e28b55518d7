"""The one YAML config loader: `medtune train --config` and `medtune run` read their files through it, so both say
the same thing about a missing file, bad YAML (file:line), a file that is not a mapping, and an unknown key (with the
closest known one)."""

from __future__ import annotations

import difflib
from pathlib import Path

from medtune.core.errors import BadInput


def read_yaml_mapping(path: str | Path, *, missing_hint: str, mapping_hint: str) -> dict:
    """The mapping in a YAML file (empty file: {})."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError as exc:
        raise BadInput(f"config file not found: {path}", hint=missing_hint) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise BadInput(
            f"invalid YAML: {getattr(exc, 'problem', exc)}",
            where=f"{path}:{mark.line + 1}" if mark else str(path),
            hint="fix the YAML syntax",
        ) from exc
    if not isinstance(data, dict):
        raise BadInput("the config must be a mapping of option: value", where=str(path), hint=mapping_hint)
    return data


def normalise_keys(d: dict | None, aliases: dict[str, str] | None = None) -> dict:
    """Dashed keys as snake_case, old spellings (aliases) under their current name."""
    aliases = aliases or {}
    out = {}
    for key, value in (d or {}).items():
        name = str(key).replace("-", "_")
        out[aliases.get(name, name)] = value
    return out


def check_keys(d: dict, known: set[str], where: str, section: str | None = None) -> None:
    """Refuse a key that is not in `known`, naming the closest known one."""
    for key in d:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            what = (
                f"unknown option {key!r} in section {section!r}" if section else f"unknown option {key!r} in the config"
            )
            raise BadInput(
                what, where=where, hint=f"did you mean {close[0]!r}?" if close else f"known: {', '.join(sorted(known))}"
            )
