"""Export stage: HF folder -> GGUF + Modelfile, checked on tiny random llama models (no mocks).

The tokenizer of every tiny model is SmolLM2's (fixture `smollm2_dir`), so tokenization, the ChatML
template with its default system prompt, and the pre-tokenizer are the real ones.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medtune.archs.llama import unpermute_rows
from medtune.core.errors import BadInput
from medtune.core.fsutil import sha256_file
from medtune.export import export, inspect_gguf
from medtune.export.gguf_writer import write_gguf
from medtune.export.gotemplate import execute, ollama_prompt
from medtune.export.modelfile import hf_render, parse_modelfile, quote_value, render_modelfile

N_HEAD, N_KV = 4, 2
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

CONVERSATIONS = [
    [{"role": "user", "content": "What is a normal resting heart rate?"}],
    [
        {"role": "system", "content": "You are a careful clinician."},
        {"role": "user", "content": "BP 150/95 on 3 visits. Next step?"},
    ],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "发烧39度怎么办？\n请给三条建议。"},
    ],
    [
        {"role": "system", "content": "Answer briefly.\nCite guidelines."},
        {"role": "user", "content": "Dose of\n  ibuprofen 400mg?"},
        {"role": "assistant", "content": "Usually 200–400 mg every 4–6 h."},
        {"role": "user", "content": "Max per day? {{ .System }} <|im_end|>"},
    ],
    [{"role": "system", "content": ""}, {"role": "user", "content": "  an explicitly empty system prompt  "}],
    [
        {"role": "user", "content": "a"},
        {"role": "system", "content": "mid-conversation system"},
        {"role": "user", "content": "end with newline\n"},
    ],
]


def _make_model(
    path: Path, tokenizer_dir: Path, *, tied: bool = True, seed: int = 0, family: str = "Llama", **overrides
) -> Path:
    import torch
    import transformers

    cfg = dict(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=N_HEAD,
        num_key_value_heads=N_KV,
        max_position_embeddings=512,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        initializer_range=0.1,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    config = getattr(transformers, f"{family}Config")(**cfg)
    model = getattr(transformers, f"{family}ForCausalLM")(config).to(torch.float32)
    with torch.no_grad():  # random norms, so that a norm written in the wrong place shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(str(path))
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, path / name)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, smollm2_dir) -> Path:
    return _make_model(tmp_path_factory.mktemp("tiny") / "model", Path(smollm2_dir))


@pytest.fixture(scope="session")
def tiny_f32(tiny_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    write_gguf(tiny_dir, out, "f32")
    return out


@pytest.fixture(scope="session")
def tiny_f16(tiny_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "tiny-f16.gguf"
    write_gguf(tiny_dir, out, "f16")
    return out


def _hf_weights(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@functools.lru_cache(maxsize=None)
def _reader_cached(path: str, mtime: float):
    import gguf

    return gguf.GGUFReader(path)


def _reader(path):
    """GGUFReader parses every metadata array when opened (seconds for a 49k vocabulary): open once."""
    return _reader_cached(str(path), Path(path).stat().st_mtime)


def _tensors(path) -> dict:
    return {t.name: t for t in _reader(path).tensors}


def _field(path, key):
    f = _reader(path).fields.get(key)
    return None if f is None else f.contents()


def _expected_names(n_layers=2, tied=True) -> set[str]:
    names = {"token_embd.weight", "output_norm.weight"} | ({"output.weight"} if not tied else set())
    for i in range(n_layers):
        names |= {
            f"blk.{i}.{p}.weight"
            for p in (
                "attn_norm",
                "attn_q",
                "attn_k",
                "attn_v",
                "attn_output",
                "ffn_norm",
                "ffn_gate",
                "ffn_up",
                "ffn_down",
            )
        }
    return names


def _as_array(t) -> np.ndarray:
    """A GGUF tensor as float32 in numpy (row-major, HF) shape."""
    import gguf

    shape = [int(d) for d in reversed(t.shape)]
    return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32).reshape(shape)


HF_OF = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _hf_name(gguf_name: str) -> str:
    if gguf_name.startswith("blk."):
        _, i, part, kind = gguf_name.split(".")
        return f"model.layers.{i}.{HF_OF[part]}.{kind}"
    return {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }[gguf_name]


# ---- GGUF tensors and metadata ------------------------------------------------------------------------
def test_f32_tensors_are_exact_and_qk_permuted(tiny_dir, tiny_f32):
    import gguf

    hf = _hf_weights(tiny_dir)
    tensors = _tensors(tiny_f32)
    assert set(tensors) == _expected_names(tied=True)  # tied: no output.weight
    for name, t in tensors.items():
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
        got, want = _as_array(t), hf[_hf_name(name)]
        assert got.shape == want.shape, name
        if name.endswith("attn_q.weight"):
            assert not np.array_equal(got, want)  # really permuted...
            got = unpermute_rows(got, N_HEAD)  # ...and exactly invertible
        elif name.endswith("attn_k.weight"):
            assert not np.array_equal(got, want)
            got = unpermute_rows(got, N_KV)
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_f16_matrices_norms_stay_f32(tiny_dir, tiny_f16):
    import gguf

    hf = _hf_weights(tiny_dir)
    for name, t in _tensors(tiny_f16).items():
        want = hf[_hf_name(name)]
        if want.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.F16, name
            if name.endswith("attn_q.weight"):
                want = unpermute_rows(_as_array(t), N_HEAD), want
                np.testing.assert_array_equal(want[0], want[1].astype(np.float16).astype(np.float32))
                continue
            if not name.endswith("attn_k.weight"):
                np.testing.assert_array_equal(_as_array(t), want.astype(np.float16).astype(np.float32))
    assert _field(tiny_f16, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_F16)


def test_q8_0_and_bf16(tiny_dir, tmp_path):
    import gguf

    hf = _hf_weights(tiny_dir)
    for outtype, qtype, tol in (
        ("q8_0", gguf.GGMLQuantizationType.Q8_0, 0.02),
        ("bf16", gguf.GGMLQuantizationType.BF16, 0.01),
    ):
        path = tmp_path / f"t-{outtype}.gguf"
        summary = write_gguf(tiny_dir, path, outtype)
        assert summary["outtype"] == outtype and summary["n_tensors"] == len(_expected_names())
        for name, t in _tensors(path).items():
            want = hf[_hf_name(name)]
            expect = gguf.GGMLQuantizationType.F32 if want.ndim == 1 else qtype
            assert t.tensor_type == expect, name
            if name.endswith(("attn_q.weight", "attn_k.weight")):
                continue
            got = _as_array(t)
            assert np.abs(got - want).max() <= tol * np.abs(want).max() + 1e-6, name


def test_metadata(tiny_f16):
    def f(key):
        return _field(tiny_f16, key)

    assert f("general.architecture") == "llama"
    assert f("llama.context_length") == 512
    assert f("llama.embedding_length") == 64
    assert f("llama.block_count") == 2
    assert f("llama.feed_forward_length") == 128
    assert f("llama.attention.head_count") == N_HEAD
    assert f("llama.attention.head_count_kv") == N_KV
    assert f("llama.rope.dimension_count") == 16
    assert f("llama.rope.freq_base") == pytest.approx(100000.0)
    assert f("llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert f("llama.vocab_size") == 49152
    assert f("tokenizer.ggml.model") == "gpt2"
    assert f("tokenizer.ggml.pre") == "smollm"
    assert f("tokenizer.ggml.eos_token_id") == 2
    assert f("tokenizer.ggml.bos_token_id") == 1
    assert f("tokenizer.ggml.add_bos_token") is False  # written explicitly
    assert f("tokenizer.ggml.add_eos_token") is False
    assert "<|im_start|>" in f("tokenizer.chat_template")
    tokens, types = f("tokenizer.ggml.tokens"), f("tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == 49152
    assert tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] and types[:3] == [3, 3, 3]
    assert types[1000] == 1
    assert all(" " in m for m in f("tokenizer.ggml.merges")[:100])


class _Progress:
    """The two calls the writer makes on a rich Progress."""

    def __init__(self):
        self.total, self.done = None, 0

    def add_task(self, description, total):
        self.total = total
        return 0

    def advance(self, task):
        self.done += 1


def test_sharded_checkpoint_gives_the_same_file(tmp_path, tiny_dir):
    from safetensors.numpy import save_file

    hf = _hf_weights(tiny_dir)
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_dir, sharded)
    (sharded / "model.safetensors").unlink()
    names = sorted(hf)
    parts = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, keys in parts.items():
        save_file({k: hf[k] for k in keys}, str(sharded / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in keys})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    progress = _Progress()
    write_gguf(sharded, tmp_path / "s.gguf", "f16", progress, name="tiny")
    write_gguf(tiny_dir, tmp_path / "u.gguf", "f16", name="tiny")
    assert (tmp_path / "s.gguf").read_bytes() == (tmp_path / "u.gguf").read_bytes()
    assert progress.total == progress.done == len(_expected_names())
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["s.gguf", "u.gguf"]  # no temp files left


def test_bf16_checkpoint_is_read_exactly(tmp_path, tiny_dir):
    import torch
    from safetensors.torch import load_file, save_file

    bf16_dir = tmp_path / "bf16"
    shutil.copytree(tiny_dir, bf16_dir)
    weights = {k: v.to(torch.bfloat16) for k, v in load_file(str(tiny_dir / "model.safetensors")).items()}
    save_file(weights, str(bf16_dir / "model.safetensors"), metadata={"format": "pt"})
    write_gguf(bf16_dir, tmp_path / "b.gguf", "f32")
    tensors = _tensors(tmp_path / "b.gguf")
    for name in ("token_embd.weight", "blk.1.ffn_down.weight", "blk.0.attn_norm.weight"):
        want = weights[_hf_name(name)].to(torch.float32).numpy()
        np.testing.assert_array_equal(_as_array(tensors[name]), want)


# ---- refusals: nothing is written -------------------------------------------------------------------
def test_unknown_architecture_refused_before_writing(tmp_path, tiny_dir):
    model = tmp_path / "gpt2ish"
    shutil.copytree(tiny_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (model / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    with pytest.raises(BadInput) as err:
        export(model, out, "x")
    assert "GPT2LMHeadModel" in str(err.value) and "LlamaForCausalLM" in str(err.value)
    assert "MistralForCausalLM" in str(err.value)
    assert not out.exists() or not any(out.iterdir())


def test_unrecognised_pretokenizer_refused(tmp_path, tiny_dir):
    model = tmp_path / "oddtok"
    shutil.copytree(tiny_dir, model)
    tok = json.loads((model / "tokenizer.json").read_text(encoding="utf-8"))
    tok["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": r"\p{N}{1,5}|[^\s]+"}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ],
    }
    (model / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(BadInput) as err:
        export(model, out, "x")
    msg = str(err.value) + err.value.hint
    assert "pre-tokenizer not recognised" in msg and r"\\p{N}{1,5}" in msg and "smollm" in msg
    assert not out.exists() or not any(out.iterdir())


def test_non_bpe_tokenizer_refused(tmp_path, tiny_dir):
    model = tmp_path / "unigram"
    shutil.copytree(tiny_dir, model)
    tok = json.loads((model / "tokenizer.json").read_text(encoding="utf-8"))
    tok["model"] = {"type": "Unigram", "unk_id": 0, "vocab": [["<unk>", 0.0], ["a", -1.0]]}
    (model / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")
    with pytest.raises(BadInput, match="Unigram"):
        export(model, tmp_path / "out", "x")
    assert not (tmp_path / "out").exists()


def test_bad_values_refused():
    with pytest.raises(BadInput):
        quote_value('fine"""\nFROM /etc/passwd', "system prompt")
    with pytest.raises(BadInput):
        quote_value("zero\u200bwidth", "system prompt")  # Ollama's parser would drop it silently


