"""Dataset formats: one registry entry per schema. Each maps a raw record to Examples.

An Example is a conversation whose last message is the assistant answer to learn, plus the reasoning
(chain of thought) behind that answer, if the dataset has one. A Pair (preference data, for DPO/ORPO) is two
Examples: the same conversation ending once in the chosen and once in the rejected answer. Field names are matched
case-insensitively; `--map question=Q,response=A` renames a format's fields for odd schemas.

A record that has a `chosen` or a `rejected` field is preference data: only the preference formats (kind
"preference") are tried on it, and only the SFT formats on any other record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from medtune.core.errors import BadInput


@dataclass
class Example:
    messages: list[dict]  # [{"role": "system"|"user"|"assistant", "content": str}, ...], last = assistant
    reasoning: str = ""  # chain of thought for the last assistant message
    where: str = ""
    text: str | None = None  # plain-text records (format "text") carry no messages

    @property
    def prompt(self) -> str:
        """The last user message (what the split keys on)."""
        users = [m["content"] for m in self.messages if m["role"] == "user"]
        return users[-1] if users else (self.text or "")

    @property
    def response(self) -> str:
        return self.messages[-1]["content"] if self.messages else ""


PAIR_FIELDS = ("chosen", "rejected")  # a record with either is preference data


@dataclass
class Pair:
    """A preference pair: one conversation ending in the chosen answer and in the rejected one. Each side is a
    whole Example (its own copy of the conversation before the answer: chat-style sources give each side its own,
    and prepare drops a pair whose two prompts differ)."""

    chosen: Example
    rejected: Example
    where: str = ""
    text = None  # never plain text

    @property
    def sides(self) -> tuple[Example, Example]:
        return self.chosen, self.rejected

    @property
    def messages(self) -> list[dict]:
        """The chosen side's conversation (what the split keys on: its opening question)."""
        return self.chosen.messages


def _pair(prompt: list[dict], chosen: str, rejected: str, where: str) -> Pair:
    """A Pair of the conversation `prompt` (which ends on a user turn) and the two answers; each side gets its own
    copy of the messages (prepare cleans them in place)."""
    sides = [
        Example([dict(m) for m in prompt] + [{"role": "assistant", "content": answer}], where=where)
        for answer in (chosen, rejected)
    ]
    return Pair(*sides, where=where)


def expect_text(value, label: str, where: str, hint: str) -> str:
    """`value` if it is text; else BadInput naming the field (`label`) and the type it holds."""
    if not isinstance(value, str):
        raise BadInput(f"{label} is a {type(value).__name__}, expected text", where=where, hint=hint)
    return value


class Fields:
    """Case-insensitive field access with the user's --map renames, reporting file:line and field."""

    _lower_cache: dict[tuple, dict] = {}  # a dataset's records share their keys: fold case once per key set

    def __init__(self, rec: dict, where: str, mapping: dict[str, str], options: dict | None = None):
        self.rec, self.where, self.mapping = rec, where, mapping
        self.options = options or {}
        keys = tuple(rec)
        lower = self._lower_cache.get(keys)
        if lower is None:
            if len(self._lower_cache) > 256:
                self._lower_cache.clear()
            lower = self._lower_cache[keys] = {str(k).lower(): k for k in rec}
        self.lower = lower

    def key(self, name: str) -> str | None:
        wanted = self.mapping.get(name, name).lower() if self.mapping else name
        return self.lower.get(wanted)

    def has(self, name: str) -> bool:
        return self.key(name) is not None

    def raw(self, name: str, required: bool = True):
        key = self.key(name)
        if key is None:
            if required:
                shown = self.mapping.get(name.lower(), name)
                raise BadInput(
                    f"missing field {shown!r}",
                    where=self.where,
                    hint=f"fields present: {', '.join(map(str, self.rec)) or 'none'}; --map NAME=FIELD renames a field",
                )
            return None
        return self.rec[key]

    def text(self, name: str, required: bool = True) -> str:
        key = self.lower.get(self.mapping.get(name, name).lower() if self.mapping else name)
        value = self.rec[key] if key is not None else self.raw(name, required)
        if value.__class__ is str:
            return value
        if value is None:
            return ""
        return expect_text(value, f"field {self.key(name)!r}", self.where, "this field must be a string")

    def items(self, name: str, kind: type, required: bool = True) -> list:
        value = self.raw(name, required)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, kind) for v in value):
            raise BadInput(
                f"field {self.key(name)!r} must be a list of {kind.__name__}s",
                where=self.where,
                hint="see the format's documentation in `medtune prepare --help`",
            )
        return value


