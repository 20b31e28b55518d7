import json

import numpy as np
import pytest

from medtune.archs.llama import permute_rows, unpermute_rows
from medtune.core.errors import BadInput, MedtuneError
from medtune.models import pull

from conftest import run_cli

PROMPTS = [
    "A 58-year-old man has crushing chest pain for 40 minutes. What is the first step?",
    "患者，女，32岁，发热3天，体温39.2℃。最可能的诊断是什么？",
    "Dose: 2024 mg/day split as 3 × 675 mg; HbA1c 7.5% → 6.9%.\n\nNext line\twith tab",
]


def test_builtin_is_a_normalised_float32_hf_folder(smollm2_dir):
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["rope_theta"] == 100000.0  # top-level: mlx_lm ignores rope_parameters
    assert cfg["torch_dtype"] == "float32" and cfg["tie_word_embeddings"] is True
    tok_cfg = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["eos_token"] == "<|im_end|>" and "chat_template" in tok_cfg
    from safetensors import safe_open

    with safe_open(str(smollm2_dir / "model.safetensors"), "np") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == np.float32


def test_builtin_loads_in_mlx_and_transformers_and_they_agree(smollm2_dir):
    import mlx.core as mx
    import torch
    from mlx_lm import load
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True, return_dict=False
    )
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    model, _ = load(str(smollm2_dir))
    got = np.array(model(mx.array([ids]))[0].astype(mx.float32))
    assert np.abs(ref - got).max() < 1e-3
    assert ref[-1].argmax() == got[-1].argmax()