# ---- Modelfile ---------------------------------------------------------------------------------------
def test_modelfile_template_stops_and_default_system(tiny_dir, tmp_path):
    mf = tmp_path / "Modelfiles" / "tiny.Modelfile"
    result = export(tiny_dir, tmp_path / "out", "tiny-med", quants=("f16",), modelfile_path=mf)
    assert result.modelfile_path == mf and result.gguf_paths["f16"] == tmp_path / "out" / "tiny-med-f16.gguf"
    text = result.modelfile_text
    assert text == result.modelfile_path.read_text(encoding="utf-8")
    cmds = parse_modelfile(text)
    model = [v for k, v in cmds if k == "model"]
    assert model == ["../out/tiny-med-f16.gguf"]  # relative to the Modelfile's folder, as Ollama reads it
    assert (mf.parent / model[0]).resolve() == result.gguf_paths["f16"].resolve()
    assert result.family == "chatml"
    template = [v for k, v in cmds if k == "template"]
    assert len(template) == 1 and "{{ .Content }}" in template[0]
    stops = [v for k, v in cmds if k == "stop"]
    assert stops == ["<|im_end|>", "<|im_start|>", "<|endoftext|>"] == result.stops
    # SYSTEM is exactly the default the HF template inserts when a conversation has no system message.
    system = [v for k, v in cmds if k == "system"]
    hf = hf_render(tiny_dir, [{"role": "user", "content": "x"}])
    assert system == [DEFAULT_SYSTEM] and hf.startswith(f"<|im_start|>system\n{system[0]}<|im_end|>\n")
    params = dict((k, v) for k, v in cmds if k not in ("model", "template", "system", "stop"))
    assert params["num_ctx"] == "512"  # min(model context, 4096)
    assert float(params["temperature"]) > 0 and 1.0 <= float(params["repeat_penalty"]) <= 1.2
    assert result.ollama_commands == [f"ollama create tiny-med -f {result.modelfile_path}", "ollama run tiny-med"]
    # manifest: inputs and outputs hashed
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["inputs"]["files"]["model.safetensors"] == sha256_file(tiny_dir / "model.safetensors")
    assert manifest["inputs"]["files"]["tokenizer.json"] == sha256_file(tiny_dir / "tokenizer.json")
    gguf_out = manifest["outputs"][str(result.gguf_paths["f16"])]
    assert gguf_out["sha256"] == sha256_file(result.gguf_paths["f16"])
    assert manifest["versions"]["gguf"] and manifest["versions"]["transformers"]
    info = inspect_gguf(result.gguf_paths["f16"])
    assert info["architecture"] == "llama" and info["n_tensors"] == len(_expected_names())
    assert info["tensor_types"] == {"F16": 15, "F32": 5}
    assert info["metadata"]["tokenizer.ggml.tokens"]["len"] == 49152


