"""Export beyond F16: Q4_0 from our writer, K-quants from llama.cpp's quantizer, several types in one run,
`medtune gguf inspect`, and llama.cpp's converter as the fallback for architectures we do not know.

The model is a tiny random Llama with SmolLM2's tokenizer and rows of 256 values, so that K-quants use their
real 256-wide super-blocks (narrower rows make llama.cpp fall back to other types). Generation with
llama-cpp-python runs in a child process: its native library may die of SIGILL on a CPU it was not built
for when it runs quantized kernels (seen here with AMX); the test is then skipped, saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medtune.core.errors import BadInput, MedtuneError, MissingDependency
from medtune.export import export, inspect_gguf
from medtune.export.quantize import API_ENV, find_quantizer, parse_quants

from conftest import ROOT, make_tiny_llama, run_cli

PROMPT = "<|im_start|>user\nWhat is a normal resting heart rate?<|im_end|>\n<|im_start|>assistant\n"
N_GREEDY = 8

# Greedy continuation in a fresh process; prints "loaded" first, so that a crash shows where it happened.
_GREEDY = r"""
import json, sys
import numpy as np
import llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=256, verbose=False)
print("loaded", flush=True)
ids = llm.tokenize(sys.argv[2].encode("utf-8"), add_bos=False, special=True)
llm.eval(ids)
out = []
for _ in range(int(sys.argv[3])):
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    out.append(tok)
    llm.eval([tok])
print(json.dumps(out), flush=True)
"""


def greedy(path: Path, n: int = N_GREEDY) -> list[int]:
    pytest.importorskip("llama_cpp")
    res = subprocess.run(
        [sys.executable, "-c", _GREEDY, str(path), PROMPT, str(n)], capture_output=True, text=True, timeout=300
    )
    if res.returncode == -signal.SIGILL:
        loaded = "loaded" in res.stdout.splitlines()
        pytest.skip(
            f"llama-cpp-python's native library dies of SIGILL running {path.name} on this CPU "
            f"(a kernel built for instructions this CPU/kernel does not allow, e.g. AMX); the model "
            f"{'loaded' if loaded else 'did not even load'}"
        )
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.splitlines()[-1])


def _types(path) -> dict[str, str]:
    return {t["name"]: t["type"] for t in inspect_gguf(path)["tensors"]}


def _tensor(path, name: str, shape) -> np.ndarray:
    """One tensor, de-quantized, read at its offset (gguf.GGUFReader takes seconds on a 49k vocabulary)."""
    import gguf

    from medtune.export import read_gguf_header

    header = read_gguf_header(path)
    t = next(t for t in header["tensors"] if t["name"] == name)
    raw = np.fromfile(path, dtype=np.uint8, count=t["bytes"], offset=header["data_offset"] + t["offset"])
    qtype = gguf.GGMLQuantizationType[t["type"]]
    return gguf.quants.dequantize(raw.reshape(shape[0], -1), qtype).reshape(shape), t["type"]


@pytest.fixture(scope="module")
def model256(tmp_path_factory, smollm2_dir) -> Path:
    return make_tiny_llama(
        tmp_path_factory.mktemp("q") / "llama256", Path(smollm2_dir), hidden=256, heads=4, kv_heads=2, seed=7
    )


@pytest.fixture(scope="module")
def has_quantizer() -> bool:
    return find_quantizer() is not None


@pytest.fixture(scope="module")
def exported(model256, tmp_path_factory, has_quantizer):
    out = tmp_path_factory.mktemp("qout")
    quants = "f16,q8_0,q4_0" + (",q4_k_m" if has_quantizer else "")
    return export(model256, out, "tinyq", quants=quants, modelfile_path=out / "Modelfile")


def _need_kquant(exported):
    if "q4_k_m" not in exported.gguf_paths:
        pytest.skip("no llama.cpp quantizer here (llama-cpp-python or llama-quantize)")


@pytest.fixture(scope="module")
def llama_cpp_dir() -> Path:
    """A llama.cpp source tree: LLAMA_CPP_DIR, or vendor/llama.cpp of the installed llama-cpp-python's sdist."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from bench_export import llama_cpp_source

        return llama_cpp_source()
    except Exception as exc:  # noqa: BLE001 - any reason (no network, no llama-cpp-python) means: skip
        pytest.skip(f"no llama.cpp source tree (set LLAMA_CPP_DIR): {exc}")
    finally:
        sys.path.remove(str(ROOT / "scripts"))


