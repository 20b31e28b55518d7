"""Dataset formats: one registry entry per schema. Each maps a record to an Example."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from medtune.errors import BadInput


@dataclass
class Example:
    prompt: str
    response: str
    reasoning: str = ""
    system: str = ""
    where: str = ""


@dataclass(frozen=True)
class Format:
    name: str
    fields: tuple[str, ...]  # required (case-insensitive)
    convert: Callable[[dict, str], Example]
    description: str


REGISTRY: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    REGISTRY[fmt.name] = fmt
    return fmt


def _get(rec: dict, name: str, where: str, required: bool = True) -> str:
    lower = {k.lower(): k for k in rec}
    key = lower.get(name.lower())
    if key is None:
        if required:
            raise BadInput(f"missing field {name!r}", where=where,
                           hint=f"fields present: {', '.join(map(str, rec)) or 'none'}")
        return ""
    value = rec[key]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadInput(f"field {key!r} is a {type(value).__name__}, expected text", where=where,
                       hint="every field must be a JSON string")
    return value


def _medical_o1(rec: dict, where: str) -> Example:
    return Example(
        prompt=_get(rec, "Question", where),
        reasoning=_get(rec, "Complex_CoT", where),
        response=_get(rec, "Response", where),
        where=where,
    )


register(Format("medical-o1", ("question", "complex_cot", "response"), _medical_o1,
                "Question / Complex_CoT / Response (medical-o1-reasoning-SFT)"))


def detect(record: dict, where: str) -> Format:
    keys = {k.lower() for k in record}
    for fmt in REGISTRY.values():
        if set(fmt.fields) <= keys:
            return fmt
    raise BadInput(
        f"cannot tell the dataset format from fields {sorted(record)}",
        where=where,
        hint="known formats: " + "; ".join(f"{f.name} ({f.description})" for f in REGISTRY.values()),
    )


def get(name: str) -> Format:
    if name not in REGISTRY:
        raise BadInput(f"unknown format {name!r}", hint=f"known formats: {', '.join(REGISTRY)}")
    return REGISTRY[name]