@dataclass(frozen=True)
class Format:
    name: str
    fields: tuple[str, ...]  # required fields (lower case) that identify the format
    convert: Callable[[Fields], list]  # -> Examples (kind "sft") or Pairs (kind "preference")
    description: str
    multi_turn: bool = False
    options: dict = field(default_factory=dict)
    kind: str = "sft"  # "sft": Examples; "preference": Pairs (its fields include PAIR_FIELDS)
    types: dict = field(default_factory=dict)  # field -> the type it holds in this format (tells look-alikes apart)

    def fits(self, f: Fields) -> bool:
        """Every field of `types` that the record has holds that type."""
        return all(isinstance(f.raw(name, required=False), kind) for name, kind in self.types.items() if f.has(name))


REGISTRY: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    REGISTRY[fmt.name] = fmt
    return fmt


def _turns(user: str, answer: str, system: str = "") -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


# ---- medical-o1: Question / Complex_CoT / Response ------------------------------------------------
def _medical_o1(f: Fields) -> list[Example]:
    return [Example(_turns(f.text("question"), f.text("response")), reasoning=f.text("complex_cot"), where=f.where)]


register(
    Format(
        "medical-o1",
        ("question", "complex_cot", "response"),
        _medical_o1,
        "Question / Complex_CoT / Response (medical-o1-reasoning-SFT, en and zh)",
    )
)


# ---- alpaca: instruction / input / output (+ system, history) --------------------------------------
def _alpaca_prompt(f: Fields) -> list[dict]:
    """system, history and instruction + input as messages, ending on the user turn (SFT and preference alike)."""
    instruction, extra = f.text("instruction"), f.text("input", required=False)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    msgs = [{"role": "system", "content": f.text("system", required=False)}] if f.text("system", required=False) else []
    for turn in f.items("history", list, required=False):
        if len(turn) != 2 or not all(isinstance(t, str) for t in turn):
            raise BadInput(
                "history entries must be [instruction, output] pairs of strings",
                where=f.where,
                hint='alpaca history: [["previous question", "previous answer"], ...]',
            )
        msgs += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    return msgs + [{"role": "user", "content": user}]


def _alpaca(f: Fields) -> list[Example]:
    return [Example(_alpaca_prompt(f) + [{"role": "assistant", "content": f.text("output")}], where=f.where)]


register(
    Format(
        "alpaca",
        ("instruction", "output"),
        _alpaca,
        "instruction / input / output, optional system and history",
        multi_turn=True,
    )
)

# ---- sharegpt: conversations [{from, value}] ------------------------------------------------------
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "bot": "assistant",
    "model": "assistant",
}


def _turn(turn: dict, label: str, where: str, role_key: str, content_key: str, roles: dict) -> dict:
    """One {role_key, content_key} turn as a message; `label` names it in errors (e.g. conversations[2])."""
    lower = {str(k).lower(): k for k in turn}
    rk, ck = lower.get(role_key), lower.get(content_key)
    if rk is None or ck is None:
        raise BadInput(
            f"{label} needs {role_key!r} and {content_key!r}",
            where=where,
            hint=f'each turn looks like {{"{role_key}": ..., "{content_key}": ...}}',
        )
    role = roles.get(str(turn[rk]).lower())
    if role is None:
        raise BadInput(
            f"{label} has unknown role {turn[rk]!r}", where=where, hint=f"known roles: {', '.join(sorted(roles))}"
        )
    content = expect_text(turn[ck], f"{label}.{content_key}", where, "turn contents must be strings")
    return {"role": role, "content": content}


