"""Proof in the engine users run: llama-server (the engine inside Ollama ≥ 0.30), started with --jinja so it
renders the GGUF's own chat template with llama.cpp's C++ Jinja engine, as Ollama's native chat mode does.

Per chat-template family (SmolLM2/ChatML, Qwen2.5 ChatML, Qwen3 with think, both DeepSeek-R1-distill template
versions, Llama 3), on tiny random models built here (tests/families.py) and exported by medtune's writer:
- the prompt llama-server renders (/apply-template) equals the HF rendering training saw (a system prompt,
  several turns, a reasoning turn, and every prompt), and its token ids (/tokenize) equal the HF tokenizer's;
- its greedy continuation equals MLX's on the model the GGUF came from (medtune.eval.fidelity, runtime llama-server);
- it stops by itself on every end token of the family (eos, end-of-turn), with no client stop strings.
Plus: every pre-tokenizer registry entry loads in llama-server and tokenizes like HF, the server is shut down on
failure, and a prompt rendered differently is a failed verdict showing where.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medtune.eval.fidelity import fidelity
from medtune.export import export
from medtune.runtimes import tools
from medtune.runtimes.llama_server import LlamaServer

from families import CASES, make_model
from pretok_models import TRICKY_TEXTS, export_pretok_model

PROMPTS = [
    "What is a normal resting heart rate for adults?",
    "发烧39度怎么办？请给三条建议。",
    "Dose of ibuprofen 400mg x3/day, max 1200 mg?",
]
FAMILIES = ["smollm2", *CASES]


def test_llama_server_is_installed():
    """make test builds llama.cpp's tools (scripts/build_llama_cpp.sh); a missing one fails here, not skips."""
    for name in tools.TOOLS:
        assert tools.find(name) is not None, f"{name} not found: {tools.INSTALL_HINT}"
    info = tools.describe()
    assert all(t["version"] for t in info["tools"]), info


@pytest.fixture(scope="module")
def family_models(tmp_path_factory, smollm2_dir, tiny_llama_dir):
    """family name -> (HF folder, F32 GGUF), built and exported on first use."""
    root = tmp_path_factory.mktemp("server-families")
    cache = {}

    def get(name):
        if name not in cache:
            model_dir = (
                Path(tiny_llama_dir)
                if name == "smollm2"
                else make_model(root / name / "hf", Path(smollm2_dir), CASES[name])
            )
            res = export(
                model_dir,
                root / name / "out",
                f"s-{name}",
                quants=("f32",),
                modelfile_path=root / name / "out" / "Modelfile",
            )
            cache[name] = (model_dir, res.gguf_paths["f32"])
        return cache[name]

    return get


@pytest.mark.parametrize("name", FAMILIES)
def test_llama_server_renders_tokenizes_and_continues_like_training(family_models, name):
    model_dir, gguf = family_models(name)
    report = fidelity(model_dir, gguf, PROMPTS, tokens=16, runtime="llama-server")
    assert report.runtime == "llama-server" and report.file_type == "F32" and report.judged
    assert {t.name for t in report.templates} == {"system + user", "several turns", "reasoning turn"}
    for t in report.templates:
        assert t.rendered_equal, (t.name, t.render_diff)
        assert t.tokens_equal, (t.name, t.first_token_mismatch)
    for r in report.prompts:
        assert r.rendered_equal and r.tokens_equal, (r.prompt, r.render_diff, r.first_token_mismatch)
        assert r.continuation_equal or r.near_tie, (r.prompt, r.reason)
        assert len(r.gguf_tokens) == 16 or r.gguf_stopped
    assert report.passed, report.to_dict()


