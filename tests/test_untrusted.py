"""Untrusted files: medtune never runs a model's or a dataset's code, never unpickles without being told, never
writes outside the output folder, never lets a value add Modelfile instructions or GGUF keys, and never writes a
Hub token into its files. Every model here is a tiny random Llama (conftest `tiny_llama_dir`); nothing downloads.
"""

from __future__ import annotations

import ast
import json
import os
import secrets
import shutil
import string
from pathlib import Path

import pytest

from medtune.core import fsutil, jsonl, redact, safety
from medtune.core.errors import BadInput

from conftest import ROOT, SAMPLE, run_cli

# ---- fixtures -----------------------------------------------------------------------------------------------
MODELING_EVIL = """\
open({marker!r}, "a").write("modeling_evil imported\\n")
from transformers import LlamaConfig, LlamaForCausalLM


class EvilConfig(LlamaConfig):
    pass


class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
"""

TOKENIZATION_EVIL = """\
open({marker!r}, "a").write("tokenization_evil imported\\n")
from transformers import PreTrainedTokenizerFast


class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(changes)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def _evil(folder: Path, marker: Path, *, config: bool = True, tokenizer: bool = True) -> Path:
    """A model folder whose configs ask for its own code; importing that code writes `marker`."""
    (folder / "modeling_evil.py").write_text(MODELING_EVIL.format(marker=str(marker)), encoding="utf-8")
    (folder / "tokenization_evil.py").write_text(TOKENIZATION_EVIL.format(marker=str(marker)), encoding="utf-8")
    if config:
        _edit_json(
            folder / "config.json",
            auto_map={
                "AutoConfig": "modeling_evil.EvilConfig",
                "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
            },
        )
    if tokenizer:
        _edit_json(
            folder / "tokenizer_config.json",
            auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", "tokenization_evil.EvilTokenizer"]},
        )
    return folder


@pytest.fixture(scope="module")
def evil(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("evil")
    marker = root / "PWNED"
    return _evil(_copy_model(tiny_llama_dir, root / "model"), marker), marker


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_llama_dir) -> Path:
    from medtune.data.prepare import prepare

    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare(str(SAMPLE), str(tiny_llama_dir), out, limit=8, valid_ratio=0.25, token_stats=False, max_seq_length=1024)
    return out


@pytest.fixture(scope="module")
def mlx_adapter_stub(tmp_path_factory) -> Path:
    """Enough of an mlx adapter folder for fuse to get as far as loading the base model."""
    d = tmp_path_factory.mktemp("adapter") / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(
        json.dumps(
            {"fine_tune_type": "lora", "num_layers": 1, "lora_parameters": {"rank": 2, "scale": 1.0, "dropout": 0.0}}
        )
    )
    import numpy as np
    from safetensors.numpy import save_file

    save_file(
        {"model.layers.1.self_attn.q_proj.lora_a": np.zeros((64, 2), dtype=np.float32)}, str(d / "adapters.safetensors")
    )
    return d


def _refused(res, *needles: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stdout[-2000:], res.stderr[-3000:])
    assert "Traceback" not in res.stderr and "error:" in res.stderr and "hint:" in res.stderr, res.stderr
    for needle in needles:
        assert needle in res.stderr, (needle, res.stderr)


# ---- 1. remote code -----------------------------------------------------------------------------------------
def test_remote_code_is_refused_by_every_command_that_loads_a_model(evil, prepared, mlx_adapter_stub, tmp_path):
    model, marker = evil
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        json.dumps(
            {
                "name": "evil-run",
                "model": str(model),
                "runs_dir": str(tmp_path / "runs"),
                "prepare": {"dataset": str(SAMPLE), "limit": 4, "token_stats": False},
            }
        )
    )
    commands = {
        "models pull": ["models", "pull", model],
        "prepare": ["prepare", SAMPLE, "--model", model, "--out", tmp_path / "data", "--limit", "4"],
        "train mlx": [
            "train",
            "--model",
            model,
            "--data",
            prepared,
            "--out",
            tmp_path / "a1",
            "--backend",
            "mlx",
            "--iters",
            "1",
            "--batch-size",
            "1",
        ],
        "train torch": [
            "train",
            "--model",
            model,
            "--data",
            prepared,
            "--out",
            tmp_path / "a2",
            "--backend",
            "torch",
            "--iters",
            "1",
            "--batch-size",
            "1",
        ],
        "fuse": ["fuse", "--model", model, "--adapter", mlx_adapter_stub, "--out", tmp_path / "fused"],
        "export": [
            "export",
            model,
            "--out",
            tmp_path / "gguf",
            "--name",
            "evil",
            "-q",
            "f32",
            "--modelfile",
            tmp_path / "evil.Modelfile",
        ],
        "chat": ["chat", model],
        "generate": ["generate", model, "-p", "hi", "--max-tokens", "2"],
        "eval": ["eval", model, "--data", prepared, "--out", tmp_path / "eval", "--limit", "1", "--probe-limit", "1"],
        "run": ["run", cfg],
    }
    for what, args in commands.items():
        res = run_cli(*args, cwd=tmp_path, env={"HF_MODULES_CACHE": str(tmp_path / "modules")})
        _refused(res, "--trust-remote-code", "auto_map")
        assert "config.json" in res.stderr, (what, res.stderr)  # names the file
        assert not marker.exists(), f"{what} imported the model's code: {marker.read_text()}"
    assert not (tmp_path / "gguf").exists() and not (tmp_path / "fused").exists() and not (tmp_path / "data").exists()


def test_remote_code_in_either_config_is_found_and_named(tiny_llama_dir, tmp_path):
    marker = tmp_path / "PWNED"
    only_tok = _evil(_copy_model(tiny_llama_dir, tmp_path / "tok"), marker, config=False)
    only_cfg = _evil(_copy_model(tiny_llama_dir, tmp_path / "cfg"), marker, tokenizer=False)
    mlx_file = _copy_model(tiny_llama_dir, tmp_path / "mlxfile")
    _edit_json(mlx_file / "config.json", model_file="modeling_evil.py")  # mlx_lm's own custom-code key
    from medtune.data.render import load_tokenizer
    from medtune.models import pull

    for folder, name in ((only_tok, "tokenizer_config.json"), (only_cfg, "config.json"), (mlx_file, "config.json")):
        with pytest.raises(BadInput) as e:
            pull(str(folder))
        assert e.value.exit_code == 2 and e.value.where == str(folder.resolve() / name)
        assert "--trust-remote-code" in e.value.hint
    with pytest.raises(BadInput, match="tokenization_evil.py"):
        load_tokenizer(only_tok)  # the tokenizer loader checks on its own too
    with safety.policy(trust_remote_code=True):
        assert pull(str(only_cfg)).path == only_cfg.resolve()
    assert not marker.exists()


def test_trust_remote_code_flag_and_run_key_reach_transformers(tiny_llama_dir, tmp_path):
    """With the flag (or `trust_remote_code: true`), transformers gets trust_remote_code=True and runs the code."""
    marker = tmp_path / "PWNED"
    model = _evil(_copy_model(tiny_llama_dir, tmp_path / "model"), marker, config=False)
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules")}
    res = run_cli(
        "prepare",
        SAMPLE,
        "--model",
        model,
        "--out",
        tmp_path / "data",
        "--limit",
        "4",
        "--no-token-stats",
        "--trust-remote-code",
        cwd=tmp_path,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "tokenization_evil imported" in marker.read_text()
    marker.unlink()
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        json.dumps(
            {
                "name": "trusted",
                "model": str(model),
                "runs_dir": str(tmp_path / "runs"),
                "trust_remote_code": True,
                "prepare": {"dataset": str(SAMPLE), "limit": 4, "token_stats": False},
            }
        )
    )
    res = run_cli("run", cfg, "--only", "prepare", cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "tokenization_evil imported" in marker.read_text()
    assert "trust_remote_code: true" in (tmp_path / "runs" / "trusted" / "config.yaml").read_text()


def test_loaders_pass_trust_remote_code_explicitly():
    """Every transformers / Unsloth from_pretrained in medtune names trust_remote_code (or takes hf_load_kwargs),
    and the helpers say what the policy says."""
    calls = []
    for path in sorted((ROOT / "medtune").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "from_pretrained"
            ):
                owner = ast.unparse(node.func.value)
                if owner == "PeftModel":  # adapters carry no code; their weights are checked by safety
                    continue
                kws = {k.arg for k in node.keywords}
                spread = [ast.unparse(k.value) for k in node.keywords if k.arg is None]
                ok = "trust_remote_code" in kws or any("hf_load_kwargs" in s for s in spread)
                calls.append((f"{path.relative_to(ROOT)}:{node.lineno}", ok))
    assert len(calls) >= 6 and all(ok for _, ok in calls), calls
    assert safety.hf_load_kwargs()["trust_remote_code"] is False
    assert safety.mlx_load_kwargs()["tokenizer_config"] == {"trust_remote_code": False}
    with safety.policy(trust_remote_code=True):
        assert safety.hf_load_kwargs()["trust_remote_code"] is True
        assert safety.mlx_load_kwargs()["tokenizer_config"] == {"trust_remote_code": True}
    assert safety.trust_remote_code() is False  # restored


# ---- 2. pickle ----------------------------------------------------------------------------------------------
class _Touch:
    """Unpickling this creates a file: what a malicious checkpoint would do with os.system."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _payload_bin(path: Path, marker: Path) -> Path:
    import torch

    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "evil": _Touch(marker)}, path)
    return path