def _with_arch(src: Path, dst: Path, arch: str) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["architectures"] = [arch]
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


# ---- types --------------------------------------------------------------------------------------------
def test_parse_quants():
    assert parse_quants(["f16,Q4_K_M", "q8_0", "f16"]) == ["f16", "q4_k_m", "q8_0"]
    assert parse_quants("q4_k, q6_k") == ["q4_k_m", "q6_k"]
    with pytest.raises(BadInput) as err:
        parse_quants("f16,q4_k_x")
    assert "q4_k_x" in str(err.value) and "q4_k_m" in err.value.hint and "q4_0" in err.value.hint


def test_file_and_tensor_types(exported):
    import gguf

    ft = gguf.LlamaFileType
    want = {"f16": ft.MOSTLY_F16, "q8_0": ft.MOSTLY_Q8_0, "q4_0": ft.MOSTLY_Q4_0, "q4_k_m": ft.MOSTLY_Q4_K_M}
    for q, path in exported.gguf_paths.items():
        info = inspect_gguf(path)
        assert info["file_type"] == int(want[q]) and info["file_type_name"] == q.upper(), q
        assert info["n_tensors"] == 20 and info["architecture"] == "llama"
        for t in info["tensors"]:
            if len(t["shape"]) == 1:
                assert t["type"] == "F32", (q, t)
    q8, q4 = _types(exported.gguf_paths["q8_0"]), _types(exported.gguf_paths["q4_0"])
    assert {v for k, v in q8.items() if not k.endswith("norm.weight")} == {"Q8_0"}
    # Q4_0: every matrix, except the tied embedding (it also makes the logits) which stays at 8 bits.
    assert q4.pop("token_embd.weight") == "Q8_0"
    assert {v for k, v in q4.items() if not k.endswith("norm.weight")} == {"Q4_0"}
    assert inspect_gguf(exported.gguf_paths["q4_0"])["metadata"]["general.quantization_version"] == 2
    # Nothing else in the folder: no temporary or intermediate files.
    out = exported.gguf_paths["f16"].parent
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["Modelfile", "README.md", "export_manifest.json", *(p.name for p in exported.gguf_paths.values())]
    )


