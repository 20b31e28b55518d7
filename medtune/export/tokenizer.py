"""The tokenizer part of a GGUF, read from a Hugging Face folder, and the registry of tokenizer kinds.

A kind (`tokenizer.ggml.model`: byte-level BPE "gpt2" in medtune.export.bpe; SentencePiece "llama" in
medtune.export.spm) reads
its vocabulary from tokenizer.json for export and writes it back as one on import; what every kind shares
(special tokens, end ids, add_bos/add_eos, the chat template) is read here.

tokenizer.json gives the vocabulary, merges, added tokens and the pre-tokenizer; tokenizer_config.json
the special tokens, add_bos/add_eos and the chat template; generation_config.json / config.json the
end-of-sequence id the model was trained to emit. The pre-tokenizer is recognised from its definition
(medtune.export.pretok) and an unknown one is refused: llama.cpp would split text differently from training.

End tokens: llama.cpp stops on its end-of-generation set, built from `tokenizer.ggml.eos_token_id`,
`eot_token_id`, `eom_token_id` and a list of known end-token texts; so the end-of-turn token the chat
template closes an assistant turn with is written as eot. Ollama's own converter also writes every end
id as `tokenizer.ggml.eos_token_ids` (INT32 array), where Ollama <= 0.24's Go engine takes them from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from medtune.core.errors import BadInput

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
EOS_IDS_KEY = "tokenizer.ggml.eos_token_ids"


@dataclass
class Vocab:
    model: str  # tokenizer.ggml.model
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None
    eos_ids: list[int] = field(default_factory=list)  # every id the model may end a turn with
    eot_id: int | None = None  # the end-of-turn token (tokenizer.ggml.eot_token_id)
    scores: list[float] | None = None  # tokenizer.ggml.scores (SentencePiece: the merge order)
    add_space_prefix: bool | None = None  # tokenizer.ggml.add_space_prefix (SentencePiece)

    def text(self, idx: int | None) -> str | None:
        return self.tokens[idx] if idx is not None and 0 <= idx < len(self.tokens) else None

    def is_special(self, text: str) -> bool:
        try:
            return self.token_types[self.tokens.index(text)] == CONTROL
        except ValueError:
            return False

    def write(self, w) -> None:
        """Add the tokenizer keys to a gguf.GGUFWriter."""
        w.add_tokenizer_model(self.model)
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        w.add_token_types(self.token_types)
        if self.merges:
            w.add_token_merges(self.merges)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        for idx, add in (
            (self.bos_id, w.add_bos_token_id),
            (self.eos_id, w.add_eos_token_id),
            (self.eot_id, w.add_eot_token_id),
            (self.unk_id, w.add_unk_token_id),
            (self.pad_id, w.add_pad_token_id),
        ):
            if idx is not None:
                add(idx)
        if self.eos_ids:
            from gguf import GGUFValueType

            # gguf-py has no helper for this key; the element type is given explicitly: INT32, as Ollama writes
            # and reads it (a UINT32 or INT64 array is not found by Ollama's typed lookup).
            w.add_key_value(
                EOS_IDS_KEY, [int(i) for i in self.eos_ids], GGUFValueType.ARRAY, sub_type=GGUFValueType.INT32
            )
        w.add_add_bos_token(self.add_bos)
        w.add_add_eos_token(self.add_eos)
        if self.chat_template:
            w.add_chat_template(self.chat_template)


def _load_json(path: Path, required: bool = False) -> dict:
    if not path.is_file():
        if required:
            raise BadInput(
                f"no {path.name} in model folder {path.parent}",
                where=str(path.parent),
                hint="export needs a fast tokenizer (tokenizer.json); re-save the tokenizer with transformers",
            )
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path.name} is not valid JSON ({exc})", where=str(path), hint="re-download the model") from exc
    if not isinstance(data, dict):
        raise BadInput(f"{path.name} is not a JSON object", where=str(path), hint="re-download the model")
    return data


def _token_text(value) -> str | None:
    """tokenizer_config writes special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def chat_template(model_dir: str | Path) -> str | None:
    """The tokenizer's default chat template: tokenizer_config.json, else chat_template.jinja/.json."""
    model_dir = Path(model_dir)
    value = _load_json(model_dir / "tokenizer_config.json").get("chat_template")
    if value is None and (model_dir / "chat_template.jinja").is_file():
        value = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if value is None:
        value = _load_json(model_dir / "chat_template.json").get("chat_template")
    if isinstance(value, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) and value else None


