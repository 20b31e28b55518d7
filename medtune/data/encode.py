"""Records -> token ids and the prompt offset (where the loss starts): one definition for prepare's
checks and for every training backend, so what prepare checked is exactly what training sees.

Styles (what a prepared record holds):
  completions  {"prompt", "completion"}   rendered as [user, assistant] through the chat template
  chat         {"messages": [...]}        rendered through the chat template; loss on the last turn
  text         {"text", "prompt_chars"?}  already rendered; loss after the first prompt_chars characters
The chat template, not the record, closes the assistant turn with its end-of-turn token.

Preference records (DPO/ORPO; prepare's manifest says "kind": "preference") are one shape, already rendered:
  {"prompt", "chosen", "rejected"}  prompt: the conversation through the chat template up to and with its
                                    generation prompt; chosen / rejected: what follows it in each side's rendered
                                    conversation, ending in the end-of-turn token (once, at the end)
encode_pair gives the trainer (prompt ids, chosen ids, rejected ids): each side is tokenized whole (prompt +
completion) and split after the prompt's tokens, which prepare checked are a prefix of both; encode_pair_items gives
the same as two SFT-style items per pair, ((ids, offset), (ids, offset)).
"""

from __future__ import annotations

from medtune.export.chat_templates import TEMPLATE_VARS

STYLES = ("completions", "chat", "text")
PAIR_KEYS = ("prompt", "chosen", "rejected")


def record_messages(record: dict) -> list[dict] | None:
    if "messages" in record:
        return record["messages"]
    if "prompt" in record and "completion" in record:
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    return None


def style_of(record: dict) -> str:
    if "prompt" in record and "completion" in record:
        return "completions"
    if "messages" in record:
        return "chat"
    if "text" in record:
        return "text"
    raise ValueError("record has none of prompt/completion, messages, text")


class Renderer:
    """The tokenizer's chat template, compiled once and called directly.

    transformers' apply_chat_template costs ~0.3 ms a call in Python overhead; rendering the compiled
    jinja template directly costs a few microseconds. The two are compared on probe conversations at
    construction, and we fall back to apply_chat_template if they ever differ. Both are given medtune's fixed
    template variables (chat_templates.TEMPLATE_VARS: Llama 3.x's "Today Date"), so a record renders the same
    on every day, in prepare and in training, and as the exported GGUF and Modelfile render it.
    """

    def __init__(self, tok):
        self.tok = tok
        self.fast = None
        template = getattr(tok, "chat_template", None)
        if isinstance(template, str):
            try:
                from transformers.utils.chat_template_utils import _compile_jinja_template

                self.fast = _compile_jinja_template(template)
                self.extra = {k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str)}
                probes = [
                    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
                    [{"role": "system", "content": "S"}, {"role": "user", "content": "Q\n2"}],
                ]
                for p in probes:
                    for gen in (False, True):
                        if self._fast(p, gen) != self._slow(p, gen):
                            self.fast = None
                            break
            except Exception:  # noqa: BLE001 - any problem: use the reference path
                self.fast = None

    def _slow(self, messages, add_generation_prompt):
        return self.tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **TEMPLATE_VARS
        )

    def _fast(self, messages, add_generation_prompt):
        return self.fast.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            tools=None,
            documents=None,
            **self.extra,
            **TEMPLATE_VARS,
        )

    def __call__(self, messages, add_generation_prompt: bool = False) -> str:
        if self.fast is not None:
            return self._fast(messages, add_generation_prompt)
        return self._slow(messages, add_generation_prompt)


def texts(record: dict, render: Renderer) -> tuple[str, str]:
    """(full text, prompt text) of a record: the prompt text is where the loss starts."""
    msgs = record_messages(record)
    if msgs is not None:
        return render(msgs), render(msgs[:-1], add_generation_prompt=True)
    text = record["text"]
    return text, text[: int(record.get("prompt_chars", 0) or 0)]


def hf_tokenizer(tok):
    """The transformers tokenizer inside mlx_lm's TokenizerWrapper (or `tok` itself)."""
    inner = getattr(tok, "_tokenizer", None)
    return inner if inner is not None and hasattr(inner, "apply_chat_template") else tok


def _backend(tok):
    """The Rust `tokenizers.Tokenizer` behind a fast tokenizer, if there is one."""
    for _ in range(3):
        if tok is None or hasattr(tok, "encode_batch"):
            return tok
        tok = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    return None