def _pickle_only(src: Path, dst: Path) -> Path:
    """The tiny model with its weights in pytorch_model.bin (save_pretrained without safetensors)."""
    import torch
    from safetensors.torch import load_file

    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    torch.save(tensors, dst / "pytorch_model.bin")
    return dst


def test_the_payload_is_real(tmp_path):
    """Guard for the tests below: unpickled without weights_only, the payload does create its file."""
    import torch

    marker = tmp_path / "fired"
    f = _payload_bin(tmp_path / "x.bin", marker)
    torch.load(f, weights_only=False)
    assert marker.exists()


def test_pickle_only_weights_are_refused_before_loading(tiny_llama_dir, tmp_path):
    marker = tmp_path / "PWNED"
    model = _copy_model(tiny_llama_dir, tmp_path / "model")
    for f in model.glob("*.safetensors"):
        f.unlink()
    _payload_bin(model / "pytorch_model.bin", marker)
    from medtune.models import pull

    with pytest.raises(BadInput) as e:
        pull(str(model))
    assert e.value.where == str(model.resolve() / "pytorch_model.bin") and "pytorch_model.bin" in e.value.message
    assert "--allow-pickle" in e.value.hint and "safetensors" in e.value.hint
    res = run_cli("generate", model, "-p", "hi", "--max-tokens", "2", cwd=tmp_path)
    _refused(res, "pytorch_model.bin", "--allow-pickle")
    res = run_cli(
        "export",
        model,
        "--out",
        tmp_path / "gguf",
        "--name",
        "pkl",
        "-q",
        "f32",
        "--modelfile",
        tmp_path / "pkl.Modelfile",
        cwd=tmp_path,
    )
    _refused(res, "pytorch_model.bin", "--allow-pickle")
    for suffix in (".pt", ".pth", ".ckpt"):
        (model / "pytorch_model.bin").rename(model / f"weights{suffix}")
        with pytest.raises(BadInput, match=f"weights\\{suffix}"):
            pull(str(model))
        (model / f"weights{suffix}").rename(model / "pytorch_model.bin")
    # --allow-pickle: read with weights_only=True, which refuses the payload instead of running it
    res = run_cli(
        "generate",
        model,
        "-p",
        "hi",
        "--max-tokens",
        "2",
        "--allow-pickle",
        cwd=tmp_path,
        env={"MEDTUNE_CACHE": str(tmp_path / "cache")},
    )
    _refused(res, "refused to unpickle pytorch_model.bin", "pytorch_model.bin")
    assert not marker.exists()


