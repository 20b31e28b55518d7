"""Ollama: create a model from a medtune Modelfile, and ask it a question.

    create_from_modelfile("medtune-smol", "Modelfiles/sample.Modelfile")   # blob upload + /api/create
    run("medtune-smol", "What is the antidote for paracetamol overdose?")  # {"text", "eval_count", "done_reason"}

`create_from_modelfile` does what `ollama create NAME -f FILE` does, through the HTTP API, so it also
works against a remote server (--host) and reports progress in medtune's console:

1. read the Modelfile the way Ollama's parser does (medtune.export.modelfile.parse_modelfile) and turn
   it into the documented create request: FROM → a blob, TEMPLATE, SYSTEM, LICENSE, MESSAGE, and the
   PARAMETERs typed as Ollama's own client types them (floats, ints, bools, `stop` as a list); each
   ADAPTER (a llama.cpp LoRA GGUF, resolved like FROM) → a blob too;
2. hash each GGUF, the FROM one and every ADAPTER (sha256), and ask the server whether it has that blob
   (HEAD /api/blobs/sha256:…); upload it (POST /api/blobs/sha256:…) only when it does not, so a base
   shared by several adapters is sent once;
3. POST /api/create {model, files: {file name: digest}, adapters: {file name: digest}, template, system,
   parameters, license, messages} and follow its NDJSON status stream up to {"status": "success"}.

Step 2 uses plain HTTP (httpx, which the `ollama` client is built on): the client's
`create_blob` never asks whether the server already has the blob (so a multi-GB GGUF would be sent
again on every create), hashes the file a second time, and reports no upload progress. Step 3 and
`run` go through the `ollama` Python client (`Client.create`, `Client.chat`, `Client.generate`).

With `use_cli=True`, or when the server cannot be reached but an `ollama` executable is on PATH,
the `ollama` CLI does the work instead (`ollama create NAME -f FILE`, with OLLAMA_HOST set to the host).

Nothing here imports `ollama` or `httpx` at module level: `medtune --help` stays fast.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from medtune.core.errors import BadInput, MedtuneError, MissingDependency, ResourceError

DEFAULT_HOST = "http://127.0.0.1:11434"
DEFAULT_PORT = 11434
CONNECT_TIMEOUT = 5.0

# Ollama's model names, [host/][namespace/][kind/]model[:tag], checked by the rule Ollama enforces (its
# types/model ParseName and Name.IsValid): every part starts with an ASCII letter, digit or '_' and goes on with
# those, '-' and '.' (a namespace: no '.'; a host: ':' too, for a port), 1-80 characters (a host: 350); `kind` is
# one of NAME_KINDS; missing parts take Ollama's defaults; an empty part a separator promises ("ns/", "m:") is
# refused. `medtune export --name` and `medtune ollama create` check
# names with check_name.
NAME_KINDS = ("skill", "agent", "mcp")
NAME_DEFAULTS = {"host": "registry.ollama.ai", "namespace": "library", "tag": "latest"}
_NAME_PARTS = {
    "host": re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,349}"),
    "namespace": re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,79}"),
    "model": re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}"),
    "tag": re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}"),
}
_MISSING = "!"  # a part a separator promised but that is empty: never valid, and never replaced by a default
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")

# PARAMETER names and the JSON type Ollama gives each one (api.Options, read by api.FormatParams).
PARAM_TYPES: dict[str, type] = {
    **dict.fromkeys(
        (
            "num_ctx",
            "num_batch",
            "num_gpu",
            "main_gpu",
            "num_thread",
            "draft_num_predict",
            "num_keep",
            "seed",
            "num_predict",
            "top_k",
            "repeat_last_n",
        ),
        int,
    ),
    **dict.fromkeys(
        ("top_p", "min_p", "typical_p", "temperature", "repeat_penalty", "presence_penalty", "frequency_penalty"), float
    ),
    "use_mmap": bool,
    "stop": list,
}
# Accepted by Ollama's parser with a warning, and dropped.
DEPRECATED_PARAMS = (
    "penalize_newline",
    "low_vram",
    "f16_kv",
    "logits_all",
    "vocab_only",
    "use_mlock",
    "mirostat",
    "mirostat_tau",
    "mirostat_eta",
)
MESSAGE_ROLES = ("system", "user", "assistant")

Progress = Any  # a rich Progress (medtune.core.console.progress), or None


# ---- host -------------------------------------------------------------------------------------------
def resolve_host(host: str | None = None) -> str:
    """The server URL: `host`, else $OLLAMA_HOST, else http://127.0.0.1:11434.

    The same rules as Ollama's own clients: no scheme means http on port 11434; an explicit http:// or
    https:// without a port means 80 or 443; 0.0.0.0 (a listen address) means this machine."""
    from urllib.parse import urlsplit

    raw = (host or os.environ.get("OLLAMA_HOST") or "").strip() or DEFAULT_HOST
    has_scheme = "://" in raw
    parts = urlsplit(raw if has_scheme else f"http://{raw}")
    try:
        port = parts.port
    except ValueError as exc:
        port = exc
    if (
        parts.scheme not in ("http", "https")
        or isinstance(port, ValueError)
        or (parts.netloc and not parts.hostname and not parts.netloc.startswith(":"))
    ):
        raise BadInput(
            f"not an Ollama host URL: {raw!r}", hint="e.g. --host http://127.0.0.1:11434 or --host gpu-box:11434"
        )
    hostname = parts.hostname or "127.0.0.1"
    if hostname in ("0.0.0.0", "::"):
        hostname = "127.0.0.1"
    if port is None:
        port = DEFAULT_PORT if not has_scheme else (443 if parts.scheme == "https" else 80)
    if ":" in hostname:
        hostname = f"[{hostname}]"
    return f"{parts.scheme}://{hostname}:{port}{parts.path.rstrip('/')}"