def encode_texts(tok, items: list[str]) -> list[list[int]]:
    """Batch tokenization with the fast tokenizer (all cores); no special tokens added: the rendered
    text already holds them, exactly as apply_chat_template(tokenize=True) does."""
    backend = _backend(tok)
    if backend is not None:
        return [e.ids for e in backend.encode_batch(items, add_special_tokens=False)]
    return [hf_tokenizer(tok).encode(t, add_special_tokens=False) for t in items]


def with_eos(tok, record: dict, ids: list[int]) -> list[int]:
    """Plain-text records (no template, no prompt) end with eos, as mlx_lm's text dataset does; records
    rendered through a chat template already end on its end-of-turn token."""
    eos = tok.eos_token_id
    if (
        style_of(record) == "text"
        and not record.get("prompt_chars")
        and eos is not None
        and (not ids or ids[-1] != eos)
    ):
        return ids + [eos]
    return ids


def encode(tok, record: dict, mask_prompt: bool = True) -> tuple[list[int], int]:
    """(token ids, offset) of one record: the loss covers ids[offset:] (offset 0 without prompt masking)."""
    return encode_all(tok, [record], mask_prompt)[0]


def render_and_encode(tok, render: Renderer, records: list[dict], mask_prompt: bool = True):
    """The records' (full text, prompt text) pairs, the full texts' token ids and the prompts' token ids (empty lists
    without prompt masking), in one batch each: what prepare checks and training encodes, computed one way."""
    pairs = [texts(r, render) for r in records]
    full = encode_texts(tok, [p[0] for p in pairs])
    heads = encode_texts(tok, [p[1] for p in pairs]) if mask_prompt else [[] for _ in pairs]
    return pairs, full, heads


def encode_all(tok, records: list[dict], mask_prompt: bool = True) -> list[tuple[list[int], int]]:
    tok = hf_tokenizer(tok)
    _, full, heads = render_and_encode(tok, Renderer(tok), records, mask_prompt)
    out = []
    for rec, ids, head in zip(records, full, heads):
        ids = with_eos(tok, rec, ids)
        if head and ids[: len(head)] != head:
            raise ValueError("the prompt's tokens are not a prefix of the record's tokens")
        out.append((ids, len(head)))
    return out


def is_pair(record: dict) -> bool:
    """A preference record: rendered prompt, chosen and rejected texts."""
    return all(isinstance(record.get(k), str) for k in PAIR_KEYS)


def pair_ids(tok, records: list[dict]) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """The preference records' token ids, one batch each: the prompts', prompt + chosen's and prompt + rejected's
    (what prepare checks and what encode_pairs splits)."""
    tok = hf_tokenizer(tok)
    heads = encode_texts(tok, [r["prompt"] for r in records])
    chosen = encode_texts(tok, [r["prompt"] + r["chosen"] for r in records])
    rejected = encode_texts(tok, [r["prompt"] + r["rejected"] for r in records])
    return heads, chosen, rejected


def encode_pairs(tok, records: list[dict]) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt ids, chosen ids, rejected ids) of each preference record; prompt ids + chosen ids are exactly the
    tokens of prompt + chosen (the same for rejected). ValueError when the prompt's tokens are not a prefix of a
    side's (prepare refuses such records)."""
    out = []
    for head, chosen, rejected in zip(*pair_ids(tok, records)):
        for side in (chosen, rejected):
            if side[: len(head)] != head:
                raise ValueError("the prompt's tokens are not a prefix of a side's tokens")
        out.append((head, chosen[len(head) :], rejected[len(head) :]))
    return out


def encode_pair(tok, record: dict) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, chosen ids, rejected ids) of one preference record (encode_pairs)."""
    return encode_pairs(tok, [record])[0]


def encode_pair_items(tok, records: list[dict]) -> list[tuple[tuple[list[int], int], tuple[list[int], int]]]:
    """Each preference record as two SFT-style items, ((prompt + chosen ids, offset), (prompt + rejected ids,
    offset)): the loss covers ids[offset:], the completion (encode_pairs, put back together)."""
    return [
        ((head + chosen, len(head)), (head + rejected, len(head)))
        for head, chosen, rejected in encode_pairs(tok, records)
    ]
