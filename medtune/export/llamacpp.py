"""llama.cpp's own converter, for the architectures medtune's writer does not know.

`--converter auto` (the default) uses medtune's writer when the model's architecture is in
medtune.archs.REGISTRY, and llama.cpp's `convert_hf_to_gguf.py` otherwise, when a llama.cpp checkout
is configured (`--llama-cpp DIR` or LLAMA_CPP_DIR). The converter runs as a child process with the current
Python (it needs torch, transformers and numpy) and with the checkout's own gguf-py first on PYTHONPATH,
because the converter is written against that version of it. medtune never imports llama.cpp code.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from medtune.core.errors import BadInput, MissingDependency

CONVERTERS = ("auto", "medtune", "llama.cpp")
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")  # what convert_hf_to_gguf.py writes itself
ENV = "LLAMA_CPP_DIR"
_OPTION = "--converter llama.cpp --llama-cpp DIR (or LLAMA_CPP_DIR=DIR)"


@dataclass
class Route:
    converter: str  # "medtune" or "llama.cpp"
    hf_arch: str | None
    checkout: Path | None = None  # the llama.cpp folder, when converter == "llama.cpp"

    @property
    def script(self) -> Path:
        return self.checkout / "convert_hf_to_gguf.py"


def checkout_dir(llama_cpp_dir: str | Path | None = None) -> Path | None:
    """The configured llama.cpp folder (argument, else LLAMA_CPP_DIR), checked; None if none is configured."""
    folder = llama_cpp_dir or os.environ.get(ENV) or None
    if folder is None:
        return None
    folder = Path(folder).expanduser().absolute()
    if not (folder / "convert_hf_to_gguf.py").is_file():
        src = "--llama-cpp" if llama_cpp_dir else ENV
        raise BadInput(
            f"{folder} is not a llama.cpp checkout: it has no convert_hf_to_gguf.py",
            where=src,
            hint="git clone https://github.com/ggml-org/llama.cpp and point --llama-cpp (or LLAMA_CPP_DIR) "
            "at that folder",
        )
    return folder


def choose(converter: str, model_dir: Path, llama_cpp_dir: str | Path | None = None) -> Route:
    """Which converter exports this model; refuses (before anything is written) what cannot be done."""
    from medtune.archs import REGISTRY, supported
    from medtune.models.config import read_config

    converter = (converter or "auto").lower().replace("llamacpp", "llama.cpp").replace("llama_cpp", "llama.cpp")
    if converter not in CONVERTERS:
        raise BadInput(f"unknown converter {converter!r}", hint=f"choose from: {', '.join(CONVERTERS)}")
    names = read_config(model_dir).get("architectures") or []
    hf_arch = names[0] if names else None
    ours = hf_arch in REGISTRY
    if converter == "medtune" or (converter == "auto" and ours):
        if not ours:
            raise _unsupported(hf_arch, model_dir, supported())
        return Route("medtune", hf_arch)
    folder = checkout_dir(llama_cpp_dir)
    if folder is None:
        if converter == "auto":
            raise _unsupported(hf_arch, model_dir, supported())
        raise MissingDependency(
            "--converter llama.cpp needs a llama.cpp checkout and none is configured",
            hint="git clone https://github.com/ggml-org/llama.cpp, then pass --llama-cpp DIR or set LLAMA_CPP_DIR=DIR",
        )
    check_python_deps()
    return Route("llama.cpp", hf_arch, folder)


def _unsupported(hf_arch, model_dir: Path, names: list[str]) -> BadInput:
    return BadInput(
        f"architecture {hf_arch!r} cannot be exported by medtune's GGUF writer (supported: {', '.join(names)})",
        where=str(Path(model_dir) / "config.json"),
        hint=f"export it with llama.cpp's converter: {_OPTION}, a llama.cpp checkout "
        "(git clone https://github.com/ggml-org/llama.cpp)",
    )


def check_python_deps() -> None:
    """convert_hf_to_gguf.py imports torch, transformers and numpy from the current Python."""
    import importlib.util

    missing = [m for m in ("torch", "transformers", "numpy") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependency(
            f"llama.cpp's convert_hf_to_gguf.py needs {', '.join(missing)} in this Python",
            hint=f"pip install {' '.join(missing)} (see the checkout's "
            "requirements/requirements-convert_hf_to_gguf.txt)",
        )


def convert(
    route: Route,
    model_dir: str | Path,
    out_path: str | Path,
    outtype: str,
    progress=None,
    *,
    name: str | None = None,
    label: str | None = None,
) -> dict:
    """Run `convert_hf_to_gguf.py MODEL --outfile OUT --outtype T`; OUT appears only when complete."""
    from medtune.core import fsutil
    from medtune.export.gguf_reader import file_type
    from medtune.export.quantize import run_tool

    if outtype not in CONVERTER_TYPES:
        raise BadInput(
            f"llama.cpp's converter does not write {outtype}", hint=f"it writes {', '.join(CONVERTER_TYPES)}"
        )
    out_path = Path(out_path)
    gguf_py = route.checkout / "gguf-py"
    from medtune.core.redact import scrubbed_env

    env = scrubbed_env()  # offline, on a local folder: no Hub token for the converter
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(gguf_py), env.get("PYTHONPATH", "")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")  # the model is a local folder: nothing to download
    env["PYTHONUNBUFFERED"] = "1"
    with fsutil.atomic_path(out_path) as tmp:
        cmd = [
            sys.executable,
            str(route.script),
            str(Path(model_dir).absolute()),
            "--outfile",
            str(tmp),
            "--outtype",
            outtype,
        ]
        if name:
            cmd += ["--model-name", name]
        run_tool(
            cmd,
            f"llama.cpp's convert_hf_to_gguf.py ({route.checkout})",
            progress=progress,
            label=label or f"converting with llama.cpp → {out_path.name}",
            env=env,
            error=BadInput,
            hint="a model llama.cpp cannot convert, or a checkout too old for it (git pull); "
            "--debug shows the converter's full output",
        )
        if not tmp.is_file():
            raise BadInput(
                "llama.cpp's convert_hf_to_gguf.py finished without writing the file",
                where=str(route.script),
                hint="re-run with --debug to see its output",
            )
    return {
        "path": str(out_path),
        "outtype": outtype,
        "file_type": file_type(outtype),
        "bytes": out_path.stat().st_size,
        "converter": f"llama.cpp ({route.checkout})",
        "hf_arch": route.hf_arch,
    }


def vocab_from_gguf(path: str | Path, model_dir: str | Path):
    """The tokenizer facts the Modelfile needs (stop tokens, chat template), read back from a GGUF that
    llama.cpp wrote: used when medtune's own tokenizer reader does not know this tokenizer."""
    from medtune.export.gguf_reader import read_gguf_header
    from medtune.export.tokenizer import EOS_IDS_KEY, Vocab

    meta = read_gguf_header(path, full_arrays=("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", EOS_IDS_KEY))[
        "metadata"
    ]
    tokens = list(meta.get("tokenizer.ggml.tokens") or [])
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eos_ids = [eos] if eos is not None else []
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        if meta.get(key) is not None:
            eos_ids.append(meta[key])
    eos_ids += [i for i in meta.get(EOS_IDS_KEY) or [] if isinstance(i, int)]
    for fname in ("generation_config.json", "config.json"):  # every id the model may end a turn with
        try:
            value = json.loads((Path(model_dir) / fname).read_text(encoding="utf-8")).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue
        for idx in [value] if isinstance(value, int) else value or []:
            if isinstance(idx, int):
                eos_ids.append(idx)
        if value is not None:
            break
    return Vocab(
        model=meta.get("tokenizer.ggml.model") or "?",
        pre=meta.get("tokenizer.ggml.pre") or "default",
        tokens=tokens,
        token_types=list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)),
        merges=[],
        bos_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_id=eos,
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=meta.get("tokenizer.chat_template"),
        eos_ids=[i for i in dict.fromkeys(eos_ids) if 0 <= i < len(tokens)],
        eot_id=meta.get("tokenizer.ggml.eot_token_id"),
    )