def test_k_quant_types_and_values(exported, model256):
    _need_kquant(exported)
    from safetensors.numpy import load_file

    types = _types(exported.gguf_paths["q4_k_m"])
    assert types["token_embd.weight"] == "Q6_K"  # llama.cpp's choice for the (tied) output
    matrices = {v for k, v in types.items() if not k.endswith("norm.weight") and k != "token_embd.weight"}
    assert "Q4_K" in matrices and matrices <= {"Q4_K", "Q6_K"}
    summary = {s["outtype"]: s for s in exported.summaries}["q4_k_m"]
    assert summary["quantized_from"] == "f16" and summary["file_type"] == 15 and exported.quantizer
    # The values are the model's, within 4-bit precision (ffn_up: a tensor that is not permuted).
    hf = load_file(str(model256 / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"]
    got, qtype = _tensor(exported.gguf_paths["q4_k_m"], "blk.0.ffn_up.weight", hf.shape)
    assert qtype == "Q4_K"
    assert np.abs(got - hf).max() < np.abs(hf).max() / 6
    assert np.abs(got - hf).mean() < 0.1 * np.abs(hf).mean()


def test_q4_0_values(exported, model256):
    from safetensors.numpy import load_file

    hf = load_file(str(model256 / "model.safetensors"))
    for name, hf_name in (
        ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight"),
        ("token_embd.weight", "model.embed_tokens.weight"),
    ):
        want = hf[hf_name]
        got, qtype = _tensor(exported.gguf_paths["q4_0"], name, want.shape)
        # Q4_0 blocks of 32: scale max/8, so errors up to max/16; Q8_0: max/254.
        tol = np.abs(want).max() / (12 if qtype == "Q4_0" else 200)
        assert np.abs(got - want).max() < tol, name


def test_q4_0_needs_no_llama_cpp(model256, tmp_path, monkeypatch):
    monkeypatch.setenv(API_ENV, "0")
    monkeypatch.setenv("PATH", os.defpath)
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    res = export(model256, tmp_path, "solo", quants="q4_0", modelfile_path=tmp_path / "Modelfile")
    assert res.quantizer is None and _types(res.gguf_paths["q4_0"])["blk.0.attn_q.weight"] == "Q4_0"


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_0", "q4_k_m"])
def test_files_load_and_generate(exported, quant):
    if quant not in exported.gguf_paths:
        _need_kquant(exported)
    tokens = greedy(exported.gguf_paths[quant])
    assert len(tokens) == N_GREEDY and all(0 <= t < 49152 for t in tokens)


# ---- several types in one run, from one F16 --------------------------------------------------------------
def test_cli_f16_and_k_quant_from_one_f16(model256, exported, tmp_path):
    _need_kquant(exported)
    out = tmp_path / "both"
    res = run_cli(
        "export",
        model256,
        "--out",
        out,
        "--name",
        "tinyq",
        "--quant",
        "f16,q4_k_m",
        "-q",
        "Q4_K_M",
        "--modelfile",
        out / "Modelfile",
        "--json",
    )
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    assert list(result["gguf_paths"]) == ["f16", "q4_k_m"]
    assert sorted(p.name for p in out.iterdir()) == [
        "Modelfile",
        "README.md",  # the model card
        "export_manifest.json",
        "tinyq-f16.gguf",
        "tinyq-q4_k_m.gguf",
    ]
    # The same files as the library run with the same name (repeated and mixed --quant values change nothing).
    assert (out / "tinyq-q4_k_m.gguf").read_bytes() == exported.gguf_paths["q4_k_m"].read_bytes()
    assert (out / "tinyq-f16.gguf").read_bytes() == exported.gguf_paths["f16"].read_bytes()
    manifest = json.loads((out / "export_manifest.json").read_text())
    assert [g["outtype"] for g in manifest["result"]["gguf"]] == ["f16", "q4_k_m"]


def test_k_quant_alone_uses_a_temporary_f16(model256, exported, tmp_path):
    _need_kquant(exported)
    res = export(model256, tmp_path, "tinyq", quants="q4_k_m", modelfile_path=tmp_path / "Modelfile")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "Modelfile",
        "README.md",
        "export_manifest.json",
        "tinyq-q4_k_m.gguf",
    ]
    assert res.gguf_paths["q4_k_m"].read_bytes() == exported.gguf_paths["q4_k_m"].read_bytes()
    assert "FROM ./tinyq-q4_k_m.gguf\n" in res.modelfile_text  # relative to the Modelfile, as Ollama resolves it


def test_missing_quantizer_is_one_clear_error(model256, tmp_path):
    path = os.pathsep.join([os.path.dirname(sys.executable), os.defpath])
    if shutil.which("llama-quantize", path=path):
        pytest.skip("a llama-quantize is installed in a system folder")
    out = tmp_path / "out"
    res = run_cli(
        "export",
        model256,
        "--out",
        out,
        "--name",
        "x",
        "--quant",
        "f16,q4_k_m",  # no medtune build either
        env={API_ENV: "0", "PATH": path, "LLAMA_CPP_DIR": "", "MEDTUNE_CACHE": str(tmp_path / "cache")},
    )
    assert res.returncode == 3, res.stderr
    err = " ".join(res.stderr.split())
    assert "q4_k_m needs llama.cpp's quantizer" in err
    for needle in (
        "llama-cpp-python",
        "llama-quantize",
        "--llama-cpp",
        "LLAMA_CPP_DIR",
        "ollama create",
        "--quantize q4_K_M",
    ):
        assert needle in err, needle
    assert "Traceback" not in res.stderr
    assert not out.exists() or not any(out.iterdir())  # refused before anything was written, f16 included


def test_quantizer_failure_leaves_no_gguf(model256, tmp_path):
    if os.name == "nt":
        pytest.skip("the stand-in quantizer is a POSIX shell script")
    fake = tmp_path / "llama.cpp" / "build" / "bin" / "llama-quantize"  # a quantizer that fails half-way
    fake.parent.mkdir(parents=True)
    fake.write_text(
        '#!/bin/sh\necho "[   1/  20]  token_embd.weight"\necho partial > "$2"\n'
        'echo "llama_model_quantize: failed to quantize: out of cheese" >&2\nexit 1\n'
    )
    fake.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    (out / "x-f16.gguf").write_bytes(b"the previous good file")
    with pytest.raises(MedtuneError) as err:
        export(model256, out, "x", quants="f16,q4_k_m", llama_cpp_dir=tmp_path / "llama.cpp")
    assert "failed to quantize: out of cheese" in err.value.message and str(fake) in err.value.message
    assert "[   1/  20]" in err.value.hint
    # All or nothing: the new F16 was complete but is not put in place; the previous file is untouched.
    assert sorted(p.name for p in out.iterdir()) == ["x-f16.gguf"]
    assert (out / "x-f16.gguf").read_bytes() == b"the previous good file"


# ---- medtune gguf inspect ----------------------------------------------------------------------------------
def test_gguf_inspect_text_and_json(exported):
    path = exported.gguf_paths["q4_0"]
    res = run_cli("gguf", "inspect", path)
    assert res.returncode == 0, res.stderr
    text = res.stdout
    lines = {ln.split(None, 1)[0]: ln for ln in text.splitlines() if ln.strip()}
    assert "llama" in lines["architecture"]
    assert "Q4_0 (2)" in lines["file"]
    assert "tensors         20: F32 × 5" in text and "Q4_0 × 14" in text and "Q8_0 × 1" in text
    assert "bos / eos / eot" in lines["bos"] and "'<|im_end|>'" in lines["bos"] and lines["end"].split()[-1] == "2"
    assert "smollm" in text and "'<|im_end|>'" in text and "context length  1024" in text
    assert "first 8 of 20" in text and "token_embd.weight" in text

    res = run_cli("gguf", "inspect", path, "--json", "--tensors")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["architecture"] == "llama" and info["n_tensors"] == 20 == len(info["tensors"])
    assert info["tensor_types"] == {"F32": 5, "Q4_0": 14, "Q8_0": 1}
    assert info["file_type"] == 2 and info["file_type_name"] == "Q4_0"
    assert info["vocab_size"] == 49152 and info["context_length"] == 1024 and info["pre_tokenizer"] == "smollm"
    assert info["eos"] == {"id": 2, "text": "<|im_end|>"} and info["chat_template"] is True
    assert sum(info["tensor_bytes"].values()) == sum(t["bytes"] for t in info["tensors"])
    assert info["bytes"] == path.stat().st_size > sum(info["tensor_bytes"].values())

    res = run_cli("gguf", "inspect", exported.modelfile_path)
    assert res.returncode == 2 and "not a GGUF file" in res.stderr


def test_inspect_agrees_with_gguf_reader(exported):
    import gguf

    path = exported.gguf_paths["q4_k_m" if "q4_k_m" in exported.gguf_paths else "q4_0"]
    ours = inspect_gguf(path)
    reader = gguf.GGUFReader(str(path))
    assert [(t["name"], t["shape"], t["type"], t["bytes"]) for t in ours["tensors"]] == [
        (t.name, [int(d) for d in t.shape], t.tensor_type.name, int(t.n_bytes)) for t in reader.tensors
    ]
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        want = field.contents()
        if isinstance(want, list) and len(want) > 5:
            want = {"len": len(want), "head": want[:5]}
        if isinstance(want, float):
            want = pytest.approx(want)
        assert ours["metadata"][key] == want, key


# ---- llama.cpp's converter -------------------------------------------------------------------------------
def test_unsupported_architecture_without_checkout(model256, tmp_path, monkeypatch):
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    model = _with_arch(model256, tmp_path / "m", "NoSuchForCausalLM")
    out = tmp_path / "out"
    with pytest.raises(BadInput) as err:
        export(model, out, "x", quants="f16,q4_k_m")
    e = err.value
    assert "NoSuchForCausalLM" in e.message and "LlamaForCausalLM" in e.message
    assert "--converter llama.cpp" in e.hint and "--llama-cpp DIR" in e.hint and "LLAMA_CPP_DIR" in e.hint
    assert not out.exists()
    with pytest.raises(MissingDependency) as err:
        export(model256, out, "x", converter="llama.cpp")
    assert "--llama-cpp" in err.value.hint and not out.exists()


def test_llama_cpp_converter_fallback_generates_like_ours(model256, exported, llama_cpp_dir, tmp_path):
    pytest.importorskip("torch")
    from medtune.archs import REGISTRY

    # llama.cpp's converter knows the old spelling LLaMAForCausalLM (same model class); medtune's registry
    # does not, so `auto` falls back to llama.cpp.
    model = _with_arch(model256, tmp_path / "legacy", "LLaMAForCausalLM")
    converter = "llama.cpp" if "LLaMAForCausalLM" in REGISTRY else "auto"
    res = export(
        model,
        tmp_path / "out",
        "tinyq",
        quants="f16",
        modelfile_path=tmp_path / "out" / "Modelfile",
        llama_cpp_dir=llama_cpp_dir,
        converter=converter,
    )
    assert res.converter == "llama.cpp" and res.summaries[0]["converter"].startswith("llama.cpp")
    info = inspect_gguf(res.gguf_paths["f16"])
    assert info["architecture"] == "llama" and info["n_tensors"] == 20 and info["name"] == "tinyq"
    assert res.stops == exported.stops and res.family == exported.family
    assert greedy(res.gguf_paths["f16"]) == greedy(exported.gguf_paths["f16"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "Modelfile",
        "README.md",
        "export_manifest.json",
        "tinyq-f16.gguf",
    ]


def test_llama_cpp_converter_error_is_reported(model256, llama_cpp_dir, tmp_path):
    pytest.importorskip("torch")
    model = _with_arch(model256, tmp_path / "m", "NoSuchForCausalLM")
    out = tmp_path / "out"
    with pytest.raises(BadInput) as err:
        export(model, out, "x", quants="f16", llama_cpp_dir=llama_cpp_dir)
    assert "convert_hf_to_gguf.py" in err.value.message and "NoSuchForCausalLM" in err.value.message
    assert "last lines of its output" in err.value.hint and "--debug" in err.value.hint
    assert not out.exists() or not any(out.iterdir())


def test_vocab_read_back_from_gguf_matches_ours(exported, model256):
    """The Modelfile of a llama.cpp-converted model whose tokenizer medtune cannot read uses this."""
    from medtune.export.llamacpp import vocab_from_gguf
    from medtune.export.tokenizer import read_vocab

    got, want = vocab_from_gguf(exported.gguf_paths["f16"], model256), read_vocab(model256)
    assert got.tokens == want.tokens and got.token_types == want.token_types
    assert (got.bos_id, got.eos_id, got.add_bos, got.eos_ids) == (want.bos_id, want.eos_id, want.add_bos, want.eos_ids)
    assert got.chat_template == want.chat_template
