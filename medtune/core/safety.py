"""Untrusted files: models, adapters, datasets and configs may come from anyone, so medtune never runs their code.

* Remote code: a folder whose config.json / tokenizer_config.json (…) asks for its own Python code
  (`auto_map`, mlx_lm's `model_file`, `custom_pipelines`) is refused unless the user said
  `--trust-remote-code` (`trust_remote_code: true` in a run config); every transformers / mlx_lm load passes
  `trust_remote_code` explicitly (`trust_remote_code()`, `mlx_load_kwargs()`, `hf_load_kwargs()`).
* Pickle: weights in `*.bin`, `*.pt`, `*.pth`, `*.ckpt` can run code when unpickled. When a folder has
  safetensors they are used and the pickle files are never opened; a folder with only pickle weights is
  refused unless `--allow-pickle`, and then read with `torch.load(weights_only=True)` and converted to
  safetensors in the cache (`cache_dir()/unpickled/`), which is what every loader then reads.
* Paths: names that become file names (run names, export names) follow `safe_name`; folders built from a
  root and a name are checked with `inside`; Hub ids with `check_hub_id`. A model/adapter folder whose files
  are symlinks resolving outside it is refused (`check_links`), except the Hugging Face cache layout where
  snapshot files point into the same repo's `blobs/`. `append_text` never writes through a symlink.

The flags are a process-wide policy set by the CLI (and `medtune run`) around the work it does:

    with safety.policy(trust_remote_code=True):
        prepare(...)

Library callers get the safe defaults (no remote code, no pickle).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from medtune.core.errors import BadInput

# ---- the policy -----------------------------------------------------------------------------------------
_POLICY = {"trust_remote_code": False, "allow_pickle": False}

TRUST_HINT = (
    "medtune does not run code that ships with a model; if you trust this model and its author, pass "
    "--trust-remote-code (trust_remote_code: true in a run config)"
)
PICKLE_HINT = (
    "convert the weights to safetensors (e.g. load and save_pretrained(safe_serialization=True) on a "
    "machine you do not mind exposing), or, if you trust the file's source, pass --allow-pickle "
    "(allow_pickle: true in a run config): it is then read with torch.load(weights_only=True)"
)


@contextlib.contextmanager
def policy(trust_remote_code: bool | None = None, allow_pickle: bool | None = None):
    """Within the block, allow (or forbid) remote code and pickle weights; None leaves a setting as it is."""
    old = dict(_POLICY)
    if trust_remote_code is not None:
        _POLICY["trust_remote_code"] = bool(trust_remote_code)
    if allow_pickle is not None:
        _POLICY["allow_pickle"] = bool(allow_pickle)
    try:
        yield
    finally:
        _POLICY.clear()
        _POLICY.update(old)


def trust_remote_code() -> bool:
    return bool(_POLICY["trust_remote_code"])


def allow_pickle() -> bool:
    return bool(_POLICY["allow_pickle"])


CONFIG_FLAGS = ("trust_remote_code", "allow_pickle")


def config_flags(cfg: dict, where: str = "config") -> dict:
    """The run config's trust_remote_code / allow_pickle as policy() arguments: true enables, false or absent
    leaves the command line's choice. Anything but a boolean is refused."""
    found = {}
    for key in CONFIG_FLAGS:
        value = cfg.get(key, False)
        if value is None:
            value = False
        if not isinstance(value, bool):
            raise BadInput(f"{key} must be true or false, not {value!r}", where=where, hint=f"{key}: false")
        found[key] = True if value else None
    return found


# ---- remote code --------------------------------------------------------------------------------------
CODE_CONFIGS = (
    "config.json",
    "tokenizer_config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "feature_extractor_config.json",
    "image_processor_config.json",
    "generation_config.json",
    "adapter_config.json",
)
CODE_KEYS = ("auto_map", "model_file", "custom_pipelines")