def test_pickle_adapter_is_refused(tiny_llama_dir, tmp_path):
    marker = tmp_path / "PWNED"
    adapter = tmp_path / "peft"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]})
    )
    _payload_bin(adapter / "adapter_model.bin", marker)
    res = run_cli("fuse", "--model", tiny_llama_dir, "--adapter", adapter, "--out", tmp_path / "fused", cwd=tmp_path)
    _refused(res, "adapter_model.bin", "--allow-pickle")
    res = run_cli(
        "fuse",
        "--model",
        tiny_llama_dir,
        "--adapter",
        adapter,
        "--out",
        tmp_path / "fused",
        "--allow-pickle",
        cwd=tmp_path,
        env={"MEDTUNE_CACHE": str(tmp_path / "cache")},
    )
    _refused(res, "refused to unpickle adapter_model.bin")
    assert not marker.exists() and not (tmp_path / "fused").exists()


def test_safetensors_win_and_pickle_beside_them_is_never_opened(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from medtune.models import pull
    from medtune.runtimes.mlx import load

    marker = tmp_path / "PWNED"
    model = _copy_model(tiny_llama_dir, tmp_path / "model")
    _payload_bin(model / "pytorch_model.bin", marker)
    assert safety.check_model_dir(model) == "safetensors"
    assert pull(str(model)).path == model.resolve()
    net, tok = load(str(model))  # mlx_lm
    assert net is not None
    hf = AutoModelForCausalLM.from_pretrained(str(model), **safety.hf_load_kwargs(model))  # as the torch loaders do
    assert hf.config.num_hidden_layers == 2
    assert not marker.exists()


def test_allow_pickle_converts_to_safetensors_in_the_cache(tiny_llama_dir, tmp_path, monkeypatch):
    import numpy as np
    from safetensors.numpy import load_file

    from medtune.models import pull
    from medtune.runtimes.mlx import generate, load

    monkeypatch.setenv("MEDTUNE_CACHE", str(tmp_path / "cache"))
    model = _pickle_only(tiny_llama_dir, tmp_path / "model")
    with pytest.raises(BadInput, match="--allow-pickle|pickle"):
        pull(str(model))
    with safety.policy(allow_pickle=True):
        ref = pull(str(model))
        assert ref.path.is_relative_to(tmp_path / "cache" / "unpickled") and not list(ref.path.glob("*.bin"))
        converted = load_file(str(ref.path / "model.safetensors"))
        original = {}
        for f in tiny_llama_dir.glob("*.safetensors"):
            original.update(load_file(str(f)))
        assert set(converted) == set(original)
        assert all(np.array_equal(converted[k], original[k]) for k in original)
        assert pull(str(model)).path == ref.path  # converted once
        net, tok = load(str(model))
        out = generate(net, tok, [{"role": "user", "content": "hi"}], max_tokens=2, temp=0.0)
        assert out.tokens >= 1


# ---- 3. paths -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["../x", "../../etc", "/tmp/abs", "a/b", "..", ".", ".hidden", "x\ny", "", "a\\b", "~", 5, None]
)
def test_run_name_must_be_a_safe_folder_name(name, tmp_path):
    from medtune.pipeline import load_config

    with pytest.raises(BadInput) as e:
        load_config({"name": name, "runs_dir": str(tmp_path)})
    assert e.value.exit_code == 2 and "run name" in e.value.message
    assert list(tmp_path.iterdir()) == []