def _unreachable(host: str, exc: BaseException | None = None) -> MissingDependency:
    why = f" ({type(exc).__name__})" if exc is not None else ""
    return MissingDependency(
        f"cannot reach Ollama at {host}{why}: is `ollama serve` running?",
        hint="start it with `ollama serve` (or the Ollama app), point --host (or OLLAMA_HOST) at "
        "the machine that runs it, or pass --use-cli to use the `ollama` command",
    )


# ---- the Modelfile as a create request --------------------------------------------------------------
@dataclass
class CreateSpec:
    """What a Modelfile asks Ollama to create, in the shape of the /api/create request."""

    modelfile: Path
    gguf: Optional[Path] = None  # FROM, when it names a local file
    from_model: Optional[str] = None  # FROM, when it names an existing Ollama model
    adapters: list = field(default_factory=list)  # ADAPTER files (Paths): LoRA GGUFs, in Modelfile order
    template: Optional[str] = None
    system: Optional[str] = None
    parameters: dict = field(default_factory=dict)
    license: list = field(default_factory=list)
    messages: list = field(default_factory=list)
    warnings: list = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["modelfile"], d["gguf"] = str(self.modelfile), str(self.gguf) if self.gguf else None
        d["adapters"] = [str(a) for a in self.adapters]
        return d


def _typed_param(name: str, value: str, where: str):
    kind = PARAM_TYPES.get(name)
    if kind is None:
        raise BadInput(
            f"unknown PARAMETER {name!r}", where=where, hint=f"Ollama knows: {', '.join(sorted(PARAM_TYPES))}"
        )
    try:
        if "_" in value:  # Python reads 4_096 as a number, Go does not
            raise ValueError(value)
        if kind is int:
            return int(value.strip(), 10)
        if kind is float:
            return float(value.strip())
        if kind is bool:
            low = value.strip().lower()
            if low in ("1", "t", "true"):
                return True
            if low in ("0", "f", "false"):
                return False
            raise ValueError(value)
    except ValueError as exc:
        raise BadInput(
            f"PARAMETER {name} has the value {value!r}, which is not {'an' if kind is int else 'a'} {kind.__name__}",
            where=where,
            hint="fix the value in the Modelfile",
        ) from exc
    return value  # stop: one string per line, gathered by the caller


