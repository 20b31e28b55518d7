"""The byte-level BPE tokenizer kind (GPT-2 style: Llama 3, Qwen, SmolLM, DeepSeek): `tokenizer.ggml.model` "gpt2".

Export reads a `tokenizer.json` into the GGUF's token list, types and merges; its pre-tokenizer is recognised
from its definition (medtune.export.pretok) and named as llama.cpp names it. Import writes the GGUF's
vocabulary back as a `tokenizer.json` whose pre-tokenizer splits text exactly as llama.cpp does.
"""

from __future__ import annotations

import json

from medtune.core.errors import BadInput
from medtune.export import pretok
from medtune.export.tokenizer import (
    CONTROL,
    USER_DEFINED,
    TokenizerKind,
    added_token,
    bos_eos_processor,
    register_kind,
    tokens_by_id,
)


@register_kind
class ByteLevelBPE(TokenizerKind):
    gguf_model = "gpt2"  # tokenizer.ggml.model (no hyphen; the pre-tokenizer `gpt-2` is another key)
    name = "byte-level BPE"
    describe = "byte-level BPE tokenizers (GPT-2 style: Llama 3, Qwen, SmolLM)"

    # ---- export: tokenizer.json -> GGUF --------------------------------------------------------------
    @classmethod
    def matches(cls, tok: dict) -> bool:
        return (tok.get("model") or {}).get("type") == "BPE" and _byte_level(tok)

    @classmethod
    def read(cls, tok: dict, where: str, n_vocab: int | None) -> tuple[list[str], list[int], list[str], str]:
        _check_normalizer(tok, where)
        pre = _recognise_pretokenizer(tok, where)
        tokens, types = tokens_by_id(tok, where, n_vocab)
        return tokens, types, _merges(tok.get("model") or {}, where), pre.name

    # ---- import: GGUF -> tokenizer.json --------------------------------------------------------------
    @classmethod
    def pretokenizer(cls, pre_name: str, where: str) -> pretok.PreTokenizer:
        pre = pretok.by_name(pre_name)  # llama.cpp's name, or an alias such as "gpt2" (older medtune GGUFs)
        if pre is None:
            raise BadInput(
                f"GGUF pre-tokenizer {pre_name!r} is not in our registry",
                where=where,
                hint=f"known: {', '.join(sorted(pretok.REGISTRY))} (also read: {', '.join(sorted(pretok.ALIASES))})",
            )
        return pre

    @classmethod
    def tokenizer_json(cls, meta: dict, where: str, specials: dict) -> dict:
        """tokenizer.json for a GGUF's vocabulary. specials: {"bos"/"eos": (id, text)}, "add_bos"/"add_eos"."""
        pre = cls.pretokenizer(meta.get("tokenizer.ggml.pre", "default"), where)
        tokens = list(meta["tokenizer.ggml.tokens"])
        types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
        merges = [m.split(" ", 1) for m in meta.get("tokenizer.ggml.merges", [])]
        added = [
            added_token(i, t, types[i] == CONTROL) for i, t in enumerate(tokens) if types[i] in (CONTROL, USER_DEFINED)
        ]
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added,
            "normalizer": None,
            "pre_tokenizer": pre.hf,
            "post_processor": _post_processor(specials),
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": None,
                "continuing_subword_prefix": None,
                "end_of_word_suffix": None,
                "fuse_unk": False,
                "byte_fallback": False,
                "ignore_merges": False,
                "vocab": {t: i for i, t in enumerate(tokens)},
                "merges": merges,
            },
        }


def _post_processor(specials: dict) -> dict:
    """Byte-level offsets, and BOS/EOS added around every encoding where the GGUF says so."""
    post: dict = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    around = bos_eos_processor(specials)
    return post if around is None else {"type": "Sequence", "processors": [post, around]}


def _check_normalizer(tok: dict, where: str) -> None:
    normalizer = _normalizer_kind(tok.get("normalizer"))
    if normalizer not in (None, "NFC"):
        raise BadInput(
            f"tokenizer normalizer {normalizer!r} cannot be exported",
            where=where,
            hint="llama.cpp's BPE tokenizer does not normalise text; only none and NFC (Qwen's, "
            "a no-op on the composed text people type) keep tokenization the same",
        )


def _recognise_pretokenizer(tok: dict, where: str) -> pretok.PreTokenizer:
    entry = pretok.recognise(tok.get("pre_tokenizer"))
    if entry is not None:
        return entry
    found = json.dumps(tok.get("pre_tokenizer"), ensure_ascii=False)
    if len(found) > 300:
        found = found[:300] + "…"
    raise BadInput(
        f"pre-tokenizer not recognised: {found}",
        where=where,
        hint=f"medtune knows the pre-tokenizers {', '.join(sorted(pretok.REGISTRY))} (a wrong one would split text "
        "differently from training); export with llama.cpp's converter (--converter llama.cpp --llama-cpp DIR) "
        "if it knows this tokenizer, or fine-tune a model whose tokenizer is one of those",
    )


def _merges(model: dict, where: str) -> list[str]:
    """Merges as GGUF writes them: "a b" (tokenizer.json has that or ["a", "b"])."""
    merges = []
    for m in model.get("merges") or []:
        if isinstance(m, str):
            merges.append(m)
            continue
        a, b = m
        if " " in a or " " in b:
            raise BadInput(
                f"merge {m!r} contains a space and cannot be written to GGUF",
                where=where,
                hint="this tokenizer is not a byte-level BPE that llama.cpp can load",
            )
        merges.append(f"{a} {b}")
    return merges


def _byte_level(tok: dict) -> bool:
    def has(node) -> bool:
        if not isinstance(node, dict):
            return False
        if node.get("type") == "ByteLevel":
            return True
        return any(has(p) for p in node.get("pretokenizers", []) or node.get("decoders", []) or [])

    return has(tok.get("pre_tokenizer")) or has(tok.get("decoder"))


def _normalizer_kind(node) -> str | None:
    """The normalizer's type, None when there is none (an empty Sequence counts as none)."""
    if not isinstance(node, dict):
        return None
    if node.get("type") == "Sequence":
        kinds = [_normalizer_kind(n) for n in node.get("normalizers") or []]
        kinds = [k for k in kinds if k]
        return None if not kinds else kinds[0] if len(kinds) == 1 else "+".join(kinds)
    return node.get("type") or "?"
