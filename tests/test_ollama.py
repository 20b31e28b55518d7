"""`medtune ollama create/run` against a local server that speaks Ollama's HTTP API.

Real Ollama is NOT tested here: it cannot be installed on these machines. `FakeOllama` below follows
the contract documented in Ollama's docs/api.md (and its server's checks where the docs are silent):
GET /api/version; HEAD /api/blobs/<digest> (200 present, 404 absent); POST /api/blobs/<digest> (the
bytes must hash to the digest, else 400; 201 when stored); POST /api/create (a valid model name,
`from` or `files`, every file and every `adapters` entry a known blob holding a GGUF, PARAMETERs of Ollama's types, an NDJSON
status stream that ends with {"status": "success"}; `from` is a model name, as Ollama takes a FROM that
names no existing file: a path is an invalid name, an unknown name fails as a pull from a registry that
has no such model); POST /api/generate and /api/chat (404 for an
unknown model; answers streamed as NDJSON, or one object with "stream": false; done_reason "stop" or
"length", eval_count). It is stricter than Ollama in one way: a field it does not know in a create
request is refused (Ollama ignores it), so that a misspelt key cannot pass unnoticed.

Generation is real: the server renders the prompt from the created model's TEMPLATE and SYSTEM (with
medtune's Go-template renderer), and llama-cpp-python runs the uploaded F16 GGUF, decoding greedily
(whatever the temperature, so answers are deterministic; no repeat penalty) until an end-of-generation
token, a stop string, or num_predict.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from medtune.core.errors import BadInput, MissingDependency
from medtune.export.modelfile import parse_modelfile

from conftest import run_cli

DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(?::[A-Za-z0-9_][A-Za-z0-9._-]*)?")
CREATE_FIELDS = {
    "model",
    "name",
    "from",
    "files",
    "adapters",
    "template",
    "license",
    "system",
    "parameters",
    "messages",
    "stream",
    "quantize",
    "renderer",
    "parser",
    "requires",
}
# api.Options in Ollama's Go source: the JSON type of each option.
OPTION_TYPES = {
    "num_keep": int,
    "seed": int,
    "num_predict": int,
    "top_k": int,
    "top_p": float,
    "min_p": float,
    "typical_p": float,
    "repeat_last_n": int,
    "temperature": float,
    "repeat_penalty": float,
    "presence_penalty": float,
    "frequency_penalty": float,
    "stop": list,
    "num_ctx": int,
    "num_batch": int,
    "num_gpu": int,
    "main_gpu": int,
    "use_mmap": bool,
    "num_thread": int,
}
PROMPT = "What is the first-line treatment for anaphylaxis?"


# A model name as Ollama parses one ([host/][namespace/]model[:tag], types/model/name.go): each part starts
# with a letter, digit or '_'; '.' is allowed in the host and model, not in the namespace.
FROM_NAME = re.compile(
    r"(?:[A-Za-z0-9_][A-Za-z0-9._:-]*/)?(?:[A-Za-z0-9_][A-Za-z0-9_-]*/)?"
    r"[A-Za-z0-9_][A-Za-z0-9._-]*(?::[A-Za-z0-9_][A-Za-z0-9._-]*)?"
)


def _with_tag(name: str) -> str:
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def _type_ok(kind, value) -> bool:
    if kind is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class FakeOllama(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.blobs: dict[str, Path] = {}
        self.models: dict[str, dict] = {}
        self.log: list[tuple[str, str]] = []
        self.creates: list[dict] = []
        self.answers: list[dict] = []  # what /api/generate and /api/chat answered: prompt, text, tokens
        self._llms: dict[str, object] = {}
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def llm(self, digest: str):
        import llama_cpp

        with self.lock:
            if digest not in self._llms:
                self._llms[digest] = llama_cpp.Llama(
                    model_path=str(self.blobs[digest]), n_ctx=1024, n_threads=1, verbose=False, seed=0
                )
            return self._llms[digest]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeOllama

    def log_message(self, *args):  # quiet
        pass

    # -- plumbing ---------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, obj=None):
        data = b"" if obj is None else json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, message: str):
        self._send(status, {"error": message})

    def _stream(self, parts):
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for part in parts:
            line = json.dumps(part).encode() + b"\n"
            self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    # -- routes -----------------------------------------------------------------------------------
    def do_GET(self):
        self.server.log.append(("GET", self.path))
        if self.path == "/api/version":
            return self._send(200, {"version": "0.12.6"})
        self._error(404, "404 page not found")

    def do_HEAD(self):
        self.server.log.append(("HEAD", self.path))
        m = re.fullmatch(r"/api/blobs/(.+)", self.path)
        if not m:
            return self._send(404)
        if not DIGEST.fullmatch(m.group(1)):
            return self._send(400)
        self._send(200 if m.group(1) in self.server.blobs else 404)

    def do_POST(self):
        self.server.log.append(("POST", self.path))
        body = self._body()
        m = re.fullmatch(r"/api/blobs/(.+)", self.path)
        if m:
            return self._blob(m.group(1), body)
        try:
            req = json.loads(body or b"null")
        except ValueError:
            return self._error(400, "invalid JSON body")
        if not isinstance(req, dict):
            return self._error(400, "missing request body")
        if self.path == "/api/create":
            return self._create(req)
        if self.path in ("/api/generate", "/api/chat"):
            return self._answer(req, chat=self.path == "/api/chat")
        self._error(404, "404 page not found")

    def _blob(self, digest: str, body: bytes):
        if not DIGEST.fullmatch(digest):
            return self._error(400, "invalid digest format")
        if digest in self.server.blobs:
            return self._send(200)
        got = "sha256:" + hashlib.sha256(body).hexdigest()
        if got != digest:
            return self._error(400, f"digest mismatch, expected {digest!r}, got {got!r}")
        path = self.server.root / digest.replace(":", "-")
        path.write_bytes(body)
        self.server.blobs[digest] = path
        self._send(201)

    def _create(self, req: dict):
        self.server.creates.append(req)
        unknown = set(req) - CREATE_FIELDS
        if unknown:
            return self._error(400, f"unknown fields {sorted(unknown)}")
        name = req.get("model") or req.get("name") or ""
        if not NAME.fullmatch(name):
            return self._error(400, "invalid model name")
        files = req.get("files")
        if not files and not req.get("from"):
            return self._error(400, "neither 'from' or 'files' was specified")
        gguf, base = None, {}
        if req.get("from"):
            # Ollama's client sends FROM as `from` when it names no existing file: the server takes it as a
            # model name. Not a valid name (a path such as ./x.gguf): refused. A name it does not have: it
            # pulls it from the registry; this server has none, and answers as Ollama does when the registry
            # has no such model (the error follows the "pulling manifest" status in the stream).
            source = req["from"]
            if not FROM_NAME.fullmatch(source):
                return self._error(400, "invalid model name")
            base = self.server.models.get(source) or self.server.models.get(_with_tag(source))
            if base is None:
                return self._stream(
                    [{"status": "pulling manifest"}, {"error": "pull model manifest: file does not exist"}]
                )
            gguf = base["gguf"]
        for field in ("files", "adapters"):
            wrong = self._check_blobs(req.get(field))
            if wrong:
                return self._error(400, wrong)
        for digest in (files or {}).values():
            gguf = digest
        for key in ("template", "system"):
            if key in req and not isinstance(req[key], str):
                return self._error(400, f"{key} must be a string")
        for key, value in (req.get("parameters") or {}).items():
            kind = OPTION_TYPES.get(key)
            if kind is None or not _type_ok(kind, value):
                return self._error(400, f"invalid parameter {key}={value!r}")
        for msg in req.get("messages") or []:
            if msg.get("role") not in ("system", "user", "assistant") or not isinstance(msg.get("content"), str):
                return self._error(400, f"invalid message {msg!r}")
        inherited = {k: base[k] for k in ("template", "system", "parameters") if base.get(k) and not req.get(k)}
        self.server.models[name] = {**req, **inherited, "gguf": gguf}
        statuses = ["parsing GGUF", f"using existing layer {gguf}"]
        statuses += [f"using existing layer {digest}" for digest in (req.get("adapters") or {}).values()]
        statuses += [
            f"creating new layer sha256:{hashlib.sha256(json.dumps(req.get(k)).encode()).hexdigest()}"
            for k in ("template", "system", "parameters")
            if req.get(k)
        ]
        statuses += ["writing manifest", "success"]
        if req.get("stream", True):
            return self._stream({"status": s} for s in statuses)
        self._send(200, {"status": "success"})

    def _check_blobs(self, named) -> str | None:
        """What is wrong with a `files` or `adapters` map {relative file name: digest of a GGUF blob}, or None."""
        if named is not None and not isinstance(named, dict):
            return "files and adapters map file names to digests"
        for fname, digest in (named or {}).items():
            if fname.startswith("/") or ".." in fname.split("/") or not fname:
                return "file path must be relative"
            if digest not in self.server.blobs:
                return f"blob {digest} not found: push it first (POST /api/blobs/{digest})"
            if not fname.endswith(".gguf") or self.server.blobs[digest].read_bytes()[:4] != b"GGUF":
                return "unknown model type: only GGUF files are supported here"
        return None

    def _answer(self, req: dict, chat: bool):
        from medtune.export.gotemplate import ollama_prompt

        name = req.get("model", "")
        model = self.server.models.get(name)
        if model is None:
            return self._error(404, f"model '{name}' not found")
        opts = {**(model.get("parameters") or {}), **(req.get("options") or {})}
        if chat:
            messages = req.get("messages") or []
            system = model.get("system")
        else:
            messages = [{"role": "user", "content": req.get("prompt", "")}]
            system = req.get("system") or model.get("system")
        prompt = ollama_prompt(model.get("template") or "{{ .Prompt }}", messages, system)
        llm = self.server.llm(model["gguf"])
        import llama_cpp

        with self.server.lock:
            ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
            vocab = llama_cpp.llama_model_get_vocab(llm.model)
            limit = opts.get("num_predict", 128)
            limit = 128 if limit is None or limit < 0 else limit
            stops = opts.get("stop") or []
            out, raw, reason = [], b"", "length"
            text = ""
            for tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
                if llama_cpp.llama_vocab_is_eog(vocab, tok):
                    out.append(int(tok))
                    reason = "stop"
                    break
                out.append(int(tok))
                raw += llm.detokenize([tok])
                text = raw.decode("utf-8", errors="ignore")
                cut = min((text.find(s) for s in stops if s in text), default=-1)
                if cut >= 0:
                    text, reason = text[:cut], "stop"
                    break
                if len(out) >= limit:
                    break
        self.server.answers.append(
            {
                "api": "chat" if chat else "generate",
                "prompt": prompt,
                "text": text,
                "tokens": out,
                "done_reason": reason,
            }
        )
        final = {
            "model": name,
            "created_at": "2026-01-01T00:00:00Z",
            "done": True,
            "done_reason": reason,
            "eval_count": len(out),
            "prompt_eval_count": len(ids),
            "total_duration": 1,
            "eval_duration": 1,
        }

        def piece(t: str) -> dict:
            base = {"model": name, "created_at": "2026-01-01T00:00:00Z", "done": False}
            return {**base, "message": {"role": "assistant", "content": t}} if chat else {**base, "response": t}

        if not req.get("stream", True):
            return self._send(200, {**piece(text), **final})
        chunks = [text[i : i + 7] for i in range(0, len(text), 7)]
        last = {**piece(""), **final}
        self._stream([piece(c) for c in chunks] + [last])


@pytest.fixture()
def server(tmp_path):
    srv = FakeOllama(tmp_path)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_llama_dir):
    """A tiny model exported by medtune: an F16 GGUF and the Modelfile that names it."""
    from medtune.export import export

    root = tmp_path_factory.mktemp("ollama")
    res = export(tiny_llama_dir, root / "out", "tiny", quants=("f16",), modelfile_path=root / "tiny.Modelfile")
    return {"gguf": res.gguf_paths["f16"], "modelfile": res.modelfile_path, "model_dir": tiny_llama_dir}


def _no_ollama_path(tmp_path) -> str:
    """A PATH without any `ollama` executable (so the CLI fallback cannot kick in)."""
    empty = tmp_path / "empty-bin"
    empty.mkdir(exist_ok=True)
    return f"{empty}{os.pathsep}{Path(sys.executable).parent}"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- create --------------------------------------------------------------------------------------------
def test_create_sends_the_blob_and_what_the_modelfile_says(server, exported, monkeypatch, tmp_path):
    from medtune.core.console import progress
    from medtune.core.fsutil import sha256_file
    from medtune.ollama import create_from_modelfile

    monkeypatch.setenv("PATH", _no_ollama_path(tmp_path))
    with progress(transient=True) as p:
        res = create_from_modelfile("tiny:test", exported["modelfile"], host=server.url, progress=p)
    digest = "sha256:" + sha256_file(exported["gguf"])
    assert res["method"] == "api" and res["uploaded"] is True and res["digest"] == digest
    assert res["statuses"][-1] == "success"
    assert server.blobs[digest].read_bytes() == exported["gguf"].read_bytes()
    assert ("HEAD", f"/api/blobs/{digest}") in server.log and ("POST", f"/api/blobs/{digest}") in server.log

    req = server.creates[-1]
    commands = parse_modelfile(exported["modelfile"].read_text())
    said = {}
    for key, value in commands:
        said.setdefault(key, []).append(value)
    assert req["model"] == "tiny:test"
    assert req["files"] == {exported["gguf"].name: digest}
    assert req["template"] == said["template"][0]
    assert req["system"] == said["system"][0]
    assert req["parameters"]["stop"] == said["stop"] == ["<|im_end|>", "<|im_start|>", "<|endoftext|>"]
    for key in ("temperature", "top_p", "repeat_penalty", "repeat_last_n", "num_ctx"):
        assert req["parameters"][key] == float(said[key][0])  # typed, not strings: the server checked the types
    assert isinstance(req["parameters"]["num_ctx"], int) and isinstance(req["parameters"]["temperature"], float)
    assert req.get("stream", True) is True and "from" not in req


def test_an_existing_blob_is_not_uploaded_again(server, exported, monkeypatch, tmp_path):
    from medtune.ollama import create_from_modelfile

    monkeypatch.setenv("PATH", _no_ollama_path(tmp_path))
    first = create_from_modelfile("tiny", exported["modelfile"], host=server.url)
    server.log.clear()
    second = create_from_modelfile("tiny:v2", exported["modelfile"], host=server.url)
    assert first["uploaded"] is True and second["uploaded"] is False
    assert not [entry for entry in server.log if entry[0] == "POST" and entry[1].startswith("/api/blobs/")]
    assert ("HEAD", f"/api/blobs/{second['digest']}") in server.log and "tiny:v2" in server.models


def test_create_cli_against_a_server_that_is_down(exported, tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}"
    res = run_cli(
        "ollama",
        "create",
        "tiny",
        "--modelfile",
        exported["modelfile"],
        "--host",
        url,
        env={"PATH": _no_ollama_path(tmp_path)},
    )
    assert res.returncode == MissingDependency.exit_code == 3, res.stderr
    assert f"cannot reach Ollama at {url}" in res.stderr and "is `ollama serve` running?" in res.stderr
    assert "--host" in res.stderr and "Traceback" not in res.stderr


def test_export_with_ollama_creates_the_model_in_one_command(server, tiny_llama_dir, tmp_path):
    out, mf = tmp_path / "out", tmp_path / "one.Modelfile"
    res = run_cli(
        "export",
        tiny_llama_dir,
        "--out",
        out,
        "--name",
        "one",
        "--modelfile",
        mf,
        "--ollama",
        "one:latest",
        "--host",
        server.url,
        "--json",
        env={"PATH": _no_ollama_path(tmp_path)},
    )
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["ollama"]["method"] == "api" and got["ollama"]["name"] == "one:latest"
    assert "one:latest" in server.models
    assert server.creates[-1]["files"] == {Path(got["gguf_paths"]["f16"]).name: got["ollama"]["digest"]}
    bad = run_cli(
        "export",
        tiny_llama_dir,
        "--out",
        tmp_path / "bad",
        "--ollama",
        "no spaces allowed",
        "--host",
        server.url,
        env={"PATH": _no_ollama_path(tmp_path)},
    )
    assert bad.returncode == 2 and not (tmp_path / "bad").exists()  # refused before exporting


def test_a_missing_gguf_fails_before_the_server_is_contacted(server, exported, tmp_path):
    text = exported["modelfile"].read_text()
    missing = tmp_path / "gone" / "tiny-f16.gguf"
    mf = tmp_path / "broken.Modelfile"
    mf.write_text(re.sub(r"(?m)^FROM .*$", f"FROM {missing}", text))
    res = run_cli(
        "ollama", "create", "tiny", "--modelfile", mf, "--host", server.url, env={"PATH": _no_ollama_path(tmp_path)}
    )
    assert res.returncode == BadInput.exit_code == 2, res.stderr
    assert "the GGUF named by FROM does not exist" in res.stderr and str(missing) in res.stderr.replace("\n", "")
    assert server.log == []


@pytest.fixture(scope="module")
def exported_runs(tmp_path_factory, tiny_llama_dir):
    """`medtune export` into a project: runs/r1/ (Modelfile beside gguf/) and models/r2/ + Modelfiles/r2.Modelfile."""
    root = tmp_path_factory.mktemp("project") / "proj"
    for out, name, mf in (
        (root / "runs" / "r1" / "gguf", "r1", root / "runs" / "r1" / "r1.Modelfile"),
        (root / "models" / "r2", "r2", root / "Modelfiles" / "r2.Modelfile"),
    ):
        res = run_cli("export", tiny_llama_dir, "--out", out, "--name", name, "--modelfile", mf, "--quant", "f16")
        assert res.returncode == 0, res.stderr
    return root


def test_a_moved_project_creates_from_its_relative_from(server, exported_runs, tmp_path):
    """The exported FROM is relative to the Modelfile's folder: once the project is moved (or copied to another
    machine), `medtune ollama create` run from any folder uploads the GGUF that sits beside the Modelfile."""
    moved = tmp_path / "elsewhere" / "proj"
    shutil.copytree(exported_runs, moved)
    env = {"PATH": _no_ollama_path(tmp_path)}
    cases = [
        ("r1", Path("elsewhere/proj/runs/r1/r1.Modelfile"), moved / "runs" / "r1" / "gguf" / "r1-f16.gguf"),
        ("r2", Path("elsewhere/proj/Modelfiles/r2.Modelfile"), moved / "models" / "r2" / "r2-f16.gguf"),
    ]
    for name, mf, gguf in cases:
        from_ = next(v for k, v in parse_modelfile((tmp_path / mf).read_text()) if k == "model")
        assert not Path(from_).is_absolute() and from_.startswith(("./", "../")), from_
        res = run_cli(
            "ollama", "create", name, "--modelfile", mf, "--host", server.url, "--json", cwd=tmp_path, env=env
        )  # run from tmp_path: the Modelfile's folder, not the working folder, counts
        assert res.returncode == 0, res.stderr
        got = json.loads(res.stdout)
        digest = "sha256:" + hashlib.sha256(gguf.read_bytes()).hexdigest()
        assert got["gguf"] == str(gguf.resolve()) and got["digest"] == digest
        assert server.creates[-1]["files"] == {gguf.name: digest} and name in server.models


def test_a_relative_from_whose_file_is_missing_is_refused_before_the_server(server, exported_runs, tmp_path):
    """A Modelfile moved without its GGUF: the relative FROM names a file that is not there. Ollama would take
    the path as a model name; medtune refuses it, naming where it looked, before contacting the server."""
    mf = tmp_path / "alone" / "r1.Modelfile"
    mf.parent.mkdir()
    shutil.copy(exported_runs / "runs" / "r1" / "r1.Modelfile", mf)
    res = run_cli(
        "ollama", "create", "r1", "--modelfile", mf, "--host", server.url, env={"PATH": _no_ollama_path(tmp_path)}
    )
    assert res.returncode == BadInput.exit_code == 2, res.stderr
    flat = " ".join(res.stderr.split())
    assert "the GGUF named by FROM does not exist" in flat
    assert str(tmp_path / "alone" / "gguf" / "r1-f16.gguf") in res.stderr.replace("\n", "")
    assert "relative FROM is taken from the Modelfile's folder" in flat and "Traceback" not in res.stderr
    assert server.log == []


def test_from_is_resolved_as_ollama_does(tmp_path, monkeypatch):
    """Ollama's rule (parser/parser.go expandPath): a relative FROM is joined to the Modelfile's folder
    lexically (`..` drops the previous part, even a symlink), `~` is the home folder; absolute stays."""
    from medtune.ollama import read_modelfile

    real = tmp_path / "real" / "deep"
    real.mkdir(parents=True)
    (tmp_path / "real" / "m.gguf").write_bytes(b"GGUF via the symlink target")
    folder = tmp_path / "mf"
    folder.mkdir()
    (folder / "m.gguf").write_bytes(b"GGUF beside the Modelfile")
    (folder / "link").symlink_to(real)
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / "h.gguf").write_bytes(b"GGUF")
    monkeypatch.setenv("HOME", str(home))
    mf = folder / "Modelfile"
    for value, want in (
        ("m.gguf", folder / "m.gguf"),
        ("./m.gguf", folder / "m.gguf"),
        ("link/../m.gguf", folder / "m.gguf"),
        ("./sub/../m.gguf", folder / "m.gguf"),
        ("~/models/h.gguf", home / "models" / "h.gguf"),
        (str(folder / "m.gguf"), folder / "m.gguf"),
    ):
        mf.write_text(f"FROM {value}\n")
        assert read_modelfile(mf).gguf == want.resolve(), value
    mf.write_text("FROM ~no-such-user-medtune/m.gguf\n")
    with pytest.raises(BadInput, match="no such user"):
        read_modelfile(mf)


def test_the_contract_server_takes_a_from_that_names_no_file_as_a_model_name(server, exported, monkeypatch, tmp_path):
    """As Ollama: `from` names a model. A path is an invalid name; an unknown name fails (it would be pulled
    from a registry that has no such model) and creates nothing; an existing model is built upon."""
    import httpx

    from medtune.core.errors import MedtuneError
    from medtune.ollama import create_from_modelfile

    monkeypatch.setenv("PATH", _no_ollama_path(tmp_path))
    with httpx.Client(base_url=server.url) as http:
        bad = http.post("/api/create", json={"model": "x", "from": "./gone/tiny-f16.gguf"})
        assert bad.status_code == 400 and bad.json() == {"error": "invalid model name"}
        unknown = http.post("/api/create", json={"model": "x", "from": "no-such-model"})
        lines = [json.loads(line) for line in unknown.text.splitlines()]
        assert lines[-1] == {"error": "pull model manifest: file does not exist"}
    assert "x" not in server.models

    mf = tmp_path / "from-name.Modelfile"
    mf.write_text("FROM no-such-model\nPARAMETER temperature 0.2\n")  # names no file: a model name
    with pytest.raises(MedtuneError, match="Ollama refused to create 'y': pull model manifest: file does not exist"):
        create_from_modelfile("y", mf, host=server.url)
    assert "y" not in server.models

    first = create_from_modelfile("tiny", exported["modelfile"], host=server.url)
    mf.write_text("FROM tiny\nPARAMETER temperature 0.2\n")
    res = create_from_modelfile("tiny-cold", mf, host=server.url)
    assert res["statuses"][-1] == "success" and server.creates[-1]["from"] == "tiny"
    assert server.models["tiny-cold"]["gguf"] == first["digest"]
    assert server.models["tiny-cold"]["template"] == server.models["tiny"]["template"]


def test_the_servers_refusal_is_shown(server, tmp_path, monkeypatch):
    """A file that is not a GGUF: the upload itself is fine (the digest matches), the create is refused."""
    from medtune.ollama import create_from_modelfile

    monkeypatch.setenv("PATH", _no_ollama_path(tmp_path))
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf at all")
    mf = tmp_path / "Modelfile"
    mf.write_text("FROM ./model.gguf\nPARAMETER temperature 0.2\n")  # relative to the Modelfile, as in Ollama
    with pytest.raises(BadInput, match="Ollama refused to create 'bad': unknown model type") as err:
        create_from_modelfile("bad", mf, host=server.url)
    assert "HTTP 400" in err.value.message
    assert "sha256:" + hashlib.sha256(b"not a gguf at all").hexdigest() in server.blobs


# ---- ADAPTER: LoRA GGUFs as blobs, sent as `adapters` ---------------------------------------------------
def _digest(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def _blob_posts(server) -> list[str]:
    return [p.removeprefix("/api/blobs/") for m, p in server.log if m == "POST" and p.startswith("/api/blobs/")]


@pytest.fixture()
def lora_project(tmp_path):
    """A base GGUF, two LoRA GGUFs (small files that start with the GGUF magic: the server does not parse them)
    and one Modelfile per adapter, in Modelfiles/, naming them relative to its folder."""
    files = {
        "base": tmp_path / "models" / "base-smollm2" / "smollm2-f16.gguf",
        "cardio": tmp_path / "models" / "cardio" / "cardio-lora-f16.gguf",
        "neuro": tmp_path / "models" / "neuro" / "neuro-lora-f16.gguf",
    }
    for key, path in files.items():
        path.parent.mkdir(parents=True)
        path.write_bytes(b"GGUF" + f"fake {key} weights".encode() * 50)
    (tmp_path / "Modelfiles").mkdir()
    for key in ("cardio", "neuro"):
        (tmp_path / "Modelfiles" / f"{key}.Modelfile").write_text(
            f"FROM ../models/base-smollm2/smollm2-f16.gguf\nADAPTER ../models/{key}/{key}-lora-f16.gguf\n"
            'TEMPLATE """{{ .Prompt }}"""\nPARAMETER temperature 0.2\n'
        )
    return {**files, "root": tmp_path, "modelfiles": tmp_path / "Modelfiles"}


def test_adapters_are_pushed_as_blobs_and_sent_as_adapters(server, lora_project, monkeypatch, tmp_path):
    """FROM base + ADAPTER: both GGUFs uploaded the first time, the create request names the base in `files`
    and the LoRA in `adapters` ({file name: digest}, Ollama's documented field)."""
    from medtune.ollama import create_from_modelfile

    monkeypatch.setenv("PATH", _no_ollama_path(tmp_path))
    base, cardio = lora_project["base"], lora_project["cardio"]
    res = create_from_modelfile("cardio", lora_project["modelfiles"] / "cardio.Modelfile", host=server.url)
    req = server.creates[-1]
    assert req["files"] == {"smollm2-f16.gguf": _digest(base)}
    assert req["adapters"] == {"cardio-lora-f16.gguf": _digest(cardio)}
    assert sorted(_blob_posts(server)) == sorted([_digest(base), _digest(cardio)])
    assert server.blobs[_digest(cardio)].read_bytes() == cardio.read_bytes()
    assert res["uploaded"] is True and res["digest"] == _digest(base) and res["bytes"] == base.stat().st_size
    assert res["adapters"] == [
        {"path": str(cardio.resolve()), "digest": _digest(cardio), "uploaded": True, "bytes": cardio.stat().st_size}
    ]
    assert res["request"]["adapters"] == req["adapters"] and res["statuses"][-1] == "success"
    assert server.models["cardio"]["adapters"] == req["adapters"]


def test_a_base_shared_by_adapters_is_uploaded_once(server, lora_project, tmp_path):
    """A second model on the same base with another adapter: the server has the base blob (HEAD says so), so
    only the new adapter is uploaded; a Modelfile with both adapters uploads nothing."""
    base, cardio, neuro = lora_project["base"], lora_project["cardio"], lora_project["neuro"]
    env = {"PATH": _no_ollama_path(tmp_path)}
    mfs = lora_project["modelfiles"]
    first = run_cli("ollama", "create", "cardio", "-f", mfs / "cardio.Modelfile", "--host", server.url, env=env)
    assert first.returncode == 0, first.stderr
    server.log.clear()
    res = run_cli("ollama", "create", "neuro", "-f", mfs / "neuro.Modelfile", "--host", server.url, "--json", env=env)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert _blob_posts(server) == [_digest(neuro)]
    assert ("HEAD", f"/api/blobs/{_digest(base)}") in server.log
    assert got["uploaded"] is False and got["adapters"][0]["uploaded"] is True
    assert server.creates[-1]["files"] == {base.name: _digest(base)}
    assert server.creates[-1]["adapters"] == {neuro.name: _digest(neuro)}

    both = mfs / "both.Modelfile"
    both.write_text(f"FROM {base}\nADAPTER ../models/cardio/{cardio.name}\nADAPTER ../models/neuro/{neuro.name}\n")
    server.log.clear()
    res = run_cli("ollama", "create", "both", "-f", both, "--host", server.url, "--json", env=env)
    assert res.returncode == 0, res.stderr
    assert _blob_posts(server) == [] and [a["uploaded"] for a in json.loads(res.stdout)["adapters"]] == [False] * 2
    assert server.creates[-1]["adapters"] == {cardio.name: _digest(cardio), neuro.name: _digest(neuro)}


def test_an_adapter_on_an_ollama_model(server, lora_project, monkeypatch, tmp_path):
    """FROM an existing Ollama model (not a local GGUF) with an ADAPTER: sent as `from` + `adapters`."""
    from medtune.ollama import create_from_modelfile

    monkeypatch.setenv("PATH", _no_ollama_path(tmp_path))
    mf = lora_project["root"] / "on-model.Modelfile"
    mf.write_text("FROM ./models/base-smollm2/smollm2-f16.gguf\n")
    create_from_modelfile("smol", mf, host=server.url)
    mf.write_text("FROM smol\nADAPTER ./models/cardio/cardio-lora-f16.gguf\n")
    res = create_from_modelfile("smol-cardio", mf, host=server.url)
    req = server.creates[-1]
    assert req["from"] == "smol" and "files" not in req and res["gguf"] is None
    assert req["adapters"] == {"cardio-lora-f16.gguf": _digest(lora_project["cardio"])}
    assert res["statuses"][-1] == "success" and res["adapters"][0]["uploaded"] is True


@pytest.mark.parametrize(
    "adapter, message, hint",
    [
        ("../models/gone/gone-lora.gguf", "the adapter named by ADAPTER does not exist", "relative ADAPTER is taken"),
        ("../models/peft-adapter", "ADAPTER names a folder", "--base MODEL` to write a GGUF adapter"),
        ("../models/peft-adapter/adapter_model.safetensors", "is not a GGUF file", "--use-cli"),
        ("../models/neuro/cardio-lora-f16.gguf", "two ADAPTER lines name files called", "rename one"),
    ],
    ids=["missing", "folder", "not-gguf", "same-name"],
)
def test_a_bad_adapter_is_refused_before_the_server(
    server, lora_project, monkeypatch, tmp_path, adapter, message, hint
):
    """Refused with the ADAPTER line (the second one here) as where, and nothing sent to the server."""
    from medtune.ollama import create_from_modelfile

    monkeypatch.setenv("PATH", _no_ollama_path(tmp_path))
    peft = lora_project["root"] / "models" / "peft-adapter"
    peft.mkdir()
    (peft / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (lora_project["root"] / "models" / "neuro" / "cardio-lora-f16.gguf").write_bytes(b"GGUF another")
    mf = lora_project["modelfiles"] / "bad.Modelfile"
    mf.write_text(
        "FROM ../models/base-smollm2/smollm2-f16.gguf\n"
        f"ADAPTER ../models/cardio/cardio-lora-f16.gguf\nADAPTER {adapter}\nPARAMETER temperature 0.2\n"
    )
    with pytest.raises(BadInput, match=re.escape(message)) as err:
        create_from_modelfile("bad", mf, host=server.url)
    assert err.value.where == f"{mf}:3" and hint in err.value.hint
    assert server.log == [] and server.creates == []


def test_adapters_are_read_like_from(tmp_path, monkeypatch):
    """ADAPTER is resolved by FROM's rule (~ expanded, relative to the Modelfile's folder), in Modelfile order."""
    from medtune.ollama import read_modelfile

    home = tmp_path / "home"
    (home / "loras").mkdir(parents=True)
    (home / "loras" / "h.gguf").write_bytes(b"GGUF h")
    (tmp_path / "mf" / "sub").mkdir(parents=True)
    (tmp_path / "mf" / "sub" / "a.gguf").write_bytes(b"GGUF a")
    (tmp_path / "mf" / "base.gguf").write_bytes(b"GGUF base")
    monkeypatch.setenv("HOME", str(home))
    mf = tmp_path / "mf" / "Modelfile"
    mf.write_text("FROM base.gguf\nADAPTER ~/loras/h.gguf\nadapter ./sub/../sub/a.gguf\n")
    spec = read_modelfile(mf)
    assert spec.adapters == [home / "loras" / "h.gguf", tmp_path / "mf" / "sub" / "a.gguf"]
    assert spec.to_dict()["adapters"] == [str(a) for a in spec.adapters]
    mf.write_text("FROM base.gguf\nADAPTER ~no-such-user-medtune/a.gguf\n")
    with pytest.raises(BadInput, match="ADAPTER names the home folder"):
        read_modelfile(mf)
    for refused in ("DRAFT ./sub/a.gguf", "REQUIRES 0.12.0"):  # still refused
        mf.write_text(f"FROM base.gguf\n{refused}\n")
        with pytest.raises(BadInput, match="is not supported by `medtune ollama create`"):
            read_modelfile(mf)


def test_the_ollama_cli_reads_adapters_itself(lora_project, tmp_path, monkeypatch):
    """--use-cli: `ollama create -f` reads ADAPTER (and converts a safetensors folder): medtune passes the
    Modelfile as it is and lists the adapters; an ADAPTER that names nothing is still refused first."""
    from medtune.ollama import create_from_modelfile

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "calls.jsonl"
    script = bin_dir / "ollama"
    script.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(record)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\nprint('success')\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}")
    peft = lora_project["root"] / "models" / "peft-adapter"
    peft.mkdir()
    mf = lora_project["modelfiles"] / "cli.Modelfile"
    mf.write_text(
        "FROM ../models/base-smollm2/smollm2-f16.gguf\nADAPTER ../models/cardio/cardio-lora-f16.gguf\n"
        "ADAPTER ../models/peft-adapter\n"
    )
    down = f"http://127.0.0.1:{_closed_port()}"
    res = create_from_modelfile("cardio", mf, host=down, use_cli=True)
    assert res["method"] == "cli" and [json.loads(line) for line in record.read_text().splitlines()] == [
        ["create", "cardio", "-f", str(mf.absolute())]
    ]
    assert [a["path"] for a in res["adapters"]] == [str(lora_project["cardio"].resolve()), str(peft.resolve())]
    with pytest.raises(BadInput, match="ADAPTER names a folder"):  # the API path cannot send a folder
        create_from_modelfile("cardio", mf, host=down)
    mf.write_text("FROM ../models/base-smollm2/smollm2-f16.gguf\nADAPTER ../models/gone.gguf\n")
    with pytest.raises(BadInput, match="the adapter named by ADAPTER does not exist"):
        create_from_modelfile("cardio", mf, host=down, use_cli=True)
    assert len(record.read_text().splitlines()) == 1


# Names the two former rules (ollama.py's and export's) disagreed on, and what Ollama's own parser (types/model
# ParseName + Name.IsValid) says of each: one rule now, medtune.ollama.check_name, for `ollama create` and export.
OLLAMA_NAMES = {
    "medtune-smol": True,
    "medtune-smol:v1": True,
    "m:_x": True,
    "m..x": True,
    "ns/medtune-smol:v1": True,
    "library/m": True,
    "registry.example.com/ns/m:t": True,  # old export: refused
    "localhost:5000/ns/m": True,
    "https://registry.example.com/ns/m": True,  # a host with a port, a scheme
    "ns/skill/m": True,  # a kind (skill, agent, mcp) between namespace and model
    "_m": True,
    "_ns/_m:_t": True,  # '_' may start a part: both old rules refused it
    "m:-x": False,
    "m:.x": False,  # a tag starts with a letter, digit or '_': old export accepted these
    "ns.x/m": False,  # no '.' in a namespace: old ollama.py accepted it
    "m" * 80: True,
    "m" * 81: False,
    "m:" + "t" * 81: False,  # 80 characters a part: both old rules took 81
    "": False,
    "m:": False,
    "/m": False,
    "ns/m/": False,
    "m:a:b": False,
    "x/y/z/w": False,
    "é": False,
    "a b": False,
}


@pytest.mark.parametrize("name, valid", OLLAMA_NAMES.items(), ids=[n[:24] or "empty" for n in OLLAMA_NAMES])
def test_ollama_names_follow_ollamas_rule(name, valid):
    from medtune.ollama import check_name, parse_name

    assert (parse_name(name) is not None) is valid
    if valid:
        assert check_name(name) == name
    else:
        with pytest.raises(BadInput, match="not a valid Ollama name"):
            check_name(name)


def test_names_get_ollamas_defaults_and_export_refuses_a_namespace(tmp_path):
    from medtune.export import export
    from medtune.ollama import OllamaName, check_name, parse_name

    assert parse_name("m") == OllamaName("registry.ollama.ai", "library", "", "m", "latest")
    assert parse_name("h:1/ns/m:t") == OllamaName("h:1", "ns", "", "m", "t")
    assert check_name("_m:v1", file_stem=True) == "_m:v1"
    with pytest.raises(BadInput, match="has a namespace"):
        check_name("ns/m", file_stem=True)
    # export checks with the same rule, before it looks at the model or writes anything
    for name, why in (("ns/m", "has a namespace"), ("m:-x", "not a valid Ollama name"), ("_m", "does not exist")):
        with pytest.raises(BadInput, match=why):
            export(
                tmp_path / "no-model", tmp_path / "gguf", name, quants=("f32",), modelfile_path=tmp_path / "m.Modelfile"
            )
    assert not (tmp_path / "gguf").exists()


def test_modelfile_values_are_typed_and_checked(tmp_path):
    from medtune.ollama import create_request, read_modelfile

    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    mf = tmp_path / "Modelfile"
    mf.write_text(
        'FROM m.gguf\nPARAMETER num_ctx 2048\nPARAMETER use_mmap false\nPARAMETER stop "A:"\n'
        'PARAMETER stop B\nLICENSE """Apache-2.0"""\nMESSAGE user Hi\nMESSAGE assistant Hello!\n'
    )
    spec = read_modelfile(mf)
    req = create_request("m", spec, {"m.gguf": "sha256:" + "0" * 64})
    assert req["parameters"] == {"num_ctx": 2048, "use_mmap": False, "stop": ["A:", "B"]}
    assert req["license"] == "Apache-2.0" and req["messages"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    mf.write_text("FROM m.gguf\nPARAMETER num_ctx lots\n")
    with pytest.raises(BadInput, match="num_ctx has the value 'lots'"):
        read_modelfile(mf)
    mf.write_text("FROM m.gguf\nPARAMETER temprature 0.1\n")
    with pytest.raises(BadInput, match="unknown PARAMETER 'temprature'"):
        read_modelfile(mf)


def test_the_ollama_cli_is_used_when_asked_or_when_no_server_answers(exported, tmp_path, monkeypatch):
    """A stand-in `ollama` executable records how it was called (this checks our call, not Ollama)."""
    from medtune.ollama import create_from_modelfile

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "calls.jsonl"
    script = bin_dir / "ollama"
    script.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"open({str(record)!r}, 'a').write(json.dumps([sys.argv[1:], os.environ.get('OLLAMA_HOST')]) + '\\n')\n"
        "print('success')\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}")
    down = f"http://127.0.0.1:{_closed_port()}"
    asked = create_from_modelfile("tiny", exported["modelfile"], host=down, use_cli=True)
    fallback = create_from_modelfile("tiny", exported["modelfile"], host=down)
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert asked["method"] == fallback["method"] == "cli"
    assert calls == [[["create", "tiny", "-f", str(exported["modelfile"])], down]] * 2
    assert any("used the `ollama` command" in w for w in fallback["warnings"])
    script.write_text("#!/bin/sh\necho 'Error: unsupported architecture \"bogus\"' >&2\nexit 1\n")
    with pytest.raises(BadInput, match='`ollama create tiny` failed: Error: unsupported architecture "bogus"'):
        create_from_modelfile("tiny", exported["modelfile"], host=down, use_cli=True)


# ---- run -----------------------------------------------------------------------------------------------
@pytest.fixture()
def created(server, exported, monkeypatch, tmp_path):
    pytest.importorskip("llama_cpp")
    from medtune.ollama import create_from_modelfile

    monkeypatch.setenv("PATH", _no_ollama_path(tmp_path))
    create_from_modelfile("tiny", exported["modelfile"], host=server.url)
    return server


def test_ollama_run_prints_the_answer(created, exported, tmp_path):
    """The answer the CLI prints is the one the server generated from the prompt that the Modelfile's
    TEMPLATE and SYSTEM build, which is the HF chat template's prompt; and (greedy, F16) it equals the
    fused MLX model's own greedy answer."""
    from transformers import AutoTokenizer

    res = run_cli(
        "ollama",
        "run",
        "tiny",
        "--prompt",
        PROMPT,
        "--host",
        created.url,
        "--max-tokens",
        "12",
        env={"PATH": _no_ollama_path(tmp_path)},
    )
    assert res.returncode == 0, res.stderr
    answer = created.answers[-1]
    assert answer["api"] == "chat" and len(answer["tokens"]) == 12 and answer["done_reason"] == "length"
    assert res.stdout == answer["text"] + ("" if answer["text"].endswith("\n") else "\n")
    assert "12 tokens, finish length" in res.stderr and "cut off" in res.stderr
    tok = AutoTokenizer.from_pretrained(exported["model_dir"])
    messages = [{"role": "user", "content": PROMPT}]
    assert answer["prompt"] == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    from medtune.runtimes.mlx import generate, load

    model, tokenizer = load(str(exported["model_dir"]))
    mlx = generate(model, tokenizer, messages, max_tokens=12, temp=0.0, repeat_penalty=1.0)
    # mlx_lm's streaming detokenizer drops the leading space of the first token; llama.cpp keeps it
    assert mlx.tokens == 12 and mlx.text.lstrip() == answer["text"].lstrip()


def test_run_json_and_the_generate_api(created, tmp_path):
    from medtune.ollama import run

    res = run_cli(
        "ollama",
        "run",
        "tiny",
        "-p",
        PROMPT,
        "--host",
        created.url,
        "--max-tokens",
        "5",
        "--json",
        env={"PATH": _no_ollama_path(tmp_path)},
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["text"] == created.answers[-1]["text"] and out["eval_count"] == 5 and out["done_reason"] == "length"

    streamed = []
    gen = run("tiny", PROMPT, host=created.url, api="generate", options={"num_predict": 5}, on_text=streamed.append)
    assert gen.text == "".join(streamed) == out["text"] and gen.api == "generate"  # same prompt either way
    whole = run("tiny", PROMPT, host=created.url, stream=False, options={"num_predict": 5})
    assert whole.text == out["text"] and whole.eval_count == 5
    stop_at = out["text"][2:4]
    if stop_at.strip():  # a stop string cuts the answer before it, done_reason "stop"
        cut = run("tiny", PROMPT, host=created.url, options={"num_predict": 5, "stop": [stop_at]})
        assert cut.done_reason == "stop" and cut.text == out["text"][: out["text"].find(stop_at)]
    with pytest.raises(BadInput, match="model 'nope' not found"):
        run("nope", PROMPT, host=created.url)
