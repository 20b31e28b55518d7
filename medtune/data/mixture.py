"""Several sources in one prepared set: `medtune prepare A B C --weights 0.6,0.3,0.1`, or a list in `medtune run`:

    prepare:
      dataset:
        - data/sample/medical_o1_sample.jsonl
        - {path: data/sample/alpaca_sample.json, weight: 0.3, format: alpaca}
        - {path: qa.csv, weight: 0.1, map: "question=Q,response=A"}

Each source is read with its own format (given, or detected from its first record) and --map; an example met in an
earlier source is a duplicate (dropped, counted). Then the mix: each source gives weight x total examples, drawn
without replacement with the seed (a source never repeats a record). The total is --sample when given, else the
largest the weights allow (the source that runs out first decides); a --sample that would need more records than
a source has is refused, naming the source and how many it has. Without weights every example of every source is
kept. The split then keeps a question on one side, as for one source (medtune.data.prepare.split_key).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from medtune.core.errors import BadInput

SOURCE_KEYS = {"path", "dataset", "weight", "format", "map"}


@dataclass
class Source:
    spec: str
    weight: float | None = None
    fmt: str | None = None
    mapping: str | dict | None = None
    # filled while reading
    format: str = ""
    read: int = 0
    available: int = 0
    used: int = 0
    files: list = field(default_factory=list)


def is_mixture(dataset) -> bool:
    return isinstance(dataset, (list, tuple)) and len(dataset) > 1


def parse_sources(dataset, weights, fmt: str | None, mapping) -> list[Source]:
    """The sources of `dataset` (specs, or mappings with path/weight/format/map) with their weights: `weights` (a
    list or "0.6,0.3,0.1", one per source) or each mapping's weight; the command's --format/--map as defaults."""
    items = list(dataset)
    given = _weights(weights, len(items))
    sources = []
    for i, item in enumerate(items):
        if isinstance(item, dict):
            unknown = set(item) - SOURCE_KEYS
            if unknown or not (item.get("path") or item.get("dataset")):
                raise BadInput(
                    f"source {i + 1}: {'unknown key ' + repr(sorted(unknown)[0]) if unknown else 'no path'}",
                    hint="each source: a path, or {path: FILE, weight: 0.3, format: alpaca, map: 'question=Q'}",
                )
            spec, w = str(item.get("path") or item.get("dataset")), item.get("weight")
            sources.append(Source(spec, w, item.get("format") or fmt, item.get("map") or mapping))
        else:
            sources.append(Source(str(item), None, fmt, mapping))
    if given is not None:
        for s, w in zip(sources, given):
            s.weight = w
    set_ = [s.weight is not None for s in sources]
    if any(set_) and not all(set_):
        raise BadInput("some sources have a weight and some do not", hint="give every source a weight, or none")
    for s in sources:
        if s.weight is not None and not (isinstance(s.weight, (int, float)) and s.weight > 0):
            raise BadInput(f"the weight of {s.spec} must be a number above 0, not {s.weight!r}", hint="e.g. 0.3")
    return sources


def _weights(weights, n: int) -> list[float] | None:
    if weights is None or weights == "":
        return None
    parts = [w.strip() for w in weights.split(",")] if isinstance(weights, str) else list(weights)
    if len(parts) != n:
        raise BadInput(
            f"--weights has {len(parts)} value(s) for {n} sources",
            hint="one weight per source, e.g. --weights 0.6,0.3,0.1",
        )
    try:
        return [float(w) for w in parts]
    except (TypeError, ValueError):
        raise BadInput(f"--weights {weights!r}: not numbers", hint="e.g. --weights 0.6,0.3,0.1") from None


def mix(pools: list[list], sources: list[Source], total: int | None, seed: int) -> list:
    """The examples of each source's pool in their weights' proportions (see the module docstring)."""
    for s, pool in zip(sources, pools):
        s.available = len(pool)
    if sources[0].weight is None:
        for s in sources:
            s.used = s.available
        return [ex for pool in pools for ex in pool]
    norm = [s.weight / sum(s.weight for s in sources) for s in sources]
    if total is None:
        total = int(min(s.available / w for s, w in zip(sources, norm)) + 1e-9)
    counts = _apportion(total, norm)
    for s, need, w in zip(sources, counts, norm):
        if need > s.available:
            raise BadInput(
                f"{s.spec} has {s.available} usable examples; a weight of {w:.3g} of {total} needs {need}",
                hint=f"lower --sample (at most {int(min(x.available / v for x, v in zip(sources, norm)))} with these "
                "weights) or this source's weight; sources are drawn without replacement",
            )
    out = []
    for i, (s, pool, need) in enumerate(zip(sources, pools, counts)):
        picked = sorted(random.Random(f"{seed}:{i}").sample(range(len(pool)), need))
        s.used = need
        out += [pool[j] for j in picked]
    return out


def _apportion(total: int, shares: list[float]) -> list[int]:
    """`total` split by `shares`, rounded so that the parts add up (largest remainders first)."""
    exact = [total * w for w in shares]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(shares)), key=lambda i: exact[i] - counts[i], reverse=True)[: total - sum(counts)]:
        counts[i] += 1
    return counts


def manifest_sources(sources: list[Source], digests: dict) -> list[dict]:
    """Each source's spec, format, weight, sha256 of its files, records read, examples available and used, share."""
    used = sum(s.used for s in sources) or 1
    return [
        {
            "dataset": s.spec,
            "format": s.format,
            "map": s.mapping if isinstance(s.mapping, (str, dict)) else None,
            "weight": s.weight,
            "sha256": {str(f): digests.get(str(f)) for f in s.files},
            "read": s.read,
            "available": s.available,
            "used": s.used,
            "share": round(s.used / used, 4),
        }
        for s in sources
    ]