def test_run_flags_must_be_booleans():
    from medtune.pipeline import load_config

    for key in ("trust_remote_code", "allow_pickle"):
        with pytest.raises(BadInput, match=key):
            load_config({"name": "x", key: "yes"})
        assert load_config({"name": "x", key: True})[key] is True


def test_run_folder_symlink_out_of_runs_dir_is_refused(tmp_path):
    from medtune.pipeline import Run, load_config

    runs, elsewhere = tmp_path / "runs", tmp_path / "elsewhere"
    runs.mkdir()
    elsewhere.mkdir()
    (runs / "r1").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(BadInput, match="outside"):
        Run(load_config({"name": "r1", "runs_dir": str(runs)}))
    assert Run(load_config({"name": "r2", "runs_dir": str(runs)})).root == runs / "r2"


@pytest.mark.parametrize("spec", ["org/..", "../org", "org/..x", "org/name/../../..", "org/--x", "./org/x"])
def test_hub_ids_that_are_paths_are_refused(spec, monkeypatch, tmp_path):
    """Hub and ModelScope ids never reach a downloader (whose cache path they would become) unless they are plain
    ORG/NAME; the error is one clear exit-2 line."""
    from medtune.data import sources
    from medtune.models import pull
    from medtune.models.hub import hf_snapshot, modelscope_snapshot

    monkeypatch.chdir(tmp_path)  # `org/..` could otherwise be a local folder
    with pytest.raises(BadInput):
        pull(spec)
    with pytest.raises(BadInput):
        pull(f"modelscope:{spec}")
    with pytest.raises(BadInput):
        sources.resolve(f"hf:{spec}")
    with pytest.raises(BadInput):
        sources.resolve(f"modelscope:{spec}")
    with pytest.raises(BadInput):
        hf_snapshot(spec, ["*.json"])
    with pytest.raises(BadInput):
        modelscope_snapshot(spec)
    assert list(tmp_path.iterdir()) == []


def test_prepare_default_out_stays_under_data_processed(tmp_path, tiny_llama_dir):
    for spec in ("modelscope:..", "hf:../..", "hf:org/..", "modelscope:../../etc", "hf:..@train", ".."):
        stem = spec.split(":", 1)[-1].rstrip("/").replace("/", "_").split("@")[0] if ":" in spec else Path(spec).stem
        safety.inside(tmp_path / "data" / "processed", safety.safe_component(stem, "dataset"))
    res = run_cli("prepare", "modelscope:..", "--model", tiny_llama_dir, cwd=tmp_path)
    _refused(res, "not a valid dataset id")
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").rglob("*.jsonl"))


