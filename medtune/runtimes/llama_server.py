"""llama-server, the engine inside current Ollama, driven over its HTTP API on a loopback port.

    with LlamaServer(gguf) as srv:
        prompt = srv.apply_template(messages)            # the GGUF's own chat template, llama.cpp's Jinja engine
        ids = srv.tokenize(prompt)                       # BOS added, special tokens parsed: what the model is fed
        out = srv.complete(prompt, n_predict=32)         # greedy, no client stop strings
        out = srv.greedy(prompt, 32)                     # the same, as the other runtimes' greedy() returns it

The server is started with `--jinja` (so the GGUF's `tokenizer.chat_template` is rendered as Ollama ≥ 0.30's
native chat mode renders it) on a free port on 127.0.0.1, and is always shut down: on leaving the `with`
block, on an exception, on Ctrl-C, and (atexit) when the interpreter exits.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from threading import Thread

from medtune.core.errors import BadInput, MedtuneError
from medtune.runtimes.decoding import Greedy
from medtune.runtimes.llamacpp import threads

START_TIMEOUT = 120.0
_live: set = set()  # servers not yet shut down, for the atexit guard


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Completion:
    text: str
    tokens: list[int]  # generated ids, the end-of-generation token excluded (the server does not return it)
    stop_type: str  # "eos" (an end-of-generation token), "limit" (n_predict reached), "word", "none"
    # per generated token: [(id, logprob), …] best first, or None where the server gave none (it drops the
    # probabilities of a token that ends inside a UTF-8 character, e.g. the first byte of a Chinese character)
    top: list[list[tuple[int, float]] | None] = field(default_factory=list)

    @property
    def stopped(self) -> bool:
        return self.stop_type == "eos"


class LlamaServer:
    def __init__(
        self,
        gguf: str | Path,
        *,
        ctx: int = 2048,
        llama_cpp_dir: str | Path | None = None,
        n_threads: int | None = None,
        kv_type: str | None = None,
        extra: list[str] | None = None,
        timeout: float = START_TIMEOUT,
    ):
        from medtune.runtimes import tools

        self.gguf = Path(gguf)
        if not self.gguf.is_file():
            raise BadInput(
                f"GGUF not found: {self.gguf}", hint="`medtune export` writes models/<run>/<name>-<quant>.gguf"
            )
        self.binary = tools.require("llama-server", llama_cpp_dir, purpose="the engine Ollama runs GGUFs in")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [
            str(self.binary),
            "-m",
            str(self.gguf),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--jinja",
            "-c",
            str(ctx),
            "-np",
            "1",
            "-t",
            str(n_threads or threads()),
            "--no-webui",
        ]
        if kv_type:
            self.cmd += ["--cache-type-k", kv_type, "--cache-type-v", kv_type]
        self.cmd += list(extra or [])
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None
        self._log: deque[str] = deque(maxlen=60)

    # ---- life cycle --------------------------------------------------------------------------------
    def __enter__(self) -> "LlamaServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        _live.add(self)
        Thread(target=self._drain, daemon=True).start()
        try:
            self._wait_healthy()
        except BaseException:
            self.close()
            raise

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self._log.append(line.rstrip())

    def log_tail(self, n: int = 8) -> str:
        return " | ".join(list(self._log)[-n:])

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                time.sleep(0.2)  # let the reader thread take the last lines
                raise BadInput(
                    f"llama-server exited ({self.proc.returncode}) while loading the GGUF: {self.log_tail()}",
                    where=str(self.gguf),
                    hint="a GGUF llama.cpp cannot load: re-export it with `medtune export`",
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError, ValueError):
                pass
            time.sleep(0.15)
        raise MedtuneError(
            f"llama-server did not become healthy within {self.timeout:.0f} s: {self.log_tail()}",
            hint="a slow or busy machine: try again, or pass a smaller GGUF",
        )

    def close(self) -> None:
        proc, self.proc = self.proc, None
        _live.discard(self)
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ---- the API -----------------------------------------------------------------------------------
    def post(self, path: str, body: dict, timeout: float = 600) -> dict:
        req = urllib.request.Request(
            f"{self.url}{path}",
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300]
            raise BadInput(
                f"llama-server refused {path} ({exc.code}): {detail}",
                where=str(self.gguf),
                hint="the GGUF's chat template or vocabulary is not what llama.cpp expects",
            ) from exc
        except (urllib.error.URLError, OSError) as exc:
            raise MedtuneError(
                f"llama-server stopped answering on {path}: {exc}; {self.log_tail()}",
                hint="see the server's last lines above",
            ) from exc

    def apply_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt llama-server renders from the GGUF's own chat template (llama.cpp's Jinja engine)."""
        body = {"messages": messages, "add_generation_prompt": add_generation_prompt, **kwargs}
        return self.post("/apply-template", body)["prompt"]

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        res = self.post("/tokenize", {"content": text, "add_special": add_special, "parse_special": parse_special})
        return [t if isinstance(t, int) else t["id"] for t in res["tokens"]]

    def complete(self, prompt: str | list[int], n_predict: int = 32, n_probs: int = 4, **options) -> Completion:
        """Greedy (temperature 0, no repeat penalty), with no client stop strings: the generation ends on the
        GGUF's end-of-generation tokens or at n_predict."""
        body = {
            "prompt": prompt,
            "n_predict": n_predict,
            "temperature": 0.0,
            "top_k": 1,
            "repeat_penalty": 1.0,
            "cache_prompt": False,
            "return_tokens": True,
            "n_probs": n_probs,
            "stream": False,
            "seed": 0,
            **options,
        }
        res = self.post("/completion", body)
        tokens = [int(t) for t in res.get("tokens") or []]
        return Completion(
            text=res.get("content", ""),
            tokens=tokens,
            top=_align(tokens, res),
            stop_type=res.get("stop_type") or ("eos" if res.get("stopped_eos") else "none"),
        )

    def greedy(self, prompt: str | list[int], max_tokens: int, *, n_probs: int = 4) -> Greedy:
        """`complete` as the other runtimes' greedy returns it (medtune.runtimes.decoding.Greedy): no repeat
        penalty (the server's greedy), ending only on the GGUF's end-of-generation tokens, which the server does
        not return (end_in_tokens is False). `rows` holds the server's top `n_probs` (id, logprob) pairs per token
        (None where it gave none) in place of full logits."""
        comp = self.complete(prompt, n_predict=max_tokens, n_probs=n_probs)
        return Greedy(comp.tokens, comp.stopped, comp.top, end_in_tokens=False)


def _logprob(value) -> float:
    return float("-inf") if value is None else float(value)


def _align(tokens: list[int], res: dict) -> list:
    """The probability entries matched to the generated tokens they belong to (entries carry their token id and
    come in order, but not one per token)."""
    top: list = [None] * len(tokens)
    j = 0
    for entry in res.get("completion_probabilities") or []:
        while j < len(tokens) and tokens[j] != int(entry.get("id", -1)):
            j += 1
        if j == len(tokens):
            break
        # a probability that underflows to 0 comes back as a null log-probability (JSON has no -inf): a very sure
        # fine-tuned model gives those for every candidate but its pick
        top[j] = [(int(p["id"]), _logprob(p.get("logprob"))) for p in entry.get("top_logprobs") or []]
        j += 1
    return top


@atexit.register
def _shutdown_all() -> None:
    for srv in list(_live):
        srv.close()