def _looks_like_path(value: str) -> bool:
    """FROM names a file (rather than an Ollama model such as llama3.2 or hf.co/org/repo:Q4_K_M)."""
    return (
        value.startswith(("/", ".", "~", "\\"))
        or os.path.isabs(value)
        or value.lower().endswith((".gguf", ".bin", ".safetensors"))
    )


def resolve_from(value: str, modelfile_dir: str | Path, where: str | None = None, keyword: str = "FROM") -> Path:
    """The local path a FROM value names, by Ollama's rule (parser/parser.go, expandPath): absolute as it is;
    `~` or `~/…` under the home folder, `~user/…` under that user's; anything else joined to the Modelfile's
    folder. Lexically, as Go's filepath.Join/Abs do (`..` removes the previous part; symlinks are not
    followed). Whether the path exists decides, afterwards, if FROM is a file or a model name. ADAPTER
    paths are resolved the same way (`keyword` names the command in the error)."""
    if os.path.isabs(value) or value.startswith(("\\", "/")):
        return Path(os.path.abspath(value))
    if value.startswith("~"):
        expanded = os.path.expanduser(value)
        if expanded == value:  # ~user of no such user: Ollama refuses the Modelfile
            user = value[1:].split("/", 1)[0]
            raise BadInput(
                f"{keyword} names the home folder of {user!r}, and there is no such user: {value}",
                where=where,
                hint=f"fix the {keyword} line (a path relative to the Modelfile is safest)",
            )
        return Path(os.path.abspath(expanded))
    return Path(os.path.abspath(os.path.join(os.path.abspath(modelfile_dir), value)))


def _where(path: Path, text: str, name: str, nth: int = 0) -> str:
    """file:line of the line that starts the command (or PARAMETER) `name` for the `nth` time (0: the first),
    for error messages."""
    keyword = "FROM" if name == "model" else name
    pattern = re.compile(rf"\s*(?:PARAMETER\s+)?{re.escape(keyword)}\s", re.IGNORECASE)
    lines = [n for n, line in enumerate(text.splitlines(), start=1) if pattern.match(line)]
    if not lines:
        return str(path)
    return f"{path}:{lines[min(nth, len(lines) - 1)]}"


def _relative_hint(value: str, modelfile: Path, what: str) -> str:
    """For a path that names no file: how a relative one was resolved ("" for an absolute or ~ one)."""
    if Path(value).is_absolute() or value.startswith("~"):
        return ""
    return (
        f"a relative {what} is taken from the Modelfile's folder ({modelfile.parent.absolute()}): keep the "
        "GGUF where it names it (move or copy the two together), "
    )


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"GGUF"
    except OSError:
        return False


def _read_adapter(value: str, modelfile: Path, where: str, for_cli: bool = False) -> Path:
    """The LoRA GGUF an ADAPTER line names, resolved like FROM. Refused: a path that names nothing, and (unless
    the `ollama` CLI will read the Modelfile, and convert it) a folder or a file that is not a GGUF."""
    local = resolve_from(value, modelfile.parent, where, keyword="ADAPTER")
    if local.is_dir() and not for_cli:
        raise BadInput(
            f"ADAPTER names a folder ({local}); medtune creates Ollama models from GGUF adapters",
            where=where,
            hint=f"run `medtune export {local} --base MODEL` to write a GGUF adapter and name it in ADAPTER, "
            "or pass --use-cli to let `ollama create` convert the folder",
        )
    if not local.exists():
        raise BadInput(
            f"the adapter named by ADAPTER does not exist: {local}",
            where=where,
            hint=f"{_relative_hint(value, modelfile, 'ADAPTER')}run `medtune export` again, or fix the ADAPTER line",
        )
    if not for_cli and not (local.is_file() and _is_gguf(local)):
        raise BadInput(
            f"the adapter named by ADAPTER is not a GGUF file (no GGUF magic): {local}",
            where=where,
            hint="name a llama.cpp LoRA GGUF (`medtune export ADAPTER_DIR --base MODEL` writes one), or pass "
            "--use-cli to let `ollama create` convert a safetensors adapter",
        )
    return local.resolve()


