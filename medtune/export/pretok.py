"""Pre-tokenizer registry: llama.cpp's `tokenizer.ggml.pre` names <-> HF `tokenizer.json` pre-tokenizers.

llama.cpp's own converter recognises a tokenizer from the hash of a test tokenization and refuses
any hash it has not seen. What actually decides how text is split is the pre-tokenizer definition
(regex splits, digit splitting, byte-level mapping), so we recognise that definition directly.
One entry per pre-tokenizer that llama.cpp implements; the same entry drives both directions:
GGUF import (name -> tokenizer.json piece) and GGUF export (tokenizer.json piece -> name).

Names are llama.cpp's own (src/llama-vocab.cpp): an unknown `tokenizer.ggml.pre` makes llama.cpp refuse
the file. The bare byte-level split is `gpt-2` there; `tokenizer.ggml.model` is a different key, and its
value for byte-level BPE is `gpt2` (no hyphen).
"""

from __future__ import annotations

from dataclasses import dataclass

GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _split(regex: str, behavior: str = "Isolated", invert: bool = False) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": behavior, "invert": invert}


def _bytelevel(use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


@dataclass(frozen=True)
class PreTokenizer:
    name: str  # llama.cpp's tokenizer.ggml.pre
    hf: dict  # the tokenizer.json "pre_tokenizer" value that splits text the same way

    def signature(self) -> tuple:
        return signature(self.hf)


REGISTRY: dict[str, PreTokenizer] = {}
# Other names a GGUF may carry for an entry's split, accepted on import only (export writes the entry's
# own name): "gpt2", which earlier medtune versions wrote for "gpt-2" (llama.cpp does not know it), and
# names that llama.cpp maps to the same split as an entry.
ALIASES: dict[str, str] = {}


def register(name: str, hf: dict, aliases: tuple[str, ...] = ()) -> None:
    REGISTRY[name] = PreTokenizer(name, hf)
    ALIASES.update(dict.fromkeys(aliases, name))


register("gpt-2", _bytelevel(True), aliases=("gpt2",))
register(
    "smollm",
    {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _bytelevel(True)]},
)
register(
    "llama-bpe",
    {"type": "Sequence", "pretokenizers": [_split(LLAMA3_REGEX), _bytelevel(False)]},
    aliases=("llama3", "llama-v3"),
)
register(
    "qwen2",
    {"type": "Sequence", "pretokenizers": [_split(QWEN2_REGEX), _bytelevel(False)]},
    aliases=("deepseek-r1-qwen",),
)


def signature(pre: dict | None) -> tuple:
    """What a pre-tokenizer does, stripped of options that do not change the split."""
    if not pre:
        return ()
    kind = pre.get("type")
    if kind == "Sequence":
        return tuple(p for sub in pre.get("pretokenizers", []) for p in signature(sub))
    if kind == "ByteLevel":
        # With use_regex the byte-level step first splits on the GPT-2 regex.
        pieces = (("split", GPT2_REGEX),) if pre.get("use_regex", True) else ()
        return pieces + (("bytelevel", bool(pre.get("add_prefix_space", False))),)
    if kind == "Digits":
        return (("digits", bool(pre.get("individual_digits", False))),)
    if kind == "Split":
        pat = pre.get("pattern", {})
        regex = pat.get("Regex") if "Regex" in pat else None
        if regex is None:
            return (("split-string", pat.get("String"), pre.get("behavior"), pre.get("invert")),)
        return (
            ("split", regex)
            if not pre.get("invert") and pre.get("behavior") == "Isolated"
            else ("split", regex, pre.get("behavior"), pre.get("invert")),
        )
    return ((kind or "?", repr(sorted(pre.items()))),)


def recognise(pre: dict | None) -> PreTokenizer | None:
    """The registry entry whose split is identical to this tokenizer.json pre_tokenizer, if any."""
    sig = signature(pre)
    for entry in REGISTRY.values():
        if entry.signature() == sig:
            return entry
    return None


def by_name(name: str) -> PreTokenizer | None:
    """The entry for a GGUF's `tokenizer.ggml.pre`: its own name or an alias (ALIASES)."""
    return REGISTRY.get(name) or REGISTRY.get(ALIASES.get(name, ""))