def _adds_special(tok: dict, text: str | None, first: bool) -> bool:
    """Does the post-processor put `text` at the start (first) / end of every encoding?"""
    if not text:
        return False
    post = tok.get("post_processor") or {}
    procs = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    for p in procs:
        if p.get("type") == "TemplateProcessing":
            single = p.get("single") or []
            item = single[0] if first else single[-1] if single else None
            if item and "SpecialToken" in item and item["SpecialToken"].get("id") == text:
                return True
    return False


def added_token(idx: int, text: str, special: bool) -> dict:
    """One tokenizer.json added_tokens entry as a GGUF import writes it: matched verbatim in the raw text."""
    return {
        "id": idx,
        "content": text,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": special,
    }


def bos_eos_processor(specials: dict) -> dict | None:
    """The tokenizer.json post-processor that puts BOS/EOS around every encoding where the GGUF says so (None:
    neither). specials: {"bos"/"eos": (id, text)}, "add_bos"/"add_eos" — what every kind's import passes."""
    bos, eos = specials["bos"], specials["eos"]
    add_bos, add_eos = specials["add_bos"] and bos[1] is not None, specials["add_eos"] and eos[1] is not None
    if not (add_bos or add_eos):
        return None
    single = (
        ([{"SpecialToken": {"id": bos[1], "type_id": 0}}] if add_bos else [])
        + [{"Sequence": {"id": "A", "type_id": 0}}]
        + ([{"SpecialToken": {"id": eos[1], "type_id": 0}}] if add_eos else [])
    )
    special_tokens = {
        t[1]: {"id": t[1], "ids": [t[0]], "tokens": [t[1]]} for t, on in ((bos, add_bos), (eos, add_eos)) if on
    }
    return {"type": "TemplateProcessing", "single": single, "pair": single, "special_tokens": special_tokens}


# ---- tokenizer kinds ------------------------------------------------------------------------------------
class TokenizerKind:
    """One kind of tokenizer (`tokenizer.ggml.model`): how its vocabulary is read from a tokenizer.json for
    export, and written back as one on import. Subclasses register with `@register_kind`."""

    gguf_model: str = ""  # tokenizer.ggml.model
    name: str = ""  # "byte-level BPE"
    describe: str = ""  # what the kind covers, for refusals: "byte-level BPE tokenizers (GPT-2 style: ...)"

    @classmethod
    def matches(cls, tok: dict) -> bool:
        """Is this tokenizer.json of this kind?"""
        raise NotImplementedError

    @classmethod
    def read(cls, tok: dict, where: str, n_vocab: int | None) -> tuple[list[str], list[int], list[str], str]:
        """(tokens, token types, merges, tokenizer.ggml.pre) of a tokenizer.json of this kind."""
        raise NotImplementedError

    @classmethod
    def extras(cls, tok: dict, where: str, tokens: list[str], types: list[int]) -> dict:
        """Further Vocab fields of this kind (SentencePiece: scores, add_space_prefix), given read()'s result."""
        return {}

    @classmethod
    def check_gguf(cls, meta: dict, where: str) -> None:
        """Refuses, from the header, a GGUF vocabulary of this kind that import cannot rebuild."""

    @classmethod
    def pretokenizer(cls, pre_name: str, where: str):
        """Refuses a GGUF `tokenizer.ggml.pre` this kind cannot rebuild on import."""
        raise NotImplementedError

    @classmethod
    def tokenizer_json(cls, meta: dict, where: str, specials: dict) -> dict:
        """A tokenizer.json for the vocabulary of a GGUF of this kind (import)."""
        raise NotImplementedError


KINDS: dict[str, type[TokenizerKind]] = {}  # tokenizer.ggml.model -> kind


def register_kind(cls: type[TokenizerKind]) -> type[TokenizerKind]:
    KINDS[cls.gguf_model] = cls
    return cls