def _add_adapter(spec: CreateSpec, adapter: Path, where: str) -> None:
    """The create request keys adapters by file name: two with the same name cannot both be sent."""
    twin = next((a for a in spec.adapters if a.name == adapter.name), None)
    if twin is not None:
        raise BadInput(
            f"two ADAPTER lines name files called {adapter.name!r} ({twin} and {adapter})",
            where=where,
            hint="Ollama's create request names each adapter by its file name: rename one of the files, "
            "or keep one ADAPTER line",
        )
    spec.adapters.append(adapter)


def read_modelfile(path: str | Path, *, for_cli: bool = False) -> CreateSpec:
    """Parse a Modelfile into a CreateSpec; FROM and ADAPTER are resolved like Ollama does (~ expanded, a
    relative path taken from the Modelfile's folder). Refuses what this client cannot send (DRAFT, a FROM
    folder, an ADAPTER folder or non-GGUF file) and a FROM or ADAPTER file that does not exist. for_cli: the
    `ollama` CLI reads the Modelfile, and converts an ADAPTER folder or safetensors file itself."""
    from medtune.export.modelfile import parse_modelfile

    path = Path(path).expanduser()
    if not path.is_file():
        raise BadInput(f"Modelfile not found: {path}", hint="`medtune export` writes one (Modelfiles/NAME.Modelfile)")
    try:
        text = path.read_text(encoding="utf-8")
        commands = parse_modelfile(text)
    except UnicodeDecodeError as exc:
        raise BadInput("the Modelfile is not UTF-8 text", where=str(path), hint="save it as UTF-8") from exc
    except ValueError as exc:
        raise BadInput(
            f"cannot parse the Modelfile: {exc}",
            where=str(path),
            hint="see https://docs.ollama.com/modelfile; `medtune export` writes a valid one",
        ) from exc

    spec = CreateSpec(modelfile=path.absolute())
    stops: list[str] = []
    seen: dict[str, int] = {}
    for name, value in commands:
        where = _where(path, text, name, seen.get(name, 0))
        seen[name] = seen.get(name, 0) + 1
        if name == "model":
            if spec.gguf or spec.from_model:
                raise BadInput("the Modelfile has more than one FROM", where=where, hint="keep one FROM line")
            local = resolve_from(value, path.parent, where)
            if local.is_file():
                spec.gguf = local.resolve()
            elif local.is_dir():
                raise BadInput(
                    f"FROM names a folder ({local}); medtune creates Ollama models from a GGUF file",
                    where=where,
                    hint="run `medtune export` to write a GGUF, or pass --use-cli to let "
                    "`ollama create` convert the folder",
                )
            elif _looks_like_path(value):
                rel = _relative_hint(value, path, "FROM")
                raise BadInput(
                    f"the GGUF named by FROM does not exist: {local}",
                    where=where,
                    hint=f"{rel}run `medtune export` again, or fix the FROM line",
                )
            else:
                spec.from_model = value
        elif name in ("template", "system"):
            setattr(spec, name, value or None)
        elif name == "license":
            spec.license.append(value)
        elif name == "message":
            role, _, content = value.partition(": ")
            if role not in MESSAGE_ROLES:
                raise BadInput(
                    f"MESSAGE role {role!r} is not one of {', '.join(MESSAGE_ROLES)}",
                    where=where,
                    hint="e.g. MESSAGE user What lowers fever?",
                )
            spec.messages.append({"role": role, "content": content})
        elif name == "adapter":
            _add_adapter(spec, _read_adapter(value, path, where, for_cli), where)
        elif name in ("draft", "renderer", "parser", "requires"):
            raise BadInput(
                f"{name.upper()} is not supported by `medtune ollama create`",
                where=where,
                hint="pass --use-cli to let `ollama create` read this Modelfile",
            )
        elif name in DEPRECATED_PARAMS:
            spec.warnings.append(f"PARAMETER {name} is deprecated in Ollama and was left out")
        elif name == "stop":
            stops.append(value)
        else:
            spec.parameters[name] = _typed_param(name, value, where)
    if stops:
        spec.parameters["stop"] = stops
    if spec.gguf is None and spec.from_model is None:
        raise BadInput(
            "the Modelfile has no FROM line",
            where=str(path),
            hint="FROM ./model.gguf (a path relative to the Modelfile's folder)",
        )
    return spec