def _turns_of(turns: list[dict], name: str, where: str, role_key: str, content_key: str, roles: dict) -> list[dict]:
    return [_turn(turn, f"{name}[{i}]", where, role_key, content_key, roles) for i, turn in enumerate(turns)]


def _check_turns(msgs: list[dict], name: str, where: str) -> list[dict]:
    """`msgs` if they make a conversation to learn from: an optional system turn, then user and assistant turns
    alternating, from a user turn to an assistant turn."""
    body = [m for m in msgs if m["role"] != "system"]
    if not body or body[-1]["role"] != "assistant":
        raise BadInput(
            f"{name} must end with an assistant turn",
            where=where,
            hint="the last turn is the answer the model learns",
        )
    if any(m["role"] == "system" for m in msgs[1:]):
        raise BadInput("a system turn may only come first", where=where, hint="move the system turn to the start")
    for a, b in zip(body, body[1:]):
        if a["role"] == b["role"]:
            raise BadInput(
                f"two {a['role']} turns in a row in {name}", where=where, hint="turns must alternate user/assistant"
            )
    if body[0]["role"] != "user":
        raise BadInput(
            f"{name} must start with a user turn (after an optional system turn)",
            where=where,
            hint="drop the leading assistant turn",
        )
    return msgs


def _conversation(f: Fields, name: str, role_key: str, content_key: str, roles: dict) -> list[Example]:
    msgs = _turns_of(f.items(name, dict), name, f.where, role_key, content_key, roles)
    return [Example(_check_turns(msgs, name, f.where), where=f.where)]


register(
    Format(
        "sharegpt",
        ("conversations",),
        lambda f: _conversation(f, "conversations", "from", "value", SHAREGPT_ROLES),
        "conversations: [{from: human|gpt|system, value}], multi-turn",
        multi_turn=True,
    )
)

# ---- chat: messages [{role, content}] -------------------------------------------------------------
CHAT_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}


def _reasoning_of(turn: dict) -> str:
    """The reasoning an assistant turn carries beside its content (reasoning_content, reasoning or thinking)."""
    lower = {str(k).lower(): k for k in turn}
    found = ""
    for key in ("reasoning_content", "reasoning", "thinking"):
        if key in lower and isinstance(turn[lower[key]], str):
            found = turn[lower[key]]
    return found


def _chat(f: Fields) -> list[Example]:
    (ex,) = _conversation(f, "messages", "role", "content", CHAT_ROLES)
    ex.reasoning = _reasoning_of(f.items("messages", dict)[-1])
    return [ex]


register(Format("chat", ("messages",), _chat, "messages: [{role, content}] (OpenAI chat)", multi_turn=True))

# ---- completions: prompt / completion -------------------------------------------------------------
register(
    Format(
        "completions",
        ("prompt", "completion"),
        lambda f: [Example(_turns(f.text("prompt"), f.text("completion")), where=f.where)],
        "prompt / completion",
    )
)

# ---- text: plain text -----------------------------------------------------------------------------
register(Format("text", ("text",), lambda f: [Example([], where=f.where, text=f.text("text"))], "text"))


# ---- cMedQA2: question.csv + answer.csv joined on question_id (see sources.read_cmedqa2) ----------
def _cmedqa2(f: Fields) -> list[Example]:
    question = f.text("question")
    answers = f.items("answers", str)
    first_only = f.options.get("answers") == "first"
    return [Example(_turns(question, a), where=f.where) for a in (answers[:1] if first_only else answers)]