def _ollama_from(modelfile: Path) -> Path:
    """The file Ollama takes FROM to name (parser/parser.go expandPath): a relative path is joined to the
    Modelfile's folder, lexically; written out here on its own so that medtune.ollama is checked against it."""
    import os

    value = next(v for k, v in parse_modelfile(modelfile.read_text(encoding="utf-8")) if k == "model")
    assert not os.path.isabs(value) and not value.startswith("~"), value
    return Path(os.path.normpath(os.path.join(os.path.abspath(modelfile.parent), value)))


@pytest.mark.parametrize("layout", ["beside", "below", "sibling folders"])
def test_modelfile_from_is_relative_to_the_modelfiles_folder(tiny_dir, tmp_path, layout):
    """FROM is `./NAME.gguf` beside the Modelfile, `./sub/NAME.gguf` below it, `../models/run/NAME.gguf` from
    Modelfiles/; it names the GGUF the way Ollama resolves it, and medtune's own reader agrees."""
    from medtune.ollama import read_modelfile

    root = tmp_path / "proj"
    out, mf, want = {
        "beside": (root / "runs" / "r1", root / "runs" / "r1" / "r1.Modelfile", "./r1-f16.gguf"),
        "below": (root / "runs" / "r1" / "gguf", root / "runs" / "r1" / "r1.Modelfile", "./gguf/r1-f16.gguf"),
        "sibling folders": (root / "models" / "r1", root / "Modelfiles" / "r1.Modelfile", "../models/r1/r1-f16.gguf"),
    }[layout]
    res = export(tiny_dir, out, "r1", quants=("f16",), modelfile_path=mf)
    assert [v for k, v in parse_modelfile(res.modelfile_text) if k == "model"] == [want]
    assert _ollama_from(mf) == res.gguf_paths["f16"]
    assert read_modelfile(mf).gguf == res.gguf_paths["f16"].resolve()