def _refs(value) -> list[str]:
    """The code references in an auto_map-like value (strings, lists of them, nested mappings)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [r for v in value for r in _refs(v)]
    if isinstance(value, dict):
        return [r for v in value.values() for r in _refs(v)]
    return []


def remote_code(folder: str | os.PathLike) -> list[tuple[Path, str, list[str]]]:
    """(file, key, references) for every config in `folder` that asks to run the model's own code."""
    folder = Path(folder)
    found = []
    for name in CODE_CONFIGS:
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # unreadable configs are reported by whoever reads them
        if not isinstance(data, dict):
            continue
        scopes = [data] + [v for k, v in data.items() if k.endswith("_config") and isinstance(v, dict)]
        for scope in scopes:
            for key in CODE_KEYS:
                if scope.get(key):
                    found.append((path, key, _refs(scope[key]) or [str(scope[key])]))
    return found


def check_remote_code(folder: str | os.PathLike, what: str = "model") -> None:
    """Refuse a folder that asks for its own Python code, unless the policy trusts remote code."""
    if trust_remote_code():
        return
    found = remote_code(folder)
    if not found:
        return
    path, key, refs = found[0]
    modules = sorted({r.split("--")[-1].rsplit(".", 1)[0] + ".py" for r in refs if "." in r}) or refs
    raise BadInput(
        f"{path.name} asks to run Python code that ships with the {what} ({key}: {', '.join(modules)})",
        where=str(path),
        hint=TRUST_HINT,
    )


def hf_load_kwargs(path: str | os.PathLike | None = None) -> dict:
    """Keyword arguments for transformers' from_pretrained: trust_remote_code always explicit, and safetensors
    only when the folder has them (a pickle file beside them is then never opened)."""
    kw = {"trust_remote_code": trust_remote_code()}
    if path is not None and any(Path(path).glob("*.safetensors")):
        kw["use_safetensors"] = True
    return kw


def mlx_load_kwargs() -> dict:
    """Keyword arguments for mlx_lm.load: its own trust_remote_code (a config's model_file) and the tokenizer's."""
    import inspect

    from mlx_lm import load

    trust = trust_remote_code()
    kw = {"tokenizer_config": {"trust_remote_code": trust}}
    if "trust_remote_code" in inspect.signature(load).parameters:  # mlx-lm releases before it had no model_file
        kw["trust_remote_code"] = trust
    return kw


# ---- pickle -------------------------------------------------------------------------------------------
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt"]
NOT_WEIGHTS = {"training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth", "rng.pt"}


def pickle_weights(folder: str | os.PathLike) -> list[Path]:
    """The pickle weight files at the top of `folder` (trainer state such as optimizer.pt excluded)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES and p.name not in NOT_WEIGHTS and p.is_file()
    )


def check_weights(folder: str | os.PathLike, what: str = "model") -> str:
    """'safetensors' (pickle files, if any, are ignored), 'pickle' (only pickle weights, and the policy allows
    them) or 'none'. Only pickle weights without --allow-pickle: BadInput naming the file."""
    folder = Path(folder)
    if any(folder.glob("*.safetensors")):
        return "safetensors"
    pickles = pickle_weights(folder)
    if not pickles:
        return "none"
    if not allow_pickle():
        raise BadInput(
            f"the {what}'s weights are only in pickle files ({', '.join(p.name for p in pickles[:3])}"
            f"{', …' if len(pickles) > 3 else ''}), which can run code when loaded",
            where=str(pickles[0]),
            hint=PICKLE_HINT,
        )
    return "pickle"


def load_pickle(path: Path) -> dict:
    """A pickle checkpoint's tensors, read with torch.load(weights_only=True): anything but tensors and plain
    containers is refused by torch's restricted unpickler, and we say so."""
    import pickle

    from medtune.core.errors import require

    torch = require("torch", "cuda", "reading pickle (.bin/.pt) weights")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        detail = next((ln.strip() for ln in first if "GLOBAL" in ln or "Unsupported" in ln), first[0] if first else "")
        raise BadInput(
            f"refused to unpickle {path.name}: it holds objects other than tensors, which would run code "
            f"({detail[:160]})",
            where=str(path),
            hint="do not use this file; ask its author for safetensors weights",
        ) from exc
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise BadInput(
            f"not a readable PyTorch checkpoint: {str(exc).splitlines()[0][:160] if str(exc) else exc}",
            where=str(path),
            hint="re-download the file, or use safetensors weights",
        ) from exc
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and set(obj) == {key} and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise BadInput(
            f"{path.name} is not a state dict of tensors",
            where=str(path),
            hint="use a checkpoint saved with save_pretrained, or safetensors weights",
        )
    return obj


