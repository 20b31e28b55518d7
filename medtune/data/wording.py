"""One system prompt and one prompt wording for every record: `medtune prepare --system TEXT|@FILE` and
`--prompt-template "问题：{question}\\n回答："`.

- The system prompt becomes every example's system turn (a record's own system turn is replaced, and counted).
- The template rewrites every user turn: `{name}` is the record's field `name` (case-insensitive, after --map),
  `{prompt}` the user turn as the format built it (for chat formats, each turn's own text); `{{` and `}}` are
  literal braces. A record without a named field is refused (file:line, field); the template is checked once, before
  any record is read (unbalanced braces, an empty name, a format spec or an attribute are refused).

Both are recorded in the manifest (`wording`: the system prompt's text, the template), and from there travel with the
adapter and the fused model to export, chat and eval (training_wording); export puts a one-field wording into the
served templates (user_wrap, medtune.export.served_wording).
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

from medtune.core.errors import BadInput

PROMPT = "prompt"  # the placeholder for the user turn itself


@dataclass(frozen=True)
class Wording:
    system: str | None = None
    template: str | None = None
    names: tuple[str, ...] = ()  # the template's field names

    @property
    def empty(self) -> bool:
        return self.system is None and self.template is None

    def apply(self, messages: list[dict], fields) -> tuple[list[dict], bool]:
        """(the messages with the system prompt and the wording, whether a system turn of the record's was replaced).
        fields: medtune.data.formats.Fields of the record (a missing field is its BadInput)."""
        replaced = False
        out = [dict(m) for m in messages]
        if self.template is not None:
            values = {n: fields.text(n) for n in self.names if n != PROMPT}
            for m in out:
                if m["role"] == "user":
                    m["content"] = fill(self.template, {**values, PROMPT: m["content"]})
        if self.system is not None:
            replaced = bool(out and out[0]["role"] == "system" and out[0]["content"] != self.system)
            out = [{"role": "system", "content": self.system}] + [m for m in out if m["role"] != "system"]
        return out, replaced


def read_system(value: str | None) -> str | None:
    """--system TEXT, or @FILE (UTF-8; surrounding blank lines dropped); an empty one is refused."""
    if value is None:
        return None
    text = unescape(value)
    if value.startswith("@"):
        path = Path(value[1:]).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise BadInput(
                f"--system {value}: no such file", hint="--system @prompts/doctor.txt, or the text"
            ) from None
        except UnicodeDecodeError:
            raise BadInput(f"--system {value}: not UTF-8 text", where=str(path), hint="save it as UTF-8") from None
        text = text.strip("\n")
    if not text.strip():
        where = value[1:] if value.startswith("@") else None
        raise BadInput("--system is empty", where=where, hint="write the system prompt, or drop --system")
    return text


def parse_template(template: str | None) -> tuple[str, ...]:
    """The field names a --prompt-template uses, checked; () when there is none."""
    if template is None:
        return ()
    if not template.strip():
        raise BadInput("--prompt-template is empty", hint='e.g. --prompt-template "问题：{question}\\n回答："')
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise BadInput(
            f"--prompt-template {template!r}: {exc}", hint="fields as {name}; a literal brace as {{ or }}"
        ) from None
    names = []
    for _, name, spec, conv in parts:
        if name is None:
            continue
        if not name.isidentifier() or spec or conv:
            raise BadInput(
                f"--prompt-template: {{{name}{'!' + conv if conv else ''}{':' + spec if spec else ''}}} is not a field "
                "name",
                hint="fields as {question}, {input}, {prompt} (the user turn); a literal brace as {{ or }}",
            )
        names.append(name.lower())
    if not names:
        raise BadInput(
            f"--prompt-template {template!r} names no field", hint="e.g. {question} or {prompt} (the user turn)"
        )
    return tuple(dict.fromkeys(names))


def unescape(text: str | None) -> str | None:
    """\\n, \\t and \\\\ typed on a command line as a newline, a tab and a backslash (as the issue's examples are
    written); any other backslash is kept."""
    if text is None or "\\" not in text:
        return text
    out, i = [], 0
    while i < len(text):
        pair = text[i : i + 2]
        if pair in ("\\n", "\\t", "\\\\"):
            out.append({"\\n": "\n", "\\t": "\t", "\\\\": "\\"}[pair])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def wording(system: str | None, template: str | None) -> Wording:
    template = unescape(template)
    return Wording(read_system(system), template, parse_template(template))


def training_wording(folder: str | Path | None) -> dict:
    """{system, prompt_template} that training saw, from a prepared folder's, an adapter's or a fused model's manifest
    (each carries them forward); {} when none says."""
    if folder is None or not Path(folder).is_dir():
        return {}
    folder = Path(folder)
    for name in ("manifest.json", "medtune_manifest.json"):
        try:
            m = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        found = {k: v for k, v in (m.get("wording") or {}).items() if k in ("system", "prompt_template") and v}
        if found:
            return found
    return {}


def served(model, adapter=None) -> dict:
    """The wording a model is to be asked in: its adapter's (when given), else the fused folder's; {} for a base."""
    return training_wording(adapter) or training_wording(model if isinstance(model, (str, Path)) else None)


def fill(template: str, values: dict) -> str:
    """The template with each {field} replaced by values[field.lower()] ({{ and }} as single braces): field names
    match the record's case-insensitively, as everywhere in prepare ({Question} and {question} alike)."""
    out = []
    for literal, name, _, _ in string.Formatter().parse(template):
        out.append(literal)
        if name is not None:
            out.append(values[name.lower()])
    return "".join(out)


def word_prompt(text: str, template: str | None) -> str:
    """A free question (chat, probes, fidelity prompts) in the training wording: every field of a template with one
    field, or {prompt}, is the question; a template naming several fields leaves the question as it is."""
    if not template:
        return text
    names = parse_template(template)
    if len(names) != 1:
        return text
    return fill(template, {names[0]: text})


def word_turns(messages: list[dict], template: str | None) -> list[dict]:
    """A conversation with every user turn in the training wording (word_prompt)."""
    return [{**m, "content": word_prompt(m["content"], template)} if m["role"] == "user" else m for m in messages]


def user_wrap(template: str | None) -> tuple[str, str] | None:
    """(the text before, the text after) the question, for a template whose one field appears once: what a served
    model's chat template can put around every user turn itself (medtune export), so that a client sends the plain
    question. None for no template, or one that needs several fields (the client must then send the worded turn)."""
    if not template or len(parse_template(template)) != 1:
        return None
    parts = word_prompt("\x00", template).split("\x00")  # a field used twice gives three parts
    return (parts[0], parts[1]) if len(parts) == 2 else None


def set_default_system(folder: str | Path, system: str) -> str | None:
    """Make `system` the default system prompt of the chat template in `folder` (tokenizer_config.json or
    chat_template.jinja), where the template has one (Qwen's, SmolLM2's: the text it inserts when a conversation has
    no system turn): llama-server and anything rendering the GGUF's template then answer under the prompt training
    saw. Checked by rendering again (medtune.export.modelfile.detect_family); else nothing changes. Returns why it
    was not done, or None."""
    from medtune.export.modelfile import detect_family
    from medtune.export.tokenizer import chat_template

    folder = Path(folder)
    template = chat_template(folder)
    try:
        old = detect_family(folder, template).default_system if template else None
    except BadInput:
        old = None
    if not old:
        return "the chat template has no default system prompt: the Modelfile's SYSTEM carries training's"
    if old == system:
        return None
    at = template.find(old)
    quote = next((c for c in reversed(template[:at]) if c in "'\""), None)
    if at < 0 or template.count(old) != 1 or quote is None:
        return "the chat template's default system prompt is not one plain string: left as it is"
    new = template[:at] + system.replace("\\", "\\\\").replace(quote, "\\" + quote) + template[at + len(old) :]
    files = _write_template(folder, new)
    try:
        if detect_family(folder, new).default_system == system:
            return None
    except BadInput:
        pass
    for path, text in files.items():  # it did not render as meant: back as it was
        path.write_text(text, encoding="utf-8")
    return "the chat template did not take the system prompt as its default: left as it is"


def _write_template(folder: Path, template: str) -> dict:
    """Write the chat template where the folder keeps it; returns {path: its previous text}."""
    cfg_path, jinja = folder / "tokenizer_config.json", folder / "chat_template.jinja"
    before = {}
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    if isinstance(cfg.get("chat_template"), str):
        before[cfg_path] = cfg_path.read_text(encoding="utf-8")
        cfg["chat_template"] = template
        cfg_path.write_text(json.dumps(cfg, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    elif jinja.is_file():
        before[jinja] = jinja.read_text(encoding="utf-8")
        jinja.write_text(template, encoding="utf-8")
    return before