# ---- HTTP helpers -----------------------------------------------------------------------------------
def _require_client():
    from medtune.core.errors import require

    return require("ollama", purpose="the Ollama API client")


def _server_error(status: int | None, text: str, action: str, name: str | None = None) -> MedtuneError:
    """A one-line MedtuneError for an error the server returned (`text`: its "error" field or body)."""
    import json

    try:  # a raw body {"error": "..."}
        text = json.loads(text).get("error", text)
    except (ValueError, AttributeError):
        pass
    text = " ".join(str(text).split()) or "no message"
    msg = f"Ollama refused to {action}: {text}" + (f" (HTTP {status})" if status and status > 0 else "")
    low = text.lower()
    if "no space left" in low or status == 507:
        return ResourceError(msg, hint="free disk space where Ollama keeps its models (OLLAMA_MODELS)")
    if status == 404 and name is not None and "not found" in low:
        return BadInput(msg, hint=f"create it first: medtune ollama create {name} --modelfile FILE")
    if status is not None and 400 <= status < 500:
        return BadInput(msg, hint="check the Modelfile and the model name; an older Ollama may need updating")
    return MedtuneError(msg, hint="see the Ollama server's log (`ollama serve` output, or ~/.ollama/logs)")


def _response_error(resp, action: str) -> MedtuneError:
    return _server_error(resp.status_code, resp.text, action)


def _http(host: str):
    import httpx

    return httpx.Client(base_url=host, timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT), follow_redirects=True)


def server_version(host: str | None = None) -> str:
    """GET /api/version; raises MissingDependency when nothing answers at `host`."""
    host = resolve_host(host)
    import httpx

    try:
        with _http(host) as http:
            resp = http.get("/api/version", timeout=CONNECT_TIMEOUT)
    except httpx.TransportError as exc:
        raise _unreachable(host, exc) from exc
    if resp.status_code != 200:
        raise MissingDependency(
            f"{host} answered /api/version with HTTP {resp.status_code}: is it an Ollama server?",
            hint="point --host (or OLLAMA_HOST) at `ollama serve`",
        )
    try:
        return str(resp.json().get("version", "unknown"))
    except ValueError as exc:
        raise MissingDependency(
            f"{host} answered /api/version with something that is not JSON: is it an Ollama server?",
            hint="point --host (or OLLAMA_HOST) at `ollama serve`",
        ) from exc


def _sha256(path: Path, progress: Progress = None) -> str:
    import hashlib

    size = path.stat().st_size
    task = progress.add_task(f"hashing {path.name}", total=size) if progress else None
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
            if progress:
                progress.advance(task, len(block))
    if progress:
        progress.remove_task(task)
    return f"sha256:{h.hexdigest()}"


def push_blob(
    path: str | Path, host: str | None = None, *, digest: str | None = None, progress: Progress = None
) -> dict:
    """Make sure the server has the file as a blob: HEAD /api/blobs/<digest>, then POST the bytes only if
    it answered 404. Returns {digest, uploaded, bytes}."""
    import httpx

    path, host = Path(path), resolve_host(host)
    digest = digest or _sha256(path, progress)
    size = path.stat().st_size
    url = f"/api/blobs/{digest}"
    try:
        with _http(host) as http:
            head = http.head(url)
            if head.status_code == 200:
                return {"digest": digest, "uploaded": False, "bytes": size}
            if head.status_code != 404:
                raise _response_error(head, f"check the blob {digest[:19]}…")
            task = progress.add_task(f"uploading {path.name}", total=size) if progress else None

            def chunks():
                with open(path, "rb") as fh:
                    while block := fh.read(1 << 22):
                        if progress:
                            progress.advance(task, len(block))
                        yield block

            resp = http.post(
                url, content=chunks(), headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"}
            )
            if progress:
                progress.remove_task(task)
    except httpx.TransportError as exc:
        raise _unreachable(host, exc) from exc
    if resp.status_code not in (200, 201):
        raise _response_error(resp, f"store the blob {digest[:19]}…")
    return {"digest": digest, "uploaded": True, "bytes": size}