def test_export_and_ollama_names_cannot_be_paths(tiny_llama_dir, tmp_path):
    from medtune.export import export
    from medtune.ollama import check_name

    for name in ("../../x", "/abs", "a/b", "..", "x\nFROM /etc/passwd", "x y", ".x"):
        with pytest.raises(BadInput):
            export(tiny_llama_dir, tmp_path / "gguf", name, quants=("f32",), modelfile_path=tmp_path / "m.Modelfile")
        if name != "a/b":  # Ollama names may have a namespace (library/model): a server name, not a path
            with pytest.raises(BadInput):
                check_name(name)
    res = run_cli(
        "export", tiny_llama_dir, "--out", tmp_path / "gguf", "--name", "../../escaped", "-q", "f32", cwd=tmp_path
    )
    _refused(res, "not a valid Ollama name")
    res = run_cli(
        "export",
        tiny_llama_dir,
        "--out",
        tmp_path / "gguf",
        "--name",
        "ok",
        "-q",
        "f32",
        "--ollama",
        "../x",
        cwd=tmp_path,
    )
    _refused(res, "not a valid Ollama name")
    assert not (tmp_path / "gguf").exists() and not (tmp_path.parent / "escaped-f32.gguf").exists()


def test_symlinks_out_of_a_model_folder_are_refused_and_never_copied(tiny_llama_dir, mlx_adapter_stub, tmp_path):
    from medtune.models import pull

    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"ssh_key": "PRIVATE-KEY-MATERIAL"}))
    model = _copy_model(tiny_llama_dir, tmp_path / "model")
    (model / "special_tokens_map.json").unlink()
    (model / "special_tokens_map.json").symlink_to(secret)
    with pytest.raises(BadInput) as e:
        pull(str(model))
    assert "symlink" in e.value.message and e.value.where == str(model.resolve() / "special_tokens_map.json")
    res = run_cli("fuse", "--model", model, "--adapter", mlx_adapter_stub, "--out", tmp_path / "fused", cwd=tmp_path)
    _refused(res, "special_tokens_map.json", "symlink")
    res = run_cli(
        "export",
        model,
        "--out",
        tmp_path / "gguf",
        "--name",
        "leak",
        "-q",
        "f32",
        "--modelfile",
        tmp_path / "leak.Modelfile",
        cwd=tmp_path,
    )
    _refused(res, "special_tokens_map.json", "symlink")
    # an adapter folder too (fuse copies its adapter_config.json into the manifest)
    adapter = tmp_path / "adapter"
    shutil.copytree(mlx_adapter_stub, adapter)
    (adapter / "adapter_config.json").unlink()
    (adapter / "adapter_config.json").symlink_to(secret)
    res = run_cli("fuse", "--model", tiny_llama_dir, "--adapter", adapter, "--out", tmp_path / "fused", cwd=tmp_path)
    _refused(res, "adapter_config.json", "symlink")
    leaked = [
        p
        for p in tmp_path.rglob("*")
        if p.is_file()
        and not p.is_symlink()
        and p != secret
        and "PRIVATE-KEY-MATERIAL" in p.read_text(errors="replace")
    ]
    assert leaked == [] and not (tmp_path / "fused").exists() and not (tmp_path / "gguf").exists()
    # a link that stays inside the folder is fine
    inner = _copy_model(tiny_llama_dir, tmp_path / "inner")
    (inner / "sub").mkdir()
    shutil.move(str(inner / "tokenizer.json"), inner / "sub" / "tokenizer.json")
    (inner / "tokenizer.json").symlink_to(Path("sub") / "tokenizer.json")
    assert pull(str(inner)).path == inner.resolve()


def _hf_cache_repo(cache: Path, repo: str, src: Path) -> Path:
    """A Hugging Face hub cache entry as huggingface_hub lays it out: blobs/, snapshots/REV/* -> ../../blobs/SHA."""
    import hashlib

    folder = cache / f"models--{repo.replace('/', '--')}"
    rev = "0" * 40
    (folder / "blobs").mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(rev)
    snap = folder / "snapshots" / rev
    snap.mkdir(parents=True)
    for f in src.iterdir():
        data = f.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        (folder / "blobs" / sha).write_bytes(data)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / sha)
    return snap