register(
    Format(
        "cmedqa2",
        ("question_id", "question", "answers"),
        _cmedqa2,
        "cMedQA2: question.csv (question_id, content) + answer.csv (ans_id, question_id, content)",
    )
)


# ---- preference pairs (DPO/ORPO): kind "preference", each record one Pair -----------------------------
PAIR_HINT = (
    "a preference record is prompt/chosen/rejected strings, instruction/input/chosen/rejected strings, "
    "conversations + chosen/rejected {from, value} turns, or chosen/rejected lists of {role, content} messages"
)


def _preference(f: Fields) -> list[Pair]:
    system = f.text("system", required=False)
    prompt = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": f.text("prompt")}
    ]
    return [_pair(prompt, f.text("chosen"), f.text("rejected"), f.where)]


register(
    Format(
        "preference",
        ("prompt", *PAIR_FIELDS),
        _preference,
        "prompt / chosen / rejected strings, optional system (TRL's standard preference records)",
        kind="preference",
        types={"chosen": str},
    )
)


# LLaMA-Factory's alpaca preference records (data/README.md "Preference Dataset"): instruction, input, chosen,
# rejected, and (as its alpaca converter reads for every alpaca record) system and history.
register(
    Format(
        "alpaca-preference",
        ("instruction", *PAIR_FIELDS),
        lambda f: [_pair(_alpaca_prompt(f), f.text("chosen"), f.text("rejected"), f.where)],
        "instruction / input / chosen / rejected, optional system and history (LLaMA-Factory)",
        multi_turn=True,
        kind="preference",
        types={"chosen": str},
    )
)


def _side_turn(f: Fields, name: str, role_key: str, content_key: str, roles: dict) -> dict:
    """The chosen or rejected answer given as one turn object: it must be the assistant's."""
    turn = f.raw(name)
    if not isinstance(turn, dict):
        raise BadInput(
            f"field {f.key(name)!r} is a {type(turn).__name__}, expected a {{{role_key}, {content_key}}} object",
            where=f.where,
            hint=PAIR_HINT,
        )
    msg = _turn(turn, f.key(name), f.where, role_key, content_key, roles)
    if msg["role"] != "assistant":
        raise BadInput(
            f"{f.key(name)} must be an assistant turn, not {msg['role']}",
            where=f.where,
            hint="the answer is the model's",
        )
    return msg


def _sharegpt_preference(f: Fields) -> list[Pair]:
    """LLaMA-Factory's sharegpt preference records (data/README.md): `conversations` up to the last user turn (a
    system turn may come first, or a `system` field), `chosen` and `rejected` one {from, value} turn each."""
    msgs = _turns_of(f.items("conversations", dict), "conversations", f.where, "from", "value", SHAREGPT_ROLES)
    system = f.text("system", required=False)
    if system and not (msgs and msgs[0]["role"] == "system"):
        msgs = [{"role": "system", "content": system}] + msgs
    if msgs and msgs[-1]["role"] == "assistant":
        raise BadInput(
            "conversations must end with a user turn",
            where=f.where,
            hint="the answers to it are the chosen and rejected turns",
        )
    sides = [_side_turn(f, name, "from", "value", SHAREGPT_ROLES) for name in PAIR_FIELDS]
    for side in sides:
        _check_turns(msgs + [side], "conversations", f.where)
    return [_pair(msgs, sides[0]["content"], sides[1]["content"], f.where)]


register(
    Format(
        "sharegpt-preference",
        ("conversations", *PAIR_FIELDS),
        _sharegpt_preference,
        "conversations [{from, value}] ending on a user turn + chosen / rejected {from: gpt, value} (LLaMA-Factory)",
        multi_turn=True,
        kind="preference",
        types={"chosen": dict},
    )
)