# ---- create -----------------------------------------------------------------------------------------
def create_request(
    name: str, spec: CreateSpec, files: dict[str, str] | None = None, adapters: dict[str, str] | None = None
) -> dict:
    """The /api/create body for this Modelfile (keyword arguments of ollama.Client.create). files and adapters:
    {file name: "sha256:<digest>"} of the FROM GGUF and the ADAPTER GGUFs, pushed as blobs."""
    req: dict[str, Any] = {"model": name}
    if files:
        req["files"] = files
    if adapters:
        req["adapters"] = adapters
    if spec.from_model:
        req["from_"] = spec.from_model
    for key in ("template", "system"):
        if getattr(spec, key):
            req[key] = getattr(spec, key)
    if spec.parameters:
        req["parameters"] = dict(spec.parameters)
    if spec.license:
        req["license"] = spec.license if len(spec.license) > 1 else spec.license[0]
    if spec.messages:
        req["messages"] = list(spec.messages)
    return req


@dataclass(frozen=True)
class OllamaName:
    host: str
    namespace: str
    kind: str  # "" for a model
    model: str
    tag: str


def _cut_last(s: str, sep: str) -> tuple[str, str, bool]:
    """(before, after) the last `sep`, an empty side marked missing; (s, "", False) when there is none."""
    i = s.rfind(sep)
    if i < 0:
        return s, "", False
    return s[:i] or _MISSING, s[i + len(sep) :] or _MISSING, True


def _name_parts(name: str) -> dict:
    """The parts written in `name`, read from the right as Ollama reads them."""
    parts = {"host": "", "namespace": "", "kind": "", "model": "", "tag": ""}
    if name.rfind(":") > name.rfind("/"):  # '/' is never in a tag, so a ':' after the last '/' starts one
        name, parts["tag"], _ = _cut_last(name, ":")
    name, parts["model"], cut = _cut_last(name, "/")
    if not cut:
        return {**parts, "model": name}
    name, middle, cut = _cut_last(name, "/")
    if not cut:  # namespace/model
        return {**parts, "namespace": name}
    if middle not in NAME_KINDS:  # host/namespace/model
        return {**parts, "namespace": middle, "host": name.split("://", 1)[-1]}
    parts["kind"] = middle
    name, parts["namespace"], cut = _cut_last(name, "/")
    if not cut:
        return {**parts, "namespace": name}
    return {**parts, "host": name.split("://", 1)[-1]}


def parse_name(name) -> Optional[OllamaName]:
    """The parts of an Ollama model name, Ollama's defaults filled in, or None where Ollama refuses the name."""
    if not isinstance(name, str):
        return None
    parts = _name_parts(name)
    parts.update({k: parts[k] or v for k, v in NAME_DEFAULTS.items()})
    if not all(rule.fullmatch(parts[k]) for k, rule in _NAME_PARTS.items()):
        return None
    if parts["kind"] and parts["kind"] not in NAME_KINDS:
        return None
    return OllamaName(**parts)


def check_name(name: str, *, file_stem: bool = False) -> str:
    """`name` when Ollama accepts it as a model name, else a BadInput. file_stem: the name also names files
    (`medtune export` writes <name>-<quant>.gguf), so it cannot have a host or namespace ('/')."""
    if parse_name(name) is None:
        raise BadInput(
            f"model name {name!r} is not a valid Ollama name",
            hint="[namespace/]model[:tag]: ASCII letters, digits, '_', then also '-' and '.', at most 80 "
            "characters a part, e.g. medtune-smol:v1",
        )
    if file_stem and "/" in name:
        raise BadInput(
            f"model name {name!r} has a namespace, and export names its files after the model",
            hint="export under a plain name (medtune-smol:v1); `medtune ollama create ns/medtune-smol:v1 -f "
            "FILE` then creates it under any Ollama name",
        )
    return name