def _safetensors_name(name: str) -> str:
    stem = name[: -len(Path(name).suffix)] if Path(name).suffix else name
    if stem.startswith("pytorch_model"):
        stem = "model" + stem[len("pytorch_model") :]
    return stem + ".safetensors"


def _folder_key(folder: Path) -> str:
    """Which folder, and which version of each of its top-level files (name, size, mtime)."""
    h = hashlib.sha256(str(folder.resolve()).encode())
    for p in sorted(folder.iterdir()):
        if p.is_file():
            st = p.stat()
            h.update(f"\0{p.name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _converted_names(pickles: list[Path], what: str) -> dict[str, str]:
    """Pickle file name -> safetensors file name, as the loaders look for them (model*.safetensors for mlx_lm,
    adapter_model.safetensors for PEFT)."""
    names = {p.name: _safetensors_name(p.name) for p in pickles}
    if what == "model" and len(pickles) == 1:
        return {pickles[0].name: "model.safetensors"}
    clash = len(set(names.values())) < len(names)
    if clash or (what == "model" and not all(n.startswith("model") for n in names.values())):
        return {p.name: f"model-{i:05d}-of-{len(pickles):05d}.safetensors" for i, p in enumerate(pickles, start=1)}
    return names


def safetensors_copy(folder: str | os.PathLike, what: str = "model") -> Path:
    """A copy of `folder` in the cache with its pickle weights converted to safetensors (made once per version
    of the files). Other top-level files are copied; the pickle files themselves are not."""
    from medtune.core import fsutil
    from medtune.core.paths import cache_dir

    folder = Path(folder)
    pickles = pickle_weights(folder)
    out = cache_dir() / "unpickled" / f"{safe_component(folder.name, 'model')}-{_folder_key(folder)}"
    stamp = out / ".medtune-unpickled.json"
    if stamp.is_file():
        return out
    names = _converted_names(pickles, what)
    from safetensors.torch import save_file

    with fsutil.atomic_dir(out) as tmp:
        for entry in folder.iterdir():  # check_links has vetted them
            if (
                entry.is_file()
                and entry.suffix.lower() not in PICKLE_SUFFIXES
                and not entry.name.endswith(".bin.index.json")
            ):
                shutil.copyfile(entry, tmp / entry.name)
        weight_map = {}
        for p in pickles:
            tensors = load_pickle(p)
            seen, clean = set(), {}
            for k, v in tensors.items():
                ptr = v.untyped_storage().data_ptr() if v.numel() else None
                clean[k] = v.detach().clone().contiguous() if ptr in seen else v.detach().contiguous()
                if ptr is not None:
                    seen.add(ptr)
                weight_map[k] = names[p.name]
            save_file(clean, str(tmp / names[p.name]), metadata={"format": "pt"})
            del tensors, clean
        if len(set(names.values())) > 1:
            fsutil.write_json(tmp / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
        fsutil.write_json(tmp / stamp.name, {"source": str(folder.resolve()), "converted": names, "what": what})
    return out


# ---- folders as a whole -------------------------------------------------------------------------------
def check_model_dir(folder: str | os.PathLike, what: str = "model") -> str:
    """Every check on a model folder before anything in it is loaded: symlinks, remote code, pickle weights.
    Returns check_weights' answer."""
    folder = Path(folder)
    check_links(folder, what)
    check_remote_code(folder, what)
    return check_weights(folder, what)


def model_dir_for_loading(folder: str | os.PathLike, what: str = "model") -> Path:
    """`folder` once checked, or its safetensors copy when it has only pickle weights (and they are allowed)."""
    folder = Path(folder)
    if check_model_dir(folder, what) == "pickle":
        return safetensors_copy(folder, what)
    return folder


def adapter_dir_for_loading(folder: str | os.PathLike) -> Path:
    """The same for an adapter folder (a missing folder is returned as is: its reader reports it)."""
    folder = Path(folder)
    if not folder.is_dir():
        return folder
    return model_dir_for_loading(folder, "adapter")


# ---- names and paths ----------------------------------------------------------------------------------
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def safe_name(value, what: str = "name", *, where: str | None = None, hint: str | None = None) -> str:
    """A name that becomes one file or folder name: letters, digits, '.', '_', '-', starting with a letter or
    digit (so never '', '.', '..', a path, or an absolute path), at most 128 characters."""
    if not isinstance(value, str) or not SAFE_NAME.fullmatch(value):
        raise BadInput(
            f"{what} {value!r} is not a safe file name",
            where=where,
            hint=hint or "letters, digits, '.', '_' and '-', starting with a letter or digit, e.g. medtune-run1",
        )
    return value


def safe_component(text: str, fallback: str = "unnamed") -> str:
    """A safe file name made from arbitrary text (a dataset spec, a Hub id): other characters become '_',
    leading dots and dashes go; `fallback` when nothing is left."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).lstrip("._-")[:128].rstrip(".")
    return name if SAFE_NAME.fullmatch(name or "") else fallback


def inside(root: str | os.PathLike, path: str | os.PathLike, what: str = "path") -> Path:
    """`path` (relative paths are taken under `root`) after checking that it resolves, symlinks followed,
    inside `root`. Returns it as given (joined to root), not resolved."""
    root = Path(root)
    full = root / path
    real_root = root.resolve()
    real = full.resolve()
    if real != real_root and real_root not in real.parents:
        raise BadInput(
            f"{what} {full} resolves to {real}, outside {root}",
            where=str(full),
            hint="use a plain name, and remove any symlink that leads elsewhere",
        )
    return full


HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


def check_hub_id(repo_id: str, what: str = "model") -> str:
    """ORG/NAME as the Hub allows it: no '..', '--', leading dots, extra slashes or absolute paths."""
    if (
        not isinstance(repo_id, str)
        or not HUB_ID.fullmatch(repo_id)
        or ".." in repo_id
        or "--" in repo_id
        or repo_id.endswith(".")
    ):
        raise BadInput(
            f"{repo_id!r} is not a valid {what} id",
            where=str(repo_id),
            hint="ORG/NAME: letters, digits, '.', '_' and '-', no '..' or '--'",
        )
    return repo_id


# ---- symlinks -----------------------------------------------------------------------------------------
def _hf_blobs(folder: Path) -> Path | None:
    """The blobs/ folder of a Hugging Face cache repo when `folder` is one of its snapshots."""
    snapshots = folder.parent
    repo = snapshots.parent
    if (
        snapshots.name == "snapshots"
        and repo.name.split("--", 1)[0] in ("models", "datasets", "spaces")
        and (repo / "blobs").is_dir()
    ):
        return (repo / "blobs").resolve()
    return None


def check_links(folder: str | os.PathLike, what: str = "model") -> None:
    """Refuse a folder with a top-level symlink that resolves outside it (its content would be read, and some of
    it copied into outputs), except a Hugging Face cache snapshot's links into its own repo's blobs/."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    real = folder.resolve()
    blobs = _hf_blobs(real)
    for entry in sorted(real.iterdir()):
        if not entry.is_symlink():
            continue
        target = Path(os.path.realpath(entry))
        if target == real or real in target.parents:
            continue
        if blobs is not None and blobs in target.parents:
            continue
        raise BadInput(
            f"{entry.name} in the {what} folder is a symlink to {target}, outside the folder",
            where=str(folder / entry.name),
            hint="copy the real file into the folder (medtune does not follow links that leave it)",
        )


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append to a log file without ever writing through a symlink: a link at `path` is replaced by a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        path.unlink()
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o666)
    with os.fdopen(fd, "a", encoding="utf-8") as fh:
        fh.write(text)