def _chat_side(f: Fields, name: str) -> Example:
    """One side of a chat-style pair as a whole conversation. A side that holds the conversation (UltraFeedback
    binarized, TRL's implicit prompt) is taken as it is; a side that holds only the answer (TRL's conversational
    preference) follows the `prompt` field: a string (one user turn) or a list of {role, content} messages."""
    value = f.raw(name)
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise BadInput(
            f"field {f.key(name)!r} is a {type(value).__name__}, expected a list of {{role, content}} messages",
            where=f.where,
            hint=PAIR_HINT,
        )
    msgs = _turns_of(value, f.key(name), f.where, "role", "content", CHAT_ROLES)
    if msgs and msgs[0]["role"] == "assistant":
        prompt = f.raw("prompt")
        if isinstance(prompt, str):
            msgs = [{"role": "user", "content": prompt}] + msgs
        elif isinstance(prompt, list) and all(isinstance(v, dict) for v in prompt):
            msgs = _turns_of(prompt, f.key("prompt"), f.where, "role", "content", CHAT_ROLES) + msgs
        else:
            raise BadInput(
                f"field {f.key('prompt')!r} is a {type(prompt).__name__}, expected text or a list of messages",
                where=f.where,
                hint="the prompt of a pair whose sides hold only the answer",
            )
    _check_turns(msgs, str(f.key(name)), f.where)
    return Example(msgs, reasoning=_reasoning_of(value[-1]) if value else "", where=f.where)


register(
    Format(
        "preference-chat",
        PAIR_FIELDS,
        lambda f: [Pair(*(_chat_side(f, name) for name in PAIR_FIELDS), where=f.where)],
        "chosen / rejected lists of {role, content} messages ending on the answer, optional prompt "
        "(UltraFeedback binarized, TRL's conversational preference records)",
        multi_turn=True,
        kind="preference",
        types={"chosen": list},
    )
)


def detect(record: dict, where: str, mapping: dict[str, str] | None = None) -> Format:
    mapping = mapping or {}
    f = Fields(record, where, mapping)
    # A record with chosen or rejected is preference data, any other is not: each is tried on its own kind's formats
    # (a missing chosen/rejected field is then the format's error, which names it).
    kind = "preference" if any(f.has(name) for name in PAIR_FIELDS) else "sft"
    found = [
        fmt
        for fmt in REGISTRY.values()
        if fmt.kind == kind and all(f.has(name) for name in fmt.fields if name not in PAIR_FIELDS)
    ]
    if found:
        # The formats whose field types fit first, then the more specific (cmedqa2 and medical-o1 also have a
        # 'question'); among equals, the first registered.
        return min(found, key=lambda fmt: (not fmt.fits(f), -len(fmt.fields)))
    raise BadInput(
        f"cannot tell the dataset format from fields {sorted(map(str, record))}",
        where=where,
        hint="known formats: "
        + "; ".join(f"{x.name} ({x.description})" for x in REGISTRY.values())
        + ". Use --format NAME and --map NAME=FIELD for other schemas",
    )


def get(name: str) -> Format:
    if name not in REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, list(REGISTRY), n=1)
        raise BadInput(
            f"--format: unknown format {name!r}",
            hint=(f"did you mean {close[0]!r}? " if close else "") + f"known formats: {', '.join(REGISTRY)}",
        )
    return REGISTRY[name]


def parse_map(spec: str | dict | None) -> dict[str, str]:
    """'question=Q,response=A' (or, from the library, {'Question': 'Q', ...}) -> {'question': 'Q', 'response': 'A'}."""
    if spec is not None and not isinstance(spec, str):
        return {k.lower(): v for k, v in spec.items()}
    out: dict[str, str] = {}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise BadInput(f"--map entry {part!r} is not NAME=FIELD", hint="e.g. --map question=Q,response=A")
        name, fld = (x.strip() for x in part.split("=", 1))
        if not name or not fld:
            raise BadInput(f"--map entry {part!r} is not NAME=FIELD", hint="e.g. --map question=Q,response=A")
        out[name.lower()] = fld
    return out