def create_from_modelfile(
    name: str,
    modelfile_path: str | Path,
    host: str | None = None,
    use_cli: bool = False,
    progress: Progress = None,
    on_status: Optional[Callable[[str], None]] = None,
) -> dict:
    """Create the Ollama model `name` from a Modelfile (normally one `medtune export` wrote).

    Everything that can be refused locally (name, Modelfile, a FROM or ADAPTER file that does not exist, an
    ADAPTER that is not a GGUF) is checked before the server is contacted. `progress` (a rich Progress) shows
    hashing, upload and the server's steps; `on_status(text)` gets each status line the server streams.
    Returns a dict: name, host, method ("api" or "cli"), digest, uploaded, bytes and gguf (the FROM blob),
    adapters ([{path, digest, uploaded, bytes}]), statuses, request (what was sent), warnings.
    """
    check_name(name)
    spec = read_modelfile(modelfile_path, for_cli=use_cli)
    host = resolve_host(host)
    cli = shutil.which("ollama")
    if use_cli:
        if not cli:
            raise MissingDependency(
                "the `ollama` command is not on PATH (--use-cli)",
                hint="install Ollama from https://ollama.com/download, or drop --use-cli to talk to a server (--host)",
            )
        return _create_with_cli(cli, name, spec, host, progress)
    try:
        version = server_version(host)
    except MissingDependency:
        if cli:
            result = _create_with_cli(cli, name, spec, host, progress)
            result["warnings"].append(f"Ollama did not answer at {host}; used the `ollama` command instead")
            return result
        raise
    ollama = _require_client()

    files, blob = None, None
    if spec.gguf is not None:
        blob = push_blob(spec.gguf, host, progress=progress)
        files = {spec.gguf.name: blob["digest"]}
    adapters = _push_adapters(spec, host, progress)
    request = create_request(name, spec, files, {Path(a["path"]).name: a["digest"] for a in adapters})
    statuses: list[str] = []
    task = progress.add_task(f"ollama create {name}", total=None) if progress else None
    client = ollama.Client(host=host)
    import httpx

    try:
        for part in client.create(**request, stream=True):
            status = part.status or ""
            statuses.append(status)
            if on_status:
                on_status(status)
            if progress:
                progress.update(
                    task,
                    description=f"ollama create {name}: {status}",
                    total=part.total or None,
                    completed=part.completed or 0,
                )
    except ollama.ResponseError as exc:
        raise _server_error(exc.status_code, exc.error, f"create {name!r}") from exc
    except (ConnectionError, httpx.TransportError) as exc:
        raise _unreachable(host, exc) from exc
    finally:
        client.close()
        if progress:
            progress.remove_task(task)
    if not statuses or statuses[-1] != "success":
        last = statuses[-1] if statuses else "nothing"
        raise MedtuneError(
            f"Ollama stopped creating {name!r} without success (last status: {last})",
            hint="see the Ollama server's log (`ollama serve` output, or ~/.ollama/logs)",
        )
    shown = {k: v for k, v in request.items() if k != "from_"} | ({"from": spec.from_model} if spec.from_model else {})
    return {
        "name": name,
        "host": host,
        "server_version": version,
        "method": "api",
        "modelfile": str(spec.modelfile),
        "gguf": str(spec.gguf) if spec.gguf else None,
        "digest": blob["digest"] if blob else None,
        "uploaded": bool(blob and blob["uploaded"]),
        "bytes": blob["bytes"] if blob else 0,
        "adapters": adapters,
        "statuses": statuses,
        "request": shown,
        "warnings": list(spec.warnings),
        "commands": [f"ollama run {name}"],
    }


def _push_adapters(spec: CreateSpec, host: str, progress: Progress = None) -> list[dict]:
    """Each ADAPTER GGUF as a blob (uploaded only when the server lacks it): [{path, digest, uploaded, bytes}]."""
    return [{"path": str(a), **push_blob(a, host, progress=progress)} for a in spec.adapters]