def test_a_moved_export_still_names_its_gguf(tiny_dir, tmp_path):
    """Moving (or copying to another machine) the folder that holds the Modelfile and the GGUF keeps FROM right:
    both runs/<name>/ alone and models/ + Modelfiles/ together."""
    from medtune.ollama import read_modelfile

    a, b, elsewhere = tmp_path / "a", tmp_path / "b", tmp_path / "elsewhere" / "r1"
    run = a / "runs" / "r1"
    export(tiny_dir, run / "gguf", "r1", quants=("f16",), modelfile_path=run / "r1.Modelfile")
    export(tiny_dir, a / "models" / "r2", "r2", quants=("f16",), modelfile_path=a / "Modelfiles" / "r2.Modelfile")
    shutil.move(str(a), str(b))
    shutil.copytree(b / "runs" / "r1", elsewhere)  # runs/<name> alone, somewhere else
    for mf, gguf in (
        (b / "runs" / "r1" / "r1.Modelfile", b / "runs" / "r1" / "gguf" / "r1-f16.gguf"),
        (elsewhere / "r1.Modelfile", elsewhere / "gguf" / "r1-f16.gguf"),
        (b / "Modelfiles" / "r2.Modelfile", b / "models" / "r2" / "r2-f16.gguf"),
    ):
        assert _ollama_from(mf) == gguf and gguf.is_file()
        assert read_modelfile(mf).gguf == gguf.resolve()


