"""The tokenizer keys of medtune's GGUFs, checked in llama.cpp itself (llama-cpp-python) and with gguf-py's reader:

- `tokenizer.ggml.pre` is a name llama.cpp knows, for every pre-tokenizer registry entry, and llama.cpp then
  splits tricky texts exactly as the HF tokenizer does;
- every end token of a family (its eos set and its end-of-turn token) is in llama.cpp's end-of-generation set,
  through `eos_token_id`/`eot_token_id` (not only through llama.cpp's list of known end-token texts), and
  `tokenizer.ggml.eos_token_ids` holds the eos set as an INT32 array (what Ollama's converter writes and its
  Go engine reads).

Tiny random models only (tests/pretok_models.py, tests/families.py); no hub, no mocks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medtune.export import pretok
from medtune.export.gguf_writer import write_gguf

from families import CASES, make_model
from pretok_models import TRICKY_TEXTS, export_pretok_model

DS_EOS = "<｜end▁of▁sentence｜>"
# The token each family's chat template ends an assistant turn with.
TURN_END = {
    "chatml": "<|im_end|>",
    "qwen3": "<|im_end|>",
    "deepseek-r1": DS_EOS,
    "deepseek-r1-jan": DS_EOS,
    "llama3": "<|eot_id|>",
}
FAMILY_MODELS = [*CASES, "smollm2"]


def _llama_vocab(path: Path):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def _field(path: Path, key: str):
    import gguf

    f = gguf.GGUFReader(str(path)).fields.get(key)
    return None if f is None else f


# ---- pre-tokenizers ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(pretok.REGISTRY))
def test_every_pre_tokenizer_loads_in_llama_cpp_and_splits_like_hf(name, smollm2_dir, tmp_path):
    """An export of each registry entry carries that entry's name, llama.cpp loads it (an unknown
    tokenizer.ggml.pre is refused at load), and its token ids for tricky texts are the HF tokenizer's."""
    pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    model_dir, path = export_pretok_model(tmp_path, smollm2_dir, name)
    assert _field(path, "tokenizer.ggml.pre").contents() == name
    assert _field(path, "tokenizer.ggml.model").contents() == "gpt2"  # llama.cpp's name for byte-level BPE
    llm = _llama_vocab(path)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    for text in TRICKY_TEXTS:
        want = tok(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == want, repr(text)


def test_the_bare_byte_level_split_is_llama_cpps_gpt_2():
    """llama.cpp (src/llama-vocab.cpp) knows "gpt-2"; "gpt2" is only tokenizer.ggml.model's value."""
    entry = pretok.recognise({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True})
    assert entry is not None and entry.name == "gpt-2" and "gpt2" not in pretok.REGISTRY
    assert pretok.by_name("gpt2") is entry  # old GGUFs written by medtune still import


# ---- end tokens --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def family_gguf(tmp_path_factory, smollm2_dir):
    """family model name -> (HF folder, F16 GGUF written by medtune), built once per module."""
    root = tmp_path_factory.mktemp("eog")
    cache = {}

    def get(name):
        if name not in cache:
            if name == "smollm2":
                model_dir = Path(smollm2_dir)
            else:
                model_dir = make_model(root / name / "hf", Path(smollm2_dir), CASES[name])
            path = root / f"{name}.gguf"
            write_gguf(model_dir, path, "f16", name=name)
            cache[name] = (model_dir, path)
        return cache[name]

    return get


def _end_ids(model_dir: Path) -> tuple[list[int], int]:
    """The HF tokenizer's end ids (generation_config's eos_token_id, plus the tokenizer's eos) and its eos."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    gen = json.loads((model_dir / "generation_config.json").read_text()).get("eos_token_id")
    ids = [gen] if isinstance(gen, int) else list(gen or [])
    return list(dict.fromkeys([*ids, tok.eos_token_id])), tok.eos_token_id


def _turn_end(name: str) -> str:
    return "<|im_end|>" if name == "smollm2" else TURN_END.get(CASES[name]["family"], CASES[name]["stops"][0])


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_end_ids_are_written_as_eos_eot_and_an_int32_eos_token_ids(family_gguf, name):
    import gguf

    model_dir, path = family_gguf(name)
    end_ids, eos = _end_ids(model_dir)
    tokens = _field(path, "tokenizer.ggml.tokens").contents()
    turn_end = tokens.index(_turn_end(name))
    assert _field(path, "tokenizer.ggml.eos_token_id").contents() == eos
    eot = _field(path, "tokenizer.ggml.eot_token_id")
    assert eot is not None and eot.contents() == (turn_end if turn_end in end_ids else eos)
    f = _field(path, "tokenizer.ggml.eos_token_ids")
    assert f is not None, "tokenizer.ggml.eos_token_ids missing"
    assert f.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
    assert sorted(f.contents()) == sorted(end_ids)


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_every_end_token_is_end_of_generation_in_llama_cpp(family_gguf, name):
    """llama.cpp stops on its end-of-generation set: every id of the tokenizer's eos set and the end-of-turn
    token are in it, and its eot is the end-of-turn token (what llama-server's chat and Ollama stop on)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model_dir, path = family_gguf(name)
    end_ids, _ = _end_ids(model_dir)
    llm = _llama_vocab(path)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    turn_end = llm.tokenize(_turn_end(name).encode(), add_bos=False, special=True)
    assert len(turn_end) == 1
    for idx in [*end_ids, turn_end[0]]:
        assert llama_cpp.llama_vocab_is_eog(vocab, idx), (idx, llm.detokenize([idx], special=True))
    assert llama_cpp.llama_vocab_eot(vocab) == turn_end[0]


def _renamed_turn_end(smollm2_dir: Path, out: Path) -> Path:
    """SmolLM2 whose end-of-turn token is <|turn_end|> (a text llama.cpp does not know as an end token):
    eos <|endoftext|>, generation_config's eos ids [<|endoftext|>, <|turn_end|>], a ChatML-like template."""
    from conftest import make_tiny_llama

    make_tiny_llama(out, smollm2_dir, layers=1)
    tok = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tok["model"]["vocab"]
    vocab["<|turn_end|>"] = vocab.pop("<|im_end|>")
    for added in tok["added_tokens"]:
        if added["content"] == "<|im_end|>":
            added["content"] = "<|turn_end|>"
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    tcfg = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    tcfg.update(
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=tcfg["chat_template"].replace("<|im_end|>", "<|turn_end|>"),
    )
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, ensure_ascii=False), encoding="utf-8")
    for name in ("generation_config.json", "config.json"):
        cfg = json.loads((out / name).read_text())
        cfg["eos_token_id"] = [0, vocab["<|turn_end|>"]]
        (out / name).write_text(json.dumps(cfg))
    (out / "special_tokens_map.json").unlink(missing_ok=True)
    return out


def test_an_end_of_turn_token_llama_cpp_does_not_know_by_name_still_ends_generation(smollm2_dir, tmp_path):
    """Stopping must not rest on llama.cpp's list of known end-token texts: the template's end-of-turn token
    is written as eot, so llama.cpp stops on it whatever it is called."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model_dir = _renamed_turn_end(Path(smollm2_dir), tmp_path / "hf")
    path = tmp_path / "turn.gguf"
    summary = write_gguf(model_dir, path, "f16")
    llm = _llama_vocab(path)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    (turn_end,) = llm.tokenize(b"<|turn_end|>", add_bos=False, special=True)
    assert turn_end == 2
    assert llama_cpp.llama_vocab_is_eog(vocab, 2) and llama_cpp.llama_vocab_is_eog(vocab, 0)
    assert not llama_cpp.llama_vocab_is_eog(vocab, 1)  # <|im_start|> is no end
    assert llama_cpp.llama_vocab_eot(vocab) == 2 and llama_cpp.llama_vocab_eos(vocab) == 0
    assert summary["eos"] == "<|endoftext|>" and summary["eot"] == "<|turn_end|>"