def test_hf_cache_layout_symlinks_are_allowed_other_repos_are_not(tiny_llama_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    from medtune.models import pull
    from medtune.runtimes.mlx import load

    cache = tmp_path / "hub"
    snap = _hf_cache_repo(cache, "medtune-test/tiny", tiny_llama_dir)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    ref = pull("medtune-test/tiny")
    assert ref.kind == "hub" and ref.path.resolve() == snap.resolve()
    net, tok = load("medtune-test/tiny")
    assert net is not None
    # a snapshot file that points into another repo's blobs (or anywhere else) is refused
    other = _hf_cache_repo(cache, "medtune-test/other", tiny_llama_dir)
    (snap / "tokenizer.json").unlink()
    (snap / "tokenizer.json").symlink_to(os.path.relpath(os.path.realpath(other / "tokenizer.json"), snap))
    with pytest.raises(BadInput, match="symlink"):
        pull("medtune-test/tiny")
    # a Hub model with only pickle weights: not fetched, and refused, without --allow-pickle
    _hf_cache_repo(cache, "medtune-test/pickled", _pickle_only(tiny_llama_dir, tmp_path / "pickled"))
    with pytest.raises(BadInput) as e:
        pull("medtune-test/pickled")
    assert "--allow-pickle" in e.value.message + e.value.hint
    monkeypatch.setenv("MEDTUNE_CACHE", str(tmp_path / "cache"))
    with safety.policy(allow_pickle=True):
        ref = pull("medtune-test/pickled")
    assert (ref.path / "model.safetensors").is_file() and ref.path.is_relative_to(tmp_path / "cache")


def test_writes_replace_a_symlink_at_the_output_name_instead_of_following_it(tmp_path):
    from medtune.pipeline import Run, load_config

    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    out = tmp_path / "out"
    out.mkdir()
    for i, write in enumerate(
        (
            lambda p: fsutil.write_json(p, {"a": 1}),
            lambda p: fsutil.write_text(p, "x"),
            lambda p: jsonl.write_jsonl(p, [{"a": 1}]),
            lambda p: redact.write_json(p, {"a": 1}),
        )
    ):
        link = out / f"file{i}.json"
        link.symlink_to(victim)
        write(link)
        assert not link.is_symlink() and link.is_file() and victim.read_text() == "untouched"
    # a whole output folder that is a symlink to somewhere else: the link is replaced, the target untouched
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    (out / "folder").symlink_to(elsewhere, target_is_directory=True)
    with fsutil.atomic_dir(out / "folder") as tmp:
        (tmp / "new.txt").write_text("new")
    assert not (out / "folder").is_symlink() and (out / "folder" / "new.txt").is_file()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep.txt"]
    assert (elsewhere / "keep.txt").read_text() == "keep"
    # appends (run.log) replace the link too
    r = Run(load_config({"name": "logs", "runs_dir": str(tmp_path / "runs")}))
    r.root.mkdir(parents=True)
    (r.root / "run.log").symlink_to(victim)
    r.log("a line")
    assert not (r.root / "run.log").is_symlink() and "a line" in (r.root / "run.log").read_text()
    from medtune.train.report import MetricsLog

    (out / "metrics.jsonl").symlink_to(victim)
    MetricsLog(out / "metrics.jsonl", truncate=False).write({"step": 1, "train_loss": 2.0})
    assert not (out / "metrics.jsonl").is_symlink() and '"step": 1' in (out / "metrics.jsonl").read_text()
    assert victim.read_text() == "untouched"


# ---- 4. Modelfile and GGUF metadata -------------------------------------------------------------------------
ATTACKS = [
    "Be brief.\nFROM /etc/passwd\nADAPTER /tmp/evil.gguf\nPARAMETER temperature 9\nLICENSE x",
    "ADAPTER ./evil.bin",
    "  FROM leading-space\r\nPARAMETER num_ctx 1\r\n",
    '"quoted start\nMESSAGE user hi',
    'ends with quotes ""',
    "# not a comment\nREQUIRES 99.0",
    "template {{ .Prompt }}\nTEMPLATE {{ .System }}",
    "tab\there\nnon-ASCII: 发烧 é 🙂",
    '"',
    "\n",
]


def test_modelfile_values_round_trip_as_one_value_or_are_refused():
    from medtune.export.modelfile import modelfile_lines, parse_modelfile

    for attack in ATTACKS:
        from_path = f"/models/{attack.splitlines()[0] or 'x'}.gguf"
        lines = modelfile_lines(
            from_path, "{{ .Prompt }}\n" + attack, attack, ["<|im_end|>", attack], {"temperature": 0.5}
        )
        cmds = parse_modelfile("\n".join(lines) + "\n")
        assert [k for k, _ in cmds] == ["model", "template", "system", "stop", "stop", "temperature"], (attack, cmds)
        assert dict(cmds[:3]) == {"model": from_path, "template": "{{ .Prompt }}\n" + attack, "system": attack}
        assert [v for k, v in cmds if k == "stop"] == ["<|im_end|>", attack]
        assert [v for k, v in cmds if k == "temperature"] == ["0.5"]
    for bad in ('x"""\nFROM /etc/passwd', '"""', 'a """ b', "bell\x07", "nul\x00", "esc\x1b[31m"):
        for args in (
            (f"/m/{bad}.gguf", "t", None, [], {}),
            ("/m.gguf", bad, None, [], {}),
            ("/m.gguf", "t", bad, [], {}),
            ("/m.gguf", "t", None, [bad], {}),
            ("/m.gguf", "t", None, [], {"seed": bad}),
        ):
            with pytest.raises(BadInput):
                modelfile_lines(*args)
    for name in ("temperature 1\nADAPTER /x", "num ctx", "stop"):
        with pytest.raises(BadInput):
            modelfile_lines("/m.gguf", "t", None, [], {name: 1})


def test_exported_modelfile_with_hostile_system_prompt_parses_back(tiny_llama_dir, tmp_path):
    from medtune.export import export
    from medtune.export.modelfile import parse_modelfile

    system = ATTACKS[0] + "\n" + ATTACKS[5]
    res = export(
        tiny_llama_dir,
        tmp_path / "gguf",
        "hostile",
        quants=("f32",),
        system=system,
        modelfile_path=tmp_path / "hostile.Modelfile",
    )
    cmds = parse_modelfile(res.modelfile_path.read_text(encoding="utf-8"))
    assert [v for k, v in cmds if k == "system"] == [system]
    assert [v for k, v in cmds if k == "model"] == ["./gguf/hostile-f32.gguf"]
    assert not [k for k, _ in cmds if k in ("adapter", "license", "requires", "message")]


def test_gguf_string_metadata_round_trips_byte_exactly(tiny_llama_dir, tmp_path):
    from gguf import GGUFReader, GGUFValueType

    from medtune.export.gguf_writer import write_gguf

    hostile_name = 'name "quoted" """triple"""\nFROM /etc/passwd\r\n\ttab \x01\x1b\x7f é 发烧 🙂 general.name=x'
    base_template = json.loads((tiny_llama_dir / "tokenizer_config.json").read_text())["chat_template"]
    hostile_template = base_template + '\n{# "quotes" """ \x02 \nPARAMETER x\ntokenizer.chat_template=y 中文 #}'
    model = _copy_model(tiny_llama_dir, tmp_path / "model")
    _edit_json(model / "tokenizer_config.json", chat_template=hostile_template)
    plain = write_gguf(tiny_llama_dir, tmp_path / "plain.gguf", "f32", name="plain")
    odd = write_gguf(model, tmp_path / "odd.gguf", "f32", name=hostile_name)

    def strings(path):
        reader = GGUFReader(path)
        out = {}
        for key, field in reader.fields.items():
            if field.types and field.types[0] == GGUFValueType.STRING:
                out[key] = bytes(field.parts[field.data[0]])
        return out, set(reader.fields)

    plain_strings, plain_keys = strings(plain["path"])
    odd_strings, odd_keys = strings(odd["path"])
    assert odd_keys == plain_keys  # nothing in a value became a key
    assert odd_strings["general.name"] == hostile_name.encode("utf-8")
    assert odd_strings["tokenizer.chat_template"] == hostile_template.encode("utf-8")
    assert {k: v for k, v in odd_strings.items() if k not in ("general.name", "tokenizer.chat_template")} == {
        k: v for k, v in plain_strings.items() if k not in ("general.name", "tokenizer.chat_template")
    }


# ---- 5. tokens ----------------------------------------------------------------------------------------------
def _fake_token() -> str:
    return "hf_" + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(34))