def kind_for_json(tok: dict, where: str) -> type[TokenizerKind]:
    """The kind of a tokenizer.json, or BadInput naming what is supported."""
    for kind in KINDS.values():
        if kind.matches(tok):
            return kind
    found = (tok.get("model") or {}).get("type") or "?"
    raise BadInput(
        f"tokenizer model {found!r}{'' if found != 'BPE' else ' without byte-level encoding'} cannot be exported yet",
        where=where,
        hint=f"{' and '.join(k.describe for k in KINDS.values())} are supported",
    )


def kind_for_gguf(model, where: str) -> type[TokenizerKind]:
    """The kind of a GGUF's `tokenizer.ggml.model`, or BadInput naming what can be imported."""
    kind = KINDS.get(model)
    if kind is None:
        raise BadInput(
            f"GGUF tokenizer model {model!r} cannot be imported yet",
            where=where,
            hint=", ".join(f"{k.name} ({k.gguf_model!r})" for k in KINDS.values()) + " tokenizers are supported",
        )
    return kind


def tokens_by_id(tok: dict, where: str, n_vocab: int | None) -> tuple[list[str], list[int]]:
    """Tokens and their types ordered by id: the model's vocabulary plus added tokens (which may lie outside it),
    padded to the embedding matrix's `n_vocab` rows with unused [PADi] tokens."""
    by_id: dict[int, str] = {}
    for text, idx in ((tok.get("model") or {}).get("vocab") or {}).items():
        by_id[int(idx)] = text
    types: dict[int, int] = {}
    for added in tok.get("added_tokens") or []:
        idx = int(added["id"])
        by_id[idx] = added["content"]
        types[idx] = CONTROL if added.get("special") else USER_DEFINED
    if not by_id:
        raise BadInput("tokenizer.json has an empty vocabulary", where=where, hint="re-save the tokenizer")
    size = max(by_id) + 1
    if n_vocab is not None:
        if size > n_vocab:
            raise BadInput(
                f"the tokenizer has {size} tokens but the embedding matrix only {n_vocab} rows",
                where=where,
                hint="the tokenizer does not belong to these weights",
            )
        size = n_vocab
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]  # rows with no token: vocab padded to 64/128
    return tokens, [types.get(i, NORMAL) if i in by_id else UNUSED for i in range(size)]