def _end_ids(model_dir: Path) -> dict[int, str]:
    """Every id the model may end a turn with: generation_config's eos ids and the tokenizer's eos token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    gen = json.loads((model_dir / "generation_config.json").read_text())
    ids = gen.get("eos_token_id")
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    ids.append(tok.convert_tokens_to_ids(tok.eos_token))
    return {i: tok.convert_ids_to_tokens(i) for i in dict.fromkeys(ids)}


def _always_emit(src: Path, dst: Path, token: int) -> Path:
    """A copy of an F32 GGUF whose next token is always `token`: every layer's output projection is zeroed (the
    hidden state is the token's embedding, normalised), every embedding row is the same vector e, and the output
    row of `token` is 3e (its logit 3x every other one). The tokenizer and template are untouched."""
    import gguf

    shutil.copy(src, dst)
    reader = gguf.GGUFReader(str(dst), "r+")
    t = {x.name: x for x in reader.tensors}
    e = np.random.RandomState(0).uniform(0.5, 1.5, t["token_embd.weight"].data.shape[1]).astype(np.float32)
    for name, x in t.items():
        if name.endswith(("attn_output.weight", "ffn_down.weight")):
            x.data[...] = 0
    out = t.get("output.weight", t["token_embd.weight"])
    t["token_embd.weight"].data[...] = e
    out.data[...] = e
    out.data[token] = 3 * e
    reader.data.flush()
    return dst


@pytest.mark.parametrize("name", FAMILIES)
def test_llama_server_stops_on_every_end_token_without_stop_strings(family_models, name, tmp_path):
    model_dir, gguf = family_models(name)
    ends = _end_ids(model_dir)
    assert len(ends) >= 1
    for token, text in ends.items():
        forced = _always_emit(gguf, tmp_path / f"emit-{token}.gguf", token)
        with LlamaServer(forced, ctx=512, kv_type="f32") as srv:
            prompt = srv.apply_template([{"role": "user", "content": "Hi"}])
            comp = srv.complete(prompt, n_predict=8)  # no "stop" in the request: only the GGUF's end ids
        assert comp.tokens == [token] and comp.stop_type == "eos", (name, text, comp)


def test_forced_model_really_continues_past_a_token_that_is_not_an_end(family_models, tmp_path):
    """The stop test above can fail: a token outside the end set is generated until n_predict."""
    model_dir, gguf = family_models("qwen2.5")
    forced = _always_emit(gguf, tmp_path / "emit-a.gguf", 64)  # an ordinary token
    with LlamaServer(forced, ctx=512, kv_type="f32") as srv:
        comp = srv.complete(srv.apply_template([{"role": "user", "content": "Hi"}]), n_predict=5)
    assert comp.tokens == [64] * 5 and comp.stop_type == "limit"


@pytest.mark.parametrize("entry", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_every_pretokenizer_entry_loads_in_llama_server_and_tokenizes_like_hf(entry, smollm2_dir, tmp_path):
    from transformers import AutoTokenizer

    from medtune.export import pretok

    assert set(pretok.REGISTRY) == {"gpt-2", "smollm", "llama-bpe", "qwen2"}  # a new entry gets a case here
    model_dir, path = export_pretok_model(tmp_path / entry, Path(smollm2_dir), entry)
    hf = AutoTokenizer.from_pretrained(str(model_dir))
    with LlamaServer(path, ctx=512) as srv:
        for text in TRICKY_TEXTS:
            assert srv.tokenize(text, add_special=False) == hf.encode(text, add_special_tokens=False), (entry, text)


def test_a_prompt_rendered_differently_fails_and_shows_where(family_models, tmp_path):
    """The GGUF carries another chat template than the tokenizer training used: the verdict fails, naming the
    first differing character, although weights and vocabulary are right."""
    import gguf as gguf_py

    from medtune.export.gguf_writer import write_gguf

    model_dir, _ = family_models("smollm2")
    changed = tmp_path / "hf"
    shutil.copytree(model_dir, changed)
    cfg = json.loads((changed / "tokenizer_config.json").read_text())
    cfg["chat_template"] = cfg["chat_template"].replace("<|im_start|>", "<|im_start|> ", 1)
    (changed / "tokenizer_config.json").write_text(json.dumps(cfg))
    bad = tmp_path / "bad.gguf"
    write_gguf(changed, bad, "f32", name="bad")
    assert "<|im_start|> " in str(gguf_py.GGUFReader(str(bad)).get_field("tokenizer.chat_template").contents())
    report = fidelity(model_dir, bad, PROMPTS[:1], tokens=4, runtime="llama-server")
    assert not report.passed
    assert not all(t.rendered_equal for t in report.templates)
    assert report.prompts[0].rendered_equal is False and report.prompts[0].render_diff.startswith("@")
    assert "llama-server renders the prompt differently" in report.prompts[0].reason


def test_server_is_shut_down_on_failure_and_on_exit(family_models):
    _, gguf = family_models("smollm2")
    with pytest.raises(RuntimeError):
        with LlamaServer(gguf, ctx=512) as srv:
            proc = srv.proc
            assert srv.running
            raise RuntimeError("boom")
    assert proc.poll() is not None and not srv.running


def test_a_gguf_the_server_cannot_load_is_one_clear_error(tmp_path):
    from medtune.core.errors import BadInput

    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 64)
    with pytest.raises(BadInput, match="llama-server exited"):
        with LlamaServer(bad, ctx=256, timeout=60):
            pass


def test_ctrl_c_during_fidelity_shuts_the_server_down(family_models, tmp_path):
    """SIGINT to the real `medtune eval fidelity` while llama-server answers: exit 130 and no server left behind."""
    import os
    import signal
    import subprocess
    import sys
    import time

    model_dir, gguf = family_models("smollm2")
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"Question {i}: what lowers fever in children?" for i in range(200)))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "medtune",
            "eval",
            "fidelity",
            str(model_dir),
            str(gguf),
            "--prompts",
            str(prompts),
            "--tokens",
            "32",
            "--runtime",
            "llama-server",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    server = None
    deadline = time.monotonic() + 120
    while server is None and time.monotonic() < deadline and proc.poll() is None:
        out = subprocess.run(["pgrep", "-f", f"llama-server -m {gguf}"], capture_output=True, text=True).stdout.split()
        server = int(out[0]) if out else None
        time.sleep(0.2)
    assert server is not None, proc.communicate()
    time.sleep(2)  # the comparison is under way
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    for _ in range(50):
        if not os.path.exists(f"/proc/{server}"):
            break
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{server}"), "llama-server outlived the interrupted command"


def test_a_null_log_probability_from_the_server_is_minus_infinity():
    """llama-server writes a probability that underflows to 0 as a null logprob (a very sure fine-tuned model):
    it is -inf, not a crash."""
    from medtune.runtimes.llama_server import _align

    res = {
        "completion_probabilities": [{"id": 7, "top_logprobs": [{"id": 7, "logprob": 0.0}, {"id": 3, "logprob": None}]}]
    }
    assert _align([7], res) == [[(7, 0.0), (3, float("-inf"))]]