@pytest.mark.parametrize("system", [None, "You are a cautious triage nurse.\nAlways advise seeing a doctor."])
def test_ollama_rendering_equals_hf(tiny_dir, system):
    text, info = render_modelfile("/models/x.gguf", tiny_dir, system=system)
    cmds = parse_modelfile(text)  # what Ollama reads back, not what we meant to write
    template = next(v for k, v in cmds if k == "template")
    modelfile_system = next((v for k, v in cmds if k == "system"), None)
    for conv in CONVERSATIONS:
        ollama = ollama_prompt(template, conv, modelfile_system)
        if system is not None and conv[0]["role"] != "system":
            conv = [{"role": "system", "content": system}, *conv]
        assert ollama == hf_render(tiny_dir, conv)


def test_system_prompt_injection_cannot_add_instructions(tiny_dir):
    attack = 'Be brief.\nFROM /etc/passwd\nPARAMETER temperature 9\nTEMPLATE {{ .Prompt }}\nSYSTEM pwned\n# comment\n""'
    text, _ = render_modelfile("/models/x.gguf", tiny_dir, system=attack)
    cmds = parse_modelfile(text)
    assert [v for k, v in cmds if k == "system"] == [attack]  # read back verbatim, as one value
    assert [v for k, v in cmds if k == "model"] == ["/models/x.gguf"]
    assert len([1 for k, _ in cmds if k == "template"]) == 1
    assert "9" not in [v for k, v in cmds if k == "temperature"]
    for bad in ('ok"""\nFROM /etc/passwd', 'x """ \nPARAMETER temperature 9', "tab\x0bvt"):
        with pytest.raises(BadInput):
            render_modelfile("/models/x.gguf", tiny_dir, system=bad)
    for odd in ('"quoted"', " leading space", 'ends with a quote"', "tabs\tand\r\nCRLF"):
        text, _ = render_modelfile("/models/x.gguf", tiny_dir, system=odd)
        assert [v for k, v in parse_modelfile(text) if k == "system"] == [odd]


def test_unmatched_chat_template_refused_and_generic_on_request(tmp_path, tiny_dir):
    model = tmp_path / "llama3tpl"
    shutil.copytree(tiny_dir, model)
    tcfg = json.loads((model / "tokenizer_config.json").read_text())
    tcfg["chat_template"] = (
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] }}<|eot_id|>{% endfor %}"
    )
    (model / "tokenizer_config.json").write_text(json.dumps(tcfg))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(BadInput, match="matches no known family"):
        render_modelfile("/m.gguf", model)
    text, info = render_modelfile("/m.gguf", model, family="generic")
    assert info["family"] == "generic" and info["warnings"]
    assert "User:" in [v for k, v in parse_modelfile(text) if k == "stop"]


def test_go_template_interpreter_semantics():
    assert execute("a  {{- 1 -}}  b", {}) == "a1b"
    assert execute("a {{ 1 }} b", {}) == "a 1 b"
    assert execute('{{ if eq .X "y" }}Y{{ else if .Z }}Z{{ else }}N{{ end }}', {"X": "n", "Z": ""}) == "N"
    src = "{{- range $i, $m := .L }}{{ $last := eq (len (slice $.L $i)) 1 }}{{ $i }}{{ .R }}{{ if $last }}!{{ end }}{{ end }}"
    assert execute(src, {"L": [{"R": "a"}, {"R": "b"}]}) == "0a1b!"
    # Ollama merges consecutive same-role messages and prepends SYSTEM unless a system message leads.
    t = "{{ .System }}|{{ range .Messages }}{{ .Role }}:{{ .Content }};{{ end }}"
    msgs = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert ollama_prompt(t, msgs, "S") == "S|system:S;user:a\n\nb;"
    assert ollama_prompt(t, [{"role": "system", "content": "T"}, *msgs], "S") == "T|system:T;user:a\n\nb;"