# ---- reading a model folder's tokenizer ----------------------------------------------------------------
def read_vocab(model_dir: str | Path, n_vocab: int | None = None) -> Vocab:
    """Everything the GGUF needs about the tokenizer. `n_vocab`: rows of the embedding matrix."""
    model_dir = Path(model_dir)
    tok = _load_json(model_dir / "tokenizer.json", required=True)
    tcfg = _load_json(model_dir / "tokenizer_config.json")
    where = str(model_dir / "tokenizer.json")
    kind = kind_for_json(tok, where)
    tokens, token_types, merges, pre = kind.read(tok, where, n_vocab)
    ids = _special_ids(model_dir, tok, tcfg, tokens)
    template = chat_template(model_dir)
    specials = {k: _token_text(tcfg.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    turn_end = end_of_turn(template, [tokens[i] for i in ids["eos_ids"]], specials)
    index = {t: i for i, t in enumerate(tokens)}
    eot = index[turn_end] if turn_end is not None and index.get(turn_end) in ids["eos_ids"] else ids["eos"]
    return Vocab(
        model=kind.gguf_model,
        pre=pre,
        tokens=tokens,
        token_types=token_types,
        merges=merges,
        bos_id=ids["bos"],
        eos_id=ids["eos"],
        unk_id=ids["unk"],
        pad_id=ids["pad"],
        add_bos=bool(_adds(tok, tcfg, "bos", first=True)),
        add_eos=bool(_adds(tok, tcfg, "eos", first=False)),
        chat_template=template,
        eos_ids=ids["eos_ids"],
        eot_id=eot,
        **kind.extras(tok, where, tokens, token_types),
    )


def _special_ids(model_dir: Path, tok: dict, tcfg: dict, tokens: list[str]) -> dict:
    """bos, eos, unk, pad ids and every end id, from tokenizer_config.json's texts, generation_config.json and
    config.json; refuses a vocabulary without an end token or with an id outside it."""
    gen = _load_json(model_dir / "generation_config.json")
    cfg = _load_json(model_dir / "config.json")
    index = {t: i for i, t in enumerate(tokens)}

    def id_of(text):
        return index.get(text) if text is not None else None

    bos = id_of(_token_text(tcfg.get("bos_token")))
    if bos is None:
        bos = _first_int(cfg.get("bos_token_id"), gen.get("bos_token_id"))
    eos, eos_ids = _end_ids(
        id_of(_token_text(tcfg.get("eos_token"))), _ids(gen.get("eos_token_id")) or _ids(cfg.get("eos_token_id"))
    )
    if eos is None:
        raise BadInput(
            "no end-of-sequence token (generation_config.json, config.json and tokenizer_config.json name none)",
            where=str(model_dir),
            hint="set eos_token in tokenizer_config.json",
        )
    unk = id_of(_token_text(tcfg.get("unk_token")) or (tok.get("model") or {}).get("unk_token"))
    pad = id_of(_token_text(tcfg.get("pad_token")))
    if pad is None:
        pad = _first_int(cfg.get("pad_token_id"), gen.get("pad_token_id"))
    size = len(tokens)
    for label, idx in (("bos", bos), ("eos", eos), ("pad", pad)):
        if idx is not None and not 0 <= idx < size:
            raise BadInput(
                f"{label} token id {idx} is outside the vocabulary (size {size})",
                where=str(model_dir),
                hint="fix the token ids in config.json / generation_config.json",
            )
    eos_ids = [i for i in dict.fromkeys(eos_ids) if 0 <= i < size]
    return {"bos": bos, "eos": eos, "unk": unk, "pad": pad, "eos_ids": eos_ids}


def _end_ids(tok_eos: int | None, eos_ids: list[int]) -> tuple[int | None, list[int]]:
    """(eos, every end id): eos is the tokenizer's own when the generation config lists it, else the config's
    first; both the tokenizer's and the config's end ids are kept."""
    if eos_ids:
        eos = tok_eos if tok_eos in eos_ids else eos_ids[0]
    else:
        eos = tok_eos
    if tok_eos is not None and tok_eos not in eos_ids:
        eos_ids.append(tok_eos)
    if eos is not None and eos not in eos_ids:
        eos_ids.insert(0, eos)
    return eos, eos_ids


def _adds(tok: dict, tcfg: dict, which: str, first: bool) -> bool:
    """add_bos_token / add_eos_token: tokenizer_config.json's, else whether the post-processor adds it."""
    value = tcfg.get(f"add_{which}_token")
    if value is None:
        value = _adds_special(tok, _token_text(tcfg.get(f"{which}_token")), first=first)
    return value


_PROBE_ANSWER = "medtune-probe-answer"
_PROBE = [{"role": "user", "content": "medtune-probe-question"}, {"role": "assistant", "content": _PROBE_ANSWER}]


def end_of_turn(template: str | None, candidates: list[str], specials: dict | None = None) -> str | None:
    """Which of `candidates` (end-token texts) the chat template closes an assistant turn with.

    The template renders a user/assistant exchange; the candidate found first after the answer is the
    end-of-turn token. When the template cannot be rendered, the candidate it names (the first one, if it
    names several); None when there is no template or it names none."""
    if not template or not candidates:
        return None
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        kwargs = {k: v for k, v in (specials or {}).items() if v is not None}
        text = _compile_jinja_template(template).render(
            messages=_PROBE, add_generation_prompt=False, tools=None, documents=None, **kwargs
        )
    except Exception:  # noqa: BLE001 - any jinja error: fall back to reading the template's text
        text = None
    if text is not None and _PROBE_ANSWER in text:
        after = text[text.rindex(_PROBE_ANSWER) + len(_PROBE_ANSWER) :]
        found = [(after.find(c), n, c) for n, c in enumerate(candidates) if c in after]
        if found:
            return min(found)[2]
    named = [c for c in candidates if c in template]
    return named[0] if named else None


def _ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value if isinstance(v, int)]


def _first_int(*values) -> int | None:
    for v in values:
        got = _ids(v)
        if got:
            return got[0]
    return None


from medtune.export import bpe, spm  # noqa: E402,F401  (register the byte-level BPE and SentencePiece kinds)