def test_redaction_finds_tokens_in_env_login_files_and_by_shape(tmp_path, monkeypatch):
    env_token, file_token, stored, shaped = _fake_token(), _fake_token(), _fake_token(), _fake_token()
    hf_home = tmp_path / "hf"
    hf_home.mkdir()
    (hf_home / "token").write_text(file_token + "\n")
    (hf_home / "stored_tokens").write_text(f"[work]\nhf_token = {stored}\n")
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", env_token)
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", "ms-0123456789abcdef")
    obj = {
        "options": {"host": f"http://u:{env_token}@h", "list": [file_token, ("t", stored)]},
        f"key {env_token}": Path(f"/x/{stored}/y"),
        "n": 3,
        "ms": "ms-0123456789abcdef",
        "shaped": f"x{shaped}y",
        "short": "hf_abc",
    }
    clean = json.dumps(redact.redact(obj))
    for t in (env_token, file_token, stored, shaped, "ms-0123456789abcdef"):
        assert t not in clean
    assert '"n": 3' in clean and "hf_abc" in clean and redact.PLACEHOLDER in clean
    env = redact.scrubbed_env()
    assert "HUGGING_FACE_HUB_TOKEN" not in env and "MODELSCOPE_API_TOKEN" not in env


def test_manifests_and_logs_are_written_redacted(tiny_llama_dir, tmp_path, monkeypatch):
    from medtune.export import export
    from medtune.export.modelfile import parse_modelfile
    from medtune.pipeline import Run, load_config

    token = _fake_token()
    monkeypatch.setenv("HF_TOKEN", token)
    system = f"You are careful. (debug: HF_TOKEN={token})"
    res = export(
        tiny_llama_dir,
        tmp_path / "gguf",
        "redacted",
        quants=("f32",),
        system=system,
        modelfile_path=tmp_path / "redacted.Modelfile",
    )
    manifest = json.loads(res.manifest_path.read_text())
    assert token not in res.manifest_path.read_text() and redact.PLACEHOLDER in manifest["options"]["system"]
    assert [v for k, v in parse_modelfile(res.modelfile_path.read_text()) if k == "system"] == [system]  # the user's
    r = Run(load_config({"name": "log", "runs_dir": str(tmp_path / "runs")}))
    r.log(f"downloading with {token}")
    assert token not in (r.root / "run.log").read_text()
    redact.write_json(tmp_path / "m.json", {"options": {"token": token}})
    assert token not in (tmp_path / "m.json").read_text()