# ---- llama.cpp loads what we wrote -------------------------------------------------------------------
def test_llama_cpp_tokenizes_like_hf(tiny_f16, tiny_dir):
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    llm = llama_cpp.Llama(
        model_path=str(tiny_f16),
        vocab_only=False,
        n_ctx=256,
        verbose=False,
        logits_all=True,
        n_threads=1,
        n_threads_batch=1,
    )  # a tiny model: threads only add waiting
    for conv in CONVERSATIONS:
        prompt = hf_render(tiny_dir, conv)
        want = tok(prompt, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True) == want
        assert llm.tokenize(prompt.encode("utf-8"), special=True) == want  # the GGUF's add_bos is right
    for text in ("12345 + 678 = 13023", "  two  spaces\tand tab\n\nnew lines", "糖尿病患者的饮食建议", "café 🩺"):
        assert (
            llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
            == tok(text, add_special_tokens=False)["input_ids"]
        )


def _llama_cpp_logits(llama_cpp, path, ids):
    # F32 KV cache: llama.cpp's default F16 cache alone would cost ~1e-2.
    llm = llama_cpp.Llama(
        model_path=str(path),
        vocab_only=False,
        n_ctx=256,
        verbose=False,
        logits_all=True,
        type_k=0,
        type_v=0,
        n_threads=1,
        n_threads_batch=1,
    )
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def _hf_logits(model_dir, ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_llama_cpp_f32_logits_match_transformers(tiny_f32, tiny_dir):
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    ids = tok(hf_render(tiny_dir, CONVERSATIONS[1]), add_special_tokens=False)["input_ids"]
    want = _hf_logits(tiny_dir, ids)
    got = _llama_cpp_logits(llama_cpp, tiny_f32, ids)
    assert np.abs(want).max() > 0.1  # a model that says something
    assert np.abs(got - want).max() < 1e-3


def test_untied_mistral_exports_as_llama_with_output(tmp_path, smollm2_dir):
    llama_cpp = pytest.importorskip("llama_cpp")
    model_dir = _make_model(
        tmp_path / "mistral", Path(smollm2_dir), seed=4, family="Mistral", sliding_window=None, tied=False
    )
    assert json.loads((model_dir / "config.json").read_text())["architectures"] == ["MistralForCausalLM"]
    summary = write_gguf(model_dir, tmp_path / "m.gguf", "f32")
    assert summary["arch"] == "llama" and summary["tied_embeddings"] is False
    tensors = _tensors(tmp_path / "m.gguf")
    assert set(tensors) == _expected_names(tied=False)
    np.testing.assert_array_equal(_as_array(tensors["output.weight"]), _hf_weights(model_dir)["lm_head.weight"])
    ids = list(range(500, 540))
    assert np.abs(_llama_cpp_logits(llama_cpp, tmp_path / "m.gguf", ids) - _hf_logits(model_dir, ids)).max() < 1e-3


def test_llama3_rope_scaling_matches_transformers(tmp_path, smollm2_dir):
    """Llama 3.1-style rope scaling is written as rope_freqs; the logits must still match."""
    llama_cpp = pytest.importorskip("llama_cpp")
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    model_dir = _make_model(
        tmp_path / "l3", Path(smollm2_dir), seed=3, rope_parameters={"rope_theta": 100000.0, **scaling}
    )
    summary = write_gguf(model_dir, tmp_path / "l3.gguf", "f32")
    assert summary["n_tensors"] == len(_expected_names()) + 1  # + rope_freqs.weight
    ids = list(range(1000, 1100))
    got, want = _llama_cpp_logits(llama_cpp, tmp_path / "l3.gguf", ids), _hf_logits(model_dir, ids)
    assert np.abs(got - want).max() < 1e-3


def test_real_go_template_agrees(tiny_dir, go_ollama_render):
    """Where a Go toolchain exists, run our TEMPLATEs on Go's text/template itself."""
    from medtune.export.modelfile import FAMILIES

    cases, ours, hf = [], [], []
    text, _ = render_modelfile("/m.gguf", tiny_dir)
    cmds = parse_modelfile(text)
    chatml, system = next(v for k, v in cmds if k == "template"), next(v for k, v in cmds if k == "system")
    for conv in CONVERSATIONS:
        for template, sys_prompt in ((chatml, system), (FAMILIES["generic"].template, "S")):
            cases.append({"template": template, "system": sys_prompt, "messages": conv})
            ours.append(ollama_prompt(template, conv, sys_prompt))
        hf.append(hf_render(tiny_dir, conv))
    got = go_ollama_render(cases)
    assert got == ours
    assert got[::2] == hf


def _compiled(template: str):
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(template)


# the real templates of the Llama 3.1 / 3.2, Mistral v0.3 and Gemma 3 families, with their special tokens
_NEW_FAMILIES = {
    "llama3.1": ("LLAMA31_TEMPLATE", {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "llama3.2": ("LLAMA32_TEMPLATE", {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "mistral": ("MISTRAL_V03_TEMPLATE", {"bos_token": "<s>", "eos_token": "</s>"}),
    "gemma3": ("GEMMA3_TEMPLATE", {"bos_token": "<bos>", "eos_token": "<eos>"}),
}


def test_new_families_go_templates_render_as_the_real_templates(go_ollama_render):
    """Go's own text/template, given each family's TEMPLATE as Ollama gives it the messages (a Modelfile SYSTEM
    or a system message), builds the prompt the real HF template renders (with medtune's fixed date), BOS left
    to the runtime; our interpreter agrees. Includes a continued assistant reply and multi-turn history."""
    from medtune.export.chat_templates import TEMPLATE_VARS
    from medtune.export.modelfile import FAMILIES

    import families

    convs = [
        *families.CHATS,
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "A"}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "A"}],
    ]
    cases, ours, want = [], [], []
    for name, (const, special) in _NEW_FAMILIES.items():
        family = FAMILIES["llama3.1" if name == "llama3.2" else name]
        hf = _compiled(getattr(families, const))
        for conv in convs:
            prefill = conv[-1]["role"] == "assistant"
            text = hf.render(messages=conv, add_generation_prompt=not prefill, tools=None, **special, **TEMPLATE_VARS)
            system = conv[0]["content"] if conv[0]["role"] == "system" else ""
            for msgs, sys_prompt in ((conv, ""), (conv[1:], system)) if system else ((conv, ""),):
                cases.append({"template": family.template, "system": sys_prompt, "messages": msgs})
                ours.append(ollama_prompt(family.template, msgs, sys_prompt))
                want.append(text[len(family.bos) :])
            assert text.startswith(family.bos) and family.render(conv, not prefill) == text
    got = go_ollama_render(cases)
    assert got == ours == want


def test_llama32_is_detected_with_the_date_fixed_everywhere(tmp_path, smollm2_dir):
    """Llama 3.2's template defaults to today's date (strftime_now): detection renders it with medtune's fixed
    date, so it is the llama3.1 family; the GGUF's template sets that date first, which wins over the date_string
    llama-server passes (today)."""
    from medtune.export.chat_templates import FIXED_DATE, with_fixed_vars
    from medtune.export.modelfile import FAMILIES, detect_family

    import families

    case = {**families.CASES["llama3.1"], "template": families.LLAMA32_TEMPLATE}
    model = tmp_path / "l32"
    model.mkdir()
    families.write_tokenizer(model, Path(smollm2_dir), case)
    match = detect_family(model)
    assert match.family.name == "llama3.1" and match.default_system is None
    assert f"Today Date: {FIXED_DATE}\n\n" in FAMILIES["llama3.1"].template
    conv = families.CHATS[1]
    special = {"bos_token": "<|begin_of_text|>"}
    gguf_text = _compiled(with_fixed_vars(case["template"])).render(
        messages=conv, add_generation_prompt=True, date_string="01 Jan 2031", **special
    )
    assert gguf_text == hf_render(model, conv) == FAMILIES["llama3.1"].render(conv)
    assert "01 Jan 2031" in _compiled(case["template"]).render(messages=conv, date_string="01 Jan 2031", **special)
    assert with_fixed_vars(families.GEMMA3_TEMPLATE) == families.GEMMA3_TEMPLATE  # no date: unchanged


def test_gemma3_default_template_is_detected_as_gemma3(tmp_path, smollm2_dir):
    """medtune's own Gemma 3 template (for a gemma3 GGUF imported without one) renders as the real one on
    text-only chats, raises on the same role orders, and is detected as the gemma3 family."""
    from medtune.export.chat_templates import default_template
    from medtune.export.modelfile import detect_family

    import families

    ours, real = _compiled(default_template("gemma3")), _compiled(families.GEMMA3_TEMPLATE)
    convs = [
        *families.CHATS,
        [{"role": "system", "content": " S "}, {"role": "user", "content": [{"type": "text", "text": " q "}]}],
    ]
    for conv in convs:
        for gen in (True, False):
            assert ours.render(messages=conv, add_generation_prompt=gen, bos_token="<bos>") == real.render(
                messages=conv, add_generation_prompt=gen, bos_token="<bos>"
            )
    for bad in ([{"role": "assistant", "content": "a"}], [{"role": "user", "content": "a"}] * 2):
        for t in (ours, real):
            with pytest.raises(Exception, match="alternate"):
                t.render(messages=bad, add_generation_prompt=True, bos_token="<bos>")
    assert default_template("llama") is None
    model = tmp_path / "g3"
    model.mkdir()
    families.write_tokenizer(
        model, Path(smollm2_dir), {**families.CASES["gemma3"], "template": default_template("gemma3")}
    )
    assert detect_family(model).family.name == "gemma3"


@pytest.mark.parametrize("which", ["llama3.2", "gemma3-default"])
def test_llama_server_renders_the_fixed_date_and_our_gemma_template(tmp_path, smollm2_dir, which):
    """llama.cpp's own Jinja engine (llama-server --jinja, /apply-template) renders the exported GGUF's template
    as HF renders the folder's for training: Llama 3.2's with medtune's fixed date although llama-server passes
    today's, and medtune's own Gemma 3 template."""
    from medtune.export.chat_templates import FIXED_DATE, default_template
    from medtune.runtimes.llama_server import LlamaServer

    import families

    if which == "llama3.2":
        case = {**families.CASES["llama3.1"], "template": families.LLAMA32_TEMPLATE}
    else:
        case = {**families.CASES["gemma3"], "template": default_template("gemma3")}
    model = families.make_model(tmp_path / "hf", Path(smollm2_dir), case)
    res = export(model, tmp_path / "out", "t", quants=("f32",))
    assert res.family == ("llama3.1" if which == "llama3.2" else "gemma3") and not res.warnings
    convs = [*families.CHATS[:3], [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}]]
    bos = case["post_bos"]
    with LlamaServer(res.gguf_paths["f32"], ctx=512) as srv:
        for conv in convs:
            want = hf_render(model, conv)
            assert want.startswith(bos) and srv.apply_template(conv) == want[len(bos) :]  # BOS: the runtime's
    assert (f"Today Date: {FIXED_DATE}\n" in hf_render(model, convs[0])) is (which == "llama3.2")
    if which == "llama3.2":  # eval fidelity's own template check renders HF's side with the same date
        from medtune.eval.fidelity import fidelity

        report = fidelity(model, res.gguf_paths["f32"], ["What lowers a fever?"], tokens=4, runtime="llama-server")
        assert report.templates and all(t.rendered_equal for t in report.templates), report.to_dict()
        from transformers import AutoTokenizer

        from medtune.runtimes.mlx import render_prompt  # medtune chat / generate on MLX

        assert render_prompt(AutoTokenizer.from_pretrained(str(model)), convs[0]) == hf_render(model, convs[0])


def test_a_template_llama_cpp_cannot_parse_is_refused_before_writing(tmp_path, tiny_dir):
    """A {% with %} block renders in transformers but not in llama.cpp's Jinja engine (llama-server --jinja,
    Ollama >= 0.30): refused with the reason before anything is written. A comment naming it is not a use."""
    from medtune.export.chat_templates import llama_cpp_refusal

    model = tmp_path / "withtpl"
    shutil.copytree(tiny_dir, model)
    tcfg = json.loads((model / "tokenizer_config.json").read_text())
    tcfg["chat_template"] = "{% with x = 1 %}{% endwith %}" + tcfg["chat_template"]
    (model / "tokenizer_config.json").write_text(json.dumps(tcfg))
    out = tmp_path / "out"
    with pytest.raises(BadInput, match=r"\{% with %\}.*llama.cpp"):
        export(model, out, "x")
    assert not out.exists() or not any(out.iterdir())
    assert llama_cpp_refusal("{# {% include 'x' %} #}{% for m in messages %}{% endfor %}") is None
