"""The SentencePiece tokenizer kind (Gemma, Llama 2, Mistral): `tokenizer.ggml.model` "llama".

llama.cpp's SentencePiece tokenizer splits text into characters (spaces written as "▁") and keeps merging the
adjacent pair whose joined text is the vocabulary token with the highest score; characters left without a token
become <0xXX> byte tokens. A Hugging Face `tokenizer.json` expresses the same as a BPE model with byte fallback
whose merges are every split of every token into two tokens, ranked by the joined token's score.

Export reads such a tokenizer.json into tokens, scores (ranked so that llama.cpp merges in the tokenizer.json's
merge order) and token types; import writes a GGUF's vocabulary back as one, merges derived from the scores.
A normalizer or pre-tokenizer other than the space-to-"▁" replacement (with or without a leading "▁") is
refused: llama.cpp would tokenize differently from training. One difference is llama.cpp's own and is let
through: with a space prefix it adds the "▁" again after every special token, where a Metaspace pre-tokenizer
with prepend_scheme "first" (Mistral v0.3's tokenizer.json) adds it at the start of the text only.
"""

from __future__ import annotations

import json
import re

from medtune.core.errors import BadInput
from medtune.export.tokenizer import (
    CONTROL,
    NORMAL,
    UNUSED,
    USER_DEFINED,
    TokenizerKind,
    added_token,
    bos_eos_processor,
    register_kind,
    tokens_by_id,
)

UNKNOWN, BYTE = 2, 6
SPACE = "▁"  # U+2581, SentencePiece's visible space
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")
# scores llama.cpp's converter gives tokens that are never merged into: added tokens, padding rows
ADDED_SCORE, PAD_SCORE, BYTE_SCORE = -1000.0, -10000.0, 0.0


@register_kind
class SentencePiece(TokenizerKind):
    gguf_model = "llama"
    name = "SentencePiece"
    describe = "SentencePiece BPE tokenizers with byte fallback (Gemma, Llama 2, Mistral)"

    # ---- export: tokenizer.json -> GGUF --------------------------------------------------------------
    @classmethod
    def matches(cls, tok: dict) -> bool:
        model = tok.get("model") or {}
        return model.get("type") == "BPE" and bool(model.get("byte_fallback"))

    @classmethod
    def read(cls, tok: dict, where: str, n_vocab: int | None) -> tuple[list[str], list[int], list[str], str]:
        _space_prefix(tok, where)  # refuses a normalizer / pre-tokenizer llama.cpp does not reproduce
        tokens, types = tokens_by_id(tok, where, n_vocab)
        unk = (tok.get("model") or {}).get("unk_token")
        for i, (text, kind) in enumerate(zip(tokens, types)):
            if kind == NORMAL and _BYTE_TOKEN.fullmatch(text):
                types[i] = BYTE
            elif kind == NORMAL and text == unk:
                types[i] = UNKNOWN
            elif kind == USER_DEFINED:  # llama.cpp finds them in the raw text, before spaces become "▁"
                tokens[i] = text.replace(SPACE, " ")
        _check_bytes(tokens, types, where)
        return tokens, types, [], "default"

    @classmethod
    def extras(cls, tok: dict, where: str, tokens: list[str], types: list[int]) -> dict:
        return {"scores": _scores(tok, where, tokens, types), "add_space_prefix": _space_prefix(tok, where)}

    # ---- import: GGUF -> tokenizer.json --------------------------------------------------------------
    @classmethod
    def pretokenizer(cls, pre_name: str, where: str) -> None:
        """llama.cpp ignores `tokenizer.ggml.pre` for SentencePiece vocabularies: any name is accepted."""
        return None

    @classmethod
    def check_gguf(cls, meta: dict, where: str) -> None:
        """Refuse a SentencePiece GGUF whose tokenization a tokenizer.json cannot reproduce."""
        if "tokenizer.ggml.scores" not in meta:
            raise BadInput(
                "the GGUF's SentencePiece vocabulary has no scores (tokenizer.ggml.scores)",
                where=where,
                hint="the merge order cannot be known; convert the model again with llama.cpp's converter",
            )
        if meta.get("tokenizer.ggml.remove_extra_whitespaces"):
            raise BadInput(
                "the GGUF's tokenizer removes extra whitespace, which a tokenizer.json cannot reproduce",
                where=where,
                hint="only SentencePiece vocabularies without remove_extra_whitespaces can be imported",
            )

    @classmethod
    def tokenizer_json(cls, meta: dict, where: str, specials: dict) -> dict:
        """tokenizer.json for a GGUF's vocabulary. specials: {"bos"/"eos": (id, text)}, "add_bos"/"add_eos"."""
        cls.check_gguf(meta, where)
        tokens = list(meta["tokenizer.ggml.tokens"])
        scores = list(meta["tokenizer.ggml.scores"])
        types = list(meta.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens)))
        _check_bytes(tokens, types, where)
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))  # llama.cpp's default for SPM
        unk = next((tokens[i] for i, t in enumerate(types) if t == UNKNOWN), None)
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": _added_tokens(tokens, types),
            "normalizer": _normalizer(prefix),
            "pre_tokenizer": None,
            "post_processor": bos_eos_processor(specials),
            "decoder": _decoder(prefix),
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": unk,
                "continuing_subword_prefix": None,
                "end_of_word_suffix": None,
                "fuse_unk": True,
                "byte_fallback": True,
                "ignore_merges": False,
                "vocab": _vocab(tokens),
                "merges": merges_from_scores(tokens, scores, types),
            },
        }


