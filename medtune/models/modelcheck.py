"""Why a model folder would not load: one BadInput that names the file at fault.

mlx_lm and transformers report a broken folder in their own words ("Couldn't instantiate the backend
tokenizer", "[load_safetensors] The JSON header is ... bytes long", "Model type x not supported"), without
saying which file is wrong. `load_failure` looks at the folder and says it: no tokenizer, an unknown
model_type, a damaged safetensors file; failing that, the loader's first line.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

from medtune.core.errors import BadInput

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's framing (header length, header JSON, data extent), or None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"the file is {size} bytes, too short for a safetensors header"
            (n,) = struct.unpack("<Q", head)
            if head.startswith(b"version "):
                return "the file is a git-lfs pointer, not the weights"
            if 8 + n > size:
                return f"the header is truncated ({n} bytes announced, {size - 8} in the file)"
            header = json.loads(fh.read(n))
    except OSError as exc:
        return f"cannot read the file ({exc.strerror or exc})"
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return f"the header is not valid JSON ({exc})"
    if not isinstance(header, dict):
        return "the header is not a JSON object"
    ends = [
        meta.get("data_offsets", [0, 0])[1]
        for name, meta in header.items()
        if name != "__metadata__" and isinstance(meta, dict)
    ]
    if ends and 8 + n + max(ends) > size:
        return f"the tensor data is truncated ({8 + n + max(ends)} bytes needed, {size} in the file)"
    return None


def read_header(
    path: Path, hint: str = "the file is damaged or incomplete; download or fuse the model again"
) -> tuple[int, dict]:
    """(header length, header) of a safetensors file, or BadInput naming the file and what is wrong with it."""
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            return n, json.loads(fh.read(n))
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise BadInput(
            f"not a readable safetensors file: {safetensors_problem(path) or exc}", where=str(path), hint=hint
        ) from exc


def load_failure(model_dir: str | Path, exc: BaseException, loader: str) -> BadInput:
    """The BadInput to raise when `loader` (mlx_lm, transformers) could not load `model_dir`."""
    model_dir = Path(model_dir)
    for f in sorted(model_dir.glob("*.safetensors")):
        problem = safetensors_problem(f)
        if problem:
            return BadInput(
                f"not a readable safetensors file: {problem}",
                where=str(f),
                hint="the file is damaged or incomplete; download or fuse the model again",
            )
    text = str(exc).strip()
    m = re.search(r"Model type (\S+) not supported", text)
    if m:
        return BadInput(
            f"model_type {m.group(1)!r} is not supported by {loader}",
            where=str(model_dir / "config.json"),
            hint="use a model of a supported architecture (llama, mistral, qwen2, qwen3, ...), or "
            "fix model_type in config.json",
        )
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        return BadInput(
            f"no tokenizer in the model folder (none of {', '.join(TOKENIZER_FILES[:2])})",
            where=str(model_dir),
            hint="copy the base model's tokenizer files into the folder",
        )
    first = text.splitlines()[0] if text else type(exc).__name__
    return BadInput(
        f"{loader} cannot load the model: {first}",
        where=str(model_dir),
        hint="check the model folder (config.json, *.safetensors, tokenizer files)",
    )