def _create_with_cli(cli: str, name: str, spec: CreateSpec, host: str, progress: Progress = None) -> dict:
    task = progress.add_task(f"ollama create {name} (CLI)", total=None) if progress else None
    env = {**os.environ, "OLLAMA_HOST": host}
    cmd = [cli, "create", name, "-f", str(spec.modelfile)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, errors="replace")
    except OSError as exc:
        raise MissingDependency(
            f"cannot run {cli}: {exc}", hint="reinstall Ollama from https://ollama.com/download"
        ) from exc
    finally:
        if progress:
            progress.remove_task(task)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + "\n" + proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.lower().startswith("error")]
        detail = (errors or lines or [f"exit code {proc.returncode}"])[-1]
        if "could not connect" in detail.lower() or "connection refused" in detail.lower():
            raise _unreachable(host)
        raise BadInput(
            f"`ollama create {name}` failed: {detail}",
            where=str(spec.modelfile),
            hint="check the Modelfile, and that `ollama serve` is running",
        )
    return {
        "name": name,
        "host": host,
        "method": "cli",
        "modelfile": str(spec.modelfile),
        "gguf": str(spec.gguf) if spec.gguf else None,
        "digest": None,
        "uploaded": None,
        "bytes": 0,
        "adapters": [{"path": str(a), "digest": None, "uploaded": None, "bytes": 0} for a in spec.adapters],
        "statuses": [ln for ln in proc.stdout.splitlines() if ln.strip()],
        "request": {"argv": cmd},
        "warnings": list(spec.warnings),
        "commands": [f"ollama run {name}"],
    }


# ---- run --------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    model: str
    text: str
    done_reason: Optional[str]  # "stop": the model ended its answer; "length": cut at num_predict
    eval_count: Optional[int]  # tokens generated
    prompt_eval_count: Optional[int]
    api: str  # "chat" or "generate"
    thinking: Optional[str] = None

    def to_dict(self) -> dict:
        return asdict(self)


def run(
    name: str,
    prompt: str,
    host: str | None = None,
    *,
    system: str | None = None,
    options: dict | None = None,
    api: str = "chat",
    stream: bool = True,
    on_text: Optional[Callable[[str], None]] = None,
) -> RunResult:
    """One answer from the Ollama model `name`: /api/chat (as `ollama run` does) or /api/generate.
    `options` are Ollama options for this request (temperature, num_predict, …); `on_text` gets the
    text as it streams in."""
    if api not in ("chat", "generate"):
        raise BadInput(f"unknown API {api!r}", hint="chat or generate")
    if not prompt or not prompt.strip():
        raise BadInput("no prompt given", hint="pass --prompt TEXT")
    check_name(name)
    host = resolve_host(host)
    ollama = _require_client()
    import httpx

    client = ollama.Client(host=host)
    opts = {k: v for k, v in (options or {}).items() if v is not None} or None
    try:
        if api == "chat":
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}
            ]
            parts = client.chat(model=name, messages=messages, options=opts, stream=stream)
        else:
            parts = client.generate(model=name, prompt=prompt, system=system, options=opts, stream=stream)
        parts = parts if stream else [parts]
        text, thinking, last = [], [], None
        for part in parts:
            src = part.message if api == "chat" else part
            piece = src.content if api == "chat" else src.response
            think = getattr(src, "thinking", None)  # ollama-python >= 0.5 only
            if piece:
                text.append(piece)
                if on_text:
                    on_text(piece)
            if think:
                thinking.append(think)
            last = part
    except ollama.ResponseError as exc:
        raise _server_error(exc.status_code, exc.error, f"answer with {name!r}", name=name) from exc
    except (ConnectionError, httpx.TransportError) as exc:
        raise _unreachable(host, exc) from exc
    finally:
        client.close()
    if last is None or not last.done:
        raise MedtuneError(
            f"Ollama's answer from {name!r} ended before it was done",
            hint="see the Ollama server's log (`ollama serve` output, or ~/.ollama/logs)",
        )
    return RunResult(
        model=name,
        text="".join(text),
        done_reason=getattr(last, "done_reason", None),
        eval_count=last.eval_count,
        prompt_eval_count=last.prompt_eval_count,
        api=api,
        thinking="".join(thinking) or None,
    )