# ---- export helpers ------------------------------------------------------------------------------------
def _replace_space(node) -> bool:
    return (
        isinstance(node, dict)
        and node.get("type") == "Replace"
        and (node.get("pattern") or {}).get("String") == " "
        and node.get("content") == SPACE
    )


def _prepend_space(node) -> bool:
    return isinstance(node, dict) and node.get("type") == "Prepend" and node.get("prepend") == SPACE


def _split_on_space(node) -> bool:
    """Gemma's pre-tokenizer: a split on the space character (transformers' GemmaTokenizer sets it)."""
    return (
        isinstance(node, dict)
        and node.get("type") == "Split"
        and (node.get("pattern") or {}).get("String") == " "
        and not node.get("invert", False)
    )


def _space_prefix(tok: dict, where: str) -> bool:
    """add_space_prefix, from the forms that write spaces as "▁" the way llama.cpp does: the normalizer
    Replace(" " -> "▁"), optionally after Prepend("▁"), or a Metaspace pre-tokenizer that does not split.
    Anything else is refused."""
    norm, pre = tok.get("normalizer"), tok.get("pre_tokenizer")
    steps = norm.get("normalizers") if isinstance(norm, dict) and norm.get("type") == "Sequence" else [norm]
    steps = [s for s in steps or [] if s]
    replaced = bool(steps) and _replace_space(steps[-1])
    if replaced and (pre is None or _split_on_space(pre)):  # no space is left to split on after the replacement
        if len(steps) == 1:
            return False
        if len(steps) == 2 and _prepend_space(steps[0]):
            return True
    if not steps and isinstance(pre, dict) and pre.get("type") == "Metaspace" and pre.get("replacement") == SPACE:
        scheme = pre.get("prepend_scheme", "always" if pre.get("add_prefix_space", True) else "never")
        if not pre.get("split", False) and scheme in ("always", "first", "never"):
            return scheme != "never"
    found = json.dumps({"normalizer": norm, "pre_tokenizer": pre}, ensure_ascii=False)
    raise BadInput(
        f"SentencePiece tokenizer with a normalizer / pre-tokenizer llama.cpp does not reproduce: {found[:300]}",
        where=where,
        hint='llama.cpp only writes spaces as "▁" (optionally with a leading "▁"); other normalizers or a '
        "splitting pre-tokenizer would tokenize differently from training",
    )


def _check_bytes(tokens: list[str], types: list[int], where: str) -> None:
    """Byte fallback needs all 256 <0xXX> tokens (llama.cpp stops on a missing one)."""
    have = {t for t, k in zip(tokens, types) if k == BYTE}
    if len(have) != 256:
        raise BadInput(
            f"the SentencePiece vocabulary has {len(have)} of the 256 byte tokens <0x00>..<0xFF>",
            where=where,
            hint="only SentencePiece vocabularies with byte fallback can be converted",
        )


def _merge_pairs(merges: list, where: str) -> list[tuple[str, str]]:
    pairs = []
    for m in merges:
        pair = m.split(" ", 1) if isinstance(m, str) else m
        if len(pair) != 2:
            raise BadInput(f"merge {m!r} is not a pair", where=where, hint="re-save the tokenizer")
        pairs.append((pair[0], pair[1]))
    return pairs