def test_imported_tokenizer_splits_text_like_llama_cpp(smollm2_dir, smollm2_gguf):
    """The tokenizer.json we rebuilt from the GGUF tokenizes exactly as llama.cpp does on the original file."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ref = llama_cpp.Llama(model_path=str(smollm2_gguf), vocab_only=True, verbose=False)
    for text in PROMPTS:
        assert tok.encode(text, add_special_tokens=False) == ref.tokenize(text.encode(), add_bos=False, special=False)
    chat = tok.apply_chat_template(
        [{"role": "user", "content": PROMPTS[2]}], add_generation_prompt=True, tokenize=False
    )
    assert tok.encode(chat, add_special_tokens=False) == ref.tokenize(chat.encode(), add_bos=False, special=True)


def test_qk_permutation_round_trips():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8 * 16, 24)).astype(np.float32)
    p = permute_rows(w, 8)
    assert not np.array_equal(p, w)
    assert np.array_equal(unpermute_rows(p, 8), w)
    # within each head, llama.cpp interleaves the two rotary halves: row 1 is the first row of the second half
    assert np.array_equal(p[1], w[8])


def test_pull_local_folder(tiny_llama_dir):
    ref = pull(str(tiny_llama_dir))
    assert ref.kind == "local" and ref.path == tiny_llama_dir.resolve()


def test_pull_errors_are_clear(tmp_path):
    with pytest.raises(BadInput, match="no such folder"):
        pull(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="no config.json"):
        pull(str(tmp_path / "empty"))
    with pytest.raises(BadInput, match="unknown builtin"):
        pull("builtin:nope")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\x00" * 64)
    with pytest.raises(BadInput, match="not a GGUF file"):  # read from the header, before anything else
        pull(str(bad))


def test_pull_hub_offline_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(MedtuneError) as exc:
        pull("medtune-test-org/does-not-exist")
    assert "does-not-exist" in exc.value.line()


def test_models_pull_cli_prints_the_folder(smollm2_dir):
    res = run_cli("models", "pull", "builtin:smollm2-135m", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["path"] == str(smollm2_dir)
    res = run_cli("models", "pull", "/definitely/not/here")
    assert res.returncode == 2
    assert "error:" in res.stderr and "Traceback" not in res.stderr


def test_gguf_export_then_import_gives_back_the_same_weights(tmp_path, monkeypatch, tiny_llama_dir):
    """pull(file.gguf) dequantises into the cache; an F32 export read back must equal the original exactly
    (the import's Q/K un-permutation inverts the export's permutation, names and config round-trip)."""
    from safetensors.numpy import load_file

    from medtune.export import export

    monkeypatch.setenv("MEDTUNE_CACHE", str(tmp_path / "cache"))
    res = export(tiny_llama_dir, tmp_path / "out", "tiny", quants=("f32",))
    ref = pull(str(res.gguf_paths["f32"]))
    assert ref.kind == "gguf" and str(ref.path).startswith(str(tmp_path / "cache"))
    original = load_file(str(tiny_llama_dir / "model.safetensors"))
    imported = load_file(str(ref.path / "model.safetensors"))
    assert set(imported) == set(original)
    for name, w in original.items():
        assert np.array_equal(imported[name], w), name
    a = json.loads((tiny_llama_dir / "config.json").read_text())
    b = json.loads((ref.path / "config.json").read_text())
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rope_theta",
        "vocab_size",
        "tie_word_embeddings",
        "intermediate_size",
    ):
        assert a[key] == b[key], key
    assert pull(str(res.gguf_paths["f32"])).path == ref.path  # cached by content hash


@pytest.mark.parametrize("pre_name", ["gpt-2", "gpt2"])
def test_a_byte_level_gguf_imports_under_llama_cpps_name_and_the_old_spelling(
    tmp_path, monkeypatch, smollm2_dir, pre_name
):
    """A bare byte-level pre-tokenizer is `gpt-2` in llama.cpp (what export writes now); GGUFs from earlier
    medtune versions say `gpt2`. Both import to a tokenizer.json that splits text like the original."""
    from transformers import AutoTokenizer

    from medtune.export.gguf_writer import plan_gguf, write_gguf
    from medtune.models.gguf_import import import_gguf

    from conftest import make_tiny_llama
    from pretok_models import TRICKY_TEXTS

    monkeypatch.setenv("MEDTUNE_CACHE", str(tmp_path / "cache"))
    model = make_tiny_llama(tmp_path / "hf", smollm2_dir, layers=1)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tok = json.loads((model / "tokenizer.json").read_text(encoding="utf-8"))
    tok["pre_tokenizer"] = byte_level
    (model / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    plan = plan_gguf(model, "f32")
    assert plan.vocab.pre == "gpt-2"  # what export writes
    plan.vocab.pre = pre_name
    write_gguf(model, tmp_path / "m.gguf", "f32", plan=plan)
    out = import_gguf(tmp_path / "m.gguf", tmp_path / "imported")
    assert json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))["pre_tokenizer"] == byte_level
    want, got = AutoTokenizer.from_pretrained(str(model)), AutoTokenizer.from_pretrained(str(out))
    for text in TRICKY_TEXTS:
        assert got.encode(text, add_special_tokens=False) == want.encode(text, add_special_tokens=False), repr(text)


def test_gguf_of_an_architecture_medtune_cannot_import_is_refused_from_its_header(tmp_path, monkeypatch):
    """A GGUF medtune cannot import is refused from its header, before any tensor data is read (the file is
    not hashed, gguf's reader does not map the tensors, nothing is dequantised): one line with the file and
    the architecture, a hint, exit 2."""
    import gguf

    from medtune.core import fsutil

    path = tmp_path / "big-mamba.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_block_count(4)
    w.add_embedding_length(1024)
    rng = np.random.default_rng(0)
    for i in range(4):
        w.add_tensor(f"blk.{i}.ssm_in.weight", rng.standard_normal((1024, 1024), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert path.stat().st_size > 16_000_000

    def read_tensors(*_a, **_k):
        raise AssertionError("tensor data was read before the refusal")

    monkeypatch.setenv("MEDTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fsutil, "sha256_file", read_tensors)  # reads every byte of the file
    monkeypatch.setattr(gguf, "GGUFReader", read_tensors)  # maps and builds every tensor
    monkeypatch.setattr(gguf.quants, "dequantize", read_tensors)
    with pytest.raises(BadInput) as exc:
        pull(str(path))
    assert exc.value.line() == f"{path}: GGUF architecture 'mamba' cannot be imported"
    assert "llama" in exc.value.hint and "Hugging Face folder" in exc.value.hint
    assert not (tmp_path / "cache" / "models" / "gguf").exists()

    res = run_cli("models", "pull", path, env={"MEDTUNE_CACHE": str(tmp_path / "cache")})
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert lines[-2] == f"error: {path}: GGUF architecture 'mamba' cannot be imported"
    assert lines[-1].startswith("hint: medtune imports gemma3, llama, phi3, qwen2, qwen3 GGUFs")
