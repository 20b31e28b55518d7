"""Dataset formats: one registry entry per schema. Each maps a raw record to Examples.

An Example is a conversation whose last message is the assistant answer to learn, plus the reasoning
(chain of thought) behind that answer, if the dataset has one. Field names are matched
case-insensitively; `--map question=Q,response=A` renames a format's fields for odd schemas.
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
    convert: Callable[[Fields], list[Example]]
    description: str
    multi_turn: bool = False
    options: dict = field(default_factory=dict)


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
def _alpaca(f: Fields) -> list[Example]:
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
    msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": f.text("output")}]
    return [Example(msgs, where=f.where)]


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


def _conversation(f: Fields, name: str, role_key: str, content_key: str, roles: dict) -> list[Example]:
    turns = f.items(name, dict)
    msgs = []
    for i, turn in enumerate(turns):
        lower = {str(k).lower(): k for k in turn}
        rk, ck = lower.get(role_key), lower.get(content_key)
        if rk is None or ck is None:
            raise BadInput(
                f"{name}[{i}] needs {role_key!r} and {content_key!r}",
                where=f.where,
                hint=f'each turn looks like {{"{role_key}": ..., "{content_key}": ...}}',
            )
        role = roles.get(str(turn[rk]).lower())
        if role is None:
            raise BadInput(
                f"{name}[{i}] has unknown role {turn[rk]!r}",
                where=f.where,
                hint=f"known roles: {', '.join(sorted(roles))}",
            )
        content = expect_text(turn[ck], f"{name}[{i}].{content_key}", f.where, "turn contents must be strings")
        msgs.append({"role": role, "content": content})
    body = [m for m in msgs if m["role"] != "system"]
    if not body or body[-1]["role"] != "assistant":
        raise BadInput(
            f"{name} must end with an assistant turn",
            where=f.where,
            hint="the last turn is the answer the model learns",
        )
    if any(m["role"] == "system" for m in msgs[1:]):
        raise BadInput("a system turn may only come first", where=f.where, hint="move the system turn to the start")
    for a, b in zip(body, body[1:]):
        if a["role"] == b["role"]:
            raise BadInput(
                f"two {a['role']} turns in a row in {name}", where=f.where, hint="turns must alternate user/assistant"
            )
    if body[0]["role"] != "user":
        raise BadInput(
            f"{name} must start with a user turn (after an optional system turn)",
            where=f.where,
            hint="drop the leading assistant turn",
        )
    return [Example(msgs, where=f.where)]


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


def _chat(f: Fields) -> list[Example]:
    (ex,) = _conversation(f, "messages", "role", "content", CHAT_ROLES)
    last = f.items("messages", dict)[-1]
    lower = {str(k).lower(): k for k in last}
    for key in ("reasoning_content", "reasoning", "thinking"):
        if key in lower and isinstance(last[lower[key]], str):
            ex.reasoning = last[lower[key]]
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


def detect(record: dict, where: str, mapping: dict[str, str] | None = None) -> Format:
    mapping = mapping or {}
    f = Fields(record, where, mapping)
    # More specific formats first: cmedqa2 and medical-o1 also have a 'question'.
    for fmt in sorted(REGISTRY.values(), key=lambda x: -len(x.fields)):
        if all(f.has(name) for name in fmt.fields):
            return fmt
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