def _scores(tok: dict, where: str, tokens: list[str], types: list[int]) -> list[float]:
    """Scores that make llama.cpp merge in the tokenizer.json's merge order.

    llama.cpp merges by the joined token's score, HF by the pair's rank: they agree when the merges producing
    one token are consecutive and every split of a token into two tokens is a merge (as SentencePiece-derived
    tokenizer.json files are). When the merges follow token ids, normal tokens are scored by id, as
    SentencePiece does; else by the first merge producing them. Merges making an added token (transformers
    writes them for SentencePiece's user-defined pieces, such as Gemma's runs of spaces) never apply: both HF
    and llama.cpp take added tokens out of the text first."""
    index = {t: i for i, t in enumerate(tokens) if types[i] == NORMAL}
    known = set((tok.get("model") or {}).get("vocab") or {}) | {a["content"] for a in tok.get("added_tokens") or []}
    first: dict[int, int] = {}  # token id -> rank of its first merge
    previous = -1
    pairs = _merge_pairs((tok.get("model") or {}).get("merges") or [], where)
    for rank, (a, b) in enumerate(pairs):
        joined = index.get(a + b)
        if joined is None:
            if a + b in known:  # an added, byte or control token
                continue
            raise BadInput(f"merge {a!r} + {b!r} makes no token", where=where, hint="re-save the tokenizer")
        if joined not in first:
            first[joined] = rank
        elif first[joined] != previous:
            raise BadInput(
                f"the merges making {a + b!r} are not consecutive: llama.cpp merges by token score, so this "
                "tokenizer's merge order cannot be written as scores",
                where=where,
                hint="only SentencePiece-derived tokenizers (merges ranked by token) can be exported",
            )
        previous = first[joined]
    _check_all_splits(tokens, types, {(a, b) for a, b in pairs}, where)
    by_id = sorted(first) == [i for i in sorted(first, key=first.get)]
    scores, normal = [], 0
    for i, kind in enumerate(types):
        if kind == NORMAL:
            scores.append(-float(normal) if by_id else -float(first.get(i, len(first) + i)))
            normal += 1
        else:
            scores.append({BYTE: BYTE_SCORE, UNUSED: PAD_SCORE}.get(kind, ADDED_SCORE))
    return scores


def _check_all_splits(tokens: list[str], types: list[int], pairs: set, where: str) -> None:
    """llama.cpp merges any two adjacent pieces that make a token; HF only the pairs listed: refuse a
    tokenizer.json that leaves out a split of a token into two tokens."""
    normal = {t for t, k in zip(tokens, types) if k == NORMAL}
    missing = [
        (t[:k], t[k:])
        for t in normal
        for k in range(1, len(t))
        if t[:k] in normal and t[k:] in normal and (t[:k], t[k:]) not in pairs
    ]
    if missing:
        raise BadInput(
            f"{len(missing)} splits of tokens into two tokens are not merges (e.g. {missing[0]!r}): llama.cpp "
            "would merge them and tokenize differently",
            where=where,
            hint="only SentencePiece-derived tokenizers (every split of a token is a merge) can be exported",
        )


# ---- import helpers ------------------------------------------------------------------------------------
def merges_from_scores(tokens: list[str], scores: list[float], types: list[int]) -> list[list[str]]:
    """Every split of a normal token into two normal tokens, ranked by the joined token's score (highest
    first, then by id): the pairs llama.cpp's SentencePiece tokenizer merges, in its order."""
    normal = {t: i for i, t in enumerate(tokens) if types[i] == NORMAL}
    ranked = sorted(
        (i for t, i in normal.items() if len(t) > 1),
        key=lambda i: (-scores[i], i),
    )
    merges = []
    for i in ranked:
        text = tokens[i]
        for k in range(1, len(text)):
            a, b = text[:k], text[k:]
            if a in normal and b in normal:
                merges.append([a, b])
    return merges


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a duplicate text keeps its first id, as llama.cpp's text -> id map does
    return vocab


def _added_tokens(tokens: list[str], types: list[int]) -> list[dict]:
    """Control, unknown and user-defined tokens: llama.cpp finds them in the raw text before tokenizing."""
    return [
        added_token(i, t, types[i] != USER_DEFINED)
        for i, t in enumerate(tokens)
        if types[i] in (CONTROL, UNKNOWN, USER_DEFINED)
    ]


def _normalizer(prefix: bool) -> dict:
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
    if not prefix:
        return replace
    return {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": SPACE}, replace]}


def _decoder(prefix: bool) -> dict:
    steps = [
        {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if prefix:  # llama.cpp drops the space it added in front of the text
        steps.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {"type": "Sequence", "decoders": steps}