@pytest.mark.slow
def test_no_token_in_any_output_of_a_full_run_and_the_commands(tiny_llama_dir, tmp_path):
    env_token, file_token = _fake_token(), _fake_token()
    hf_home = tmp_path / "hf"
    hf_home.mkdir()
    (hf_home / "token").write_text(file_token)
    env = {"HF_TOKEN": env_token, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out"
    cfg = {
        "name": "tok",
        "model": str(tiny_llama_dir),
        "runs_dir": str(out / "runs"),
        "prepare": {
            "dataset": str(SAMPLE),
            "max_seq_length": 1024,
            "limit": 8,
            "valid_ratio": 0.25,
            "token_stats": False,
        },
        "train": {
            "iters": 2,
            "batch_size": 2,
            "num_layers": 1,
            "max_seq_length": 1024,
            "eval_every": 2,
            "save_every": 2,
            "backend": "mlx",
        },
        "export": {"quant": ["f32"]},
        # credentials pasted into a URL: the resolved config.yaml would keep them
        "ollama": {"create": "auto", "host": f"http://medtune:{env_token}@127.0.0.1:9"},
        "eval": {"max_tokens": 4, "limit": 1, "probe_limit": 1, "threads": 1},
    }
    (tmp_path / "run.yaml").write_text(json.dumps(cfg))
    results = [run_cli("run", tmp_path / "run.yaml", cwd=tmp_path, env=env)]
    data = out / "runs" / "tok" / "data"
    results.append(
        run_cli(
            "train",
            "--model",
            tiny_llama_dir,
            "--data",
            data,
            "--out",
            out / "adapter",
            "--iters",
            "2",
            "--batch-size",
            "2",
            "--num-layers",
            "1",
            "--eval-every",
            "2",
            "--backend",
            "mlx",
            cwd=tmp_path,
            env=env,
        )
    )
    results.append(
        run_cli(
            "fuse",
            "--model",
            tiny_llama_dir,
            "--adapter",
            out / "adapter",
            "--out",
            out / "fused",
            cwd=tmp_path,
            env=env,
        )
    )
    results.append(
        run_cli(
            "export",
            out / "fused",
            "--out",
            out / "gguf",
            "--name",
            "tok-cli",
            "-q",
            "f32",
            "--modelfile",
            out / "tok-cli.Modelfile",
            "--json",
            cwd=tmp_path,
            env=env,
        )
    )
    for res in results:
        assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "runs" / "tok" / "eval" / "report.html").is_file()
    assert "<redacted>" in (out / "runs" / "tok" / "config.yaml").read_text()
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 20
    for token in (env_token, file_token):
        needle = token.encode()
        assert [p for p in files if needle in p.read_bytes()] == []
        for res in results:
            assert token not in res.stdout and token not in res.stderr
