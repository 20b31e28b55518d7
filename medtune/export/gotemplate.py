"""A small interpreter for the Go text/template subset our Ollama TEMPLATEs use, and Ollama's request
pipeline around it, so that tests can check the prompt Ollama will build without an Ollama binary.

Supported: text; actions with `{{-` / `-}}` whitespace trimming; `if` / `else if` / `else` / `end`;
`range $i, $x := pipeline` / `end`; variables (`$x := ...`, `$`, `$.Field`, `$x.Field`); fields on dot
(`.Role`); parenthesised calls; string, number and boolean literals; the builtins and, or, not, eq, ne,
lt, le, gt, ge, len, slice, index. Anything else raises TemplateError: a template that uses more than this
is not ours.

The pipeline mirrors Ollama's chat handler (server/routes.go and template/template.go):
the Modelfile SYSTEM is prepended as a system message unless the request's first message is one;
then consecutive messages of the same role are joined with a blank line, and the template receives
`.System` (all system messages joined with a blank line) and `.Messages` (system messages included,
each with `.Role`, `.Content` and `.Thinking`: the reasoning Ollama parsed out of a reply), plus
`.Think` / `.IsThinkSet` (the request's think option, and whether it was given).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


class TemplateError(ValueError):
    pass


_SPACE = " \t\r\n"


# ---- lexing -----------------------------------------------------------------------------------------
def _split(src: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", body)] with trim markers applied to the neighbouring text."""
    items: list[tuple[str, str]] = []
    pos = 0
    trim_next = False
    while True:
        start = src.find("{{", pos)
        text = src[pos:] if start < 0 else src[pos:start]
        if trim_next:
            text = text.lstrip(_SPACE)
        if start < 0:
            items.append(("text", text))
            return items
        body_start = start + 2
        if src.startswith("-", body_start) and body_start + 1 < len(src) and src[body_start + 1] in _SPACE:
            text = text.rstrip(_SPACE)
            body_start += 2
        items.append(("text", text))
        end = _find_close(src, body_start)
        body = src[body_start:end]
        trim_next = False
        if len(body) >= 2 and body.endswith("-") and body[-2] in _SPACE:
            body = body[:-2]
            trim_next = True
        items.append(("action", body.strip(_SPACE)))
        pos = end + 2


def _find_close(src: str, i: int) -> int:
    quote = None
    while i < len(src) - 1:
        c = src[i]
        if quote:
            if c == "\\" and quote == '"':
                i += 2
                continue
            if c == quote:
                quote = None
        elif c in '"`':
            quote = c
        elif src.startswith("}}", i):
            return i
        i += 1
    raise TemplateError("unclosed action")


_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<str>"(?:[^"\\]|\\.)*"|`[^`]*`)
  | (?P<num>-?\d+(?:\.\d+)?)
  | (?P<decl>:=)
  | (?P<assign>=)
  | (?P<punct>[(),|])
  | (?P<var>\$[A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
  | (?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\.)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
""",
    re.VERBOSE,
)


def _tokens(body: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(body):
        m = _TOKEN.match(body, pos)
        if not m:
            raise TemplateError(f"cannot read {body[pos : pos + 20]!r}")
        pos = m.end()
        if m.lastgroup != "ws":
            out.append((m.lastgroup, m.group()))
    return out


# ---- parsing ----------------------------------------------------------------------------------------
@dataclass
class Text:
    text: str


@dataclass
class Action:
    expr: list  # tokens of a (possibly declaring) pipeline


@dataclass
class If:
    branches: list = field(default_factory=list)  # [(cond tokens, body)]
    otherwise: list | None = None


@dataclass
class Range:
    names: list[str]
    expr: list
    body: list = field(default_factory=list)
    otherwise: list | None = None


def parse(src: str) -> list:
    items = _split(src)
    nodes, pos = _parse_list(items, 0, top=True)
    return nodes


def _keyword(body: str) -> str:
    return body.split(None, 1)[0] if body else ""


def _parse_list(items, pos, top=False):
    nodes = []
    while pos < len(items):
        kind, body = items[pos]
        if kind == "text":
            if body:
                nodes.append(Text(body))
            pos += 1
            continue
        kw = _keyword(body)
        if kw in ("end", "else"):
            if top:
                raise TemplateError(f"unexpected {{{{ {body} }}}}")
            return nodes, pos
        if kw == "if":
            node = If()
            cond = _tokens(body[2:])
            while True:
                block, pos = _parse_list(items, pos + 1)
                kw2 = _closing(items, pos)
                node.branches.append((cond, block))
                rest = items[pos][1]
                if kw2 == "else" and _tokens(rest)[1:2] == [("ident", "if")]:
                    cond = _tokens(rest.split(None, 2)[2])
                    continue
                if kw2 == "else":
                    node.otherwise, pos = _parse_list(items, pos + 1)
                    if _closing(items, pos) != "end":
                        raise TemplateError("if: else must be followed by end")
                break
            nodes.append(node)
            pos += 1
            continue
        if kw == "range":
            toks = _tokens(body[5:])
            names = []
            if ("decl", ":=") in toks:
                k = toks.index(("decl", ":="))
                names = [t[1] for t in toks[:k] if t[0] == "var"]
                toks = toks[k + 1 :]
            node = Range(names, toks)
            node.body, pos = _parse_list(items, pos + 1)
            if _closing(items, pos) == "else":
                node.otherwise, pos = _parse_list(items, pos + 1)
            if _closing(items, pos) != "end":
                raise TemplateError("range without end")
            nodes.append(node)
            pos += 1
            continue
        if kw in ("with", "template", "define", "block", "break", "continue"):
            raise TemplateError(f"{kw!r} is not supported by this interpreter")
        nodes.append(Action(_tokens(body)))
        pos += 1
    if not top:
        raise TemplateError("missing {{ end }}")
    return nodes, pos


def _closing(items, pos) -> str:
    if pos >= len(items):
        raise TemplateError("missing {{ end }}")
    return _keyword(items[pos][1])


# ---- evaluation -------------------------------------------------------------------------------------
def truth(v) -> bool:
    if v is None or v is False:
        return False
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return v != 0
    if isinstance(v, (str, list, tuple, dict)):
        return len(v) > 0
    return True


def _show(v) -> str:
    if v is None:
        return "<no value>"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


class _Scope:
    def __init__(self, root):
        self.frames = [{"$": root}]

    def get(self, name):
        for frame in reversed(self.frames):
            if name in frame:
                return frame[name]
        raise TemplateError(f"undefined variable {name}")

    def declare(self, name, value):
        self.frames[-1][name] = value

    def assign(self, name, value):
        for frame in reversed(self.frames):
            if name in frame:
                frame[name] = value
                return
        raise TemplateError(f"undefined variable {name}")


def _field(value, names):
    for n in names:
        if isinstance(value, dict):
            value = value.get(n)
        else:
            value = getattr(value, n, None)
    return value


def _eq(a, *bs):
    return any(a == b for b in bs)


def _slice(x, *idx):
    if len(idx) == 0:
        return x
    if len(idx) == 1:
        return x[idx[0] :]
    return x[idx[0] : idx[1]]


def _index(x, *keys):
    for k in keys:
        x = x[k]
    return x


FUNCS = {
    "eq": _eq,
    "ne": lambda a, b: a != b,
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
    "not": lambda a: not truth(a),
    "len": lambda a: len(a),
    "slice": _slice,
    "index": _index,
}


class _Eval:
    def __init__(self, scope: _Scope):
        self.scope = scope

    def pipeline(self, toks, dot):
        if ("punct", "|") in toks:
            raise TemplateError("pipes are not supported by this interpreter")
        if len(toks) >= 2 and toks[0][0] == "var" and toks[1][0] in ("decl", "assign"):
            value = self.command(toks[2:], dot)
            (self.scope.declare if toks[1][0] == "decl" else self.scope.assign)(toks[0][1], value)
            return None, False
        return self.command(toks, dot), True

    def command(self, toks, dot):
        args = self._group(toks)
        if not args:
            raise TemplateError("empty command")
        head = args[0]
        if head[0] == "ident" and head[1] in ("and", "or"):
            want = head[1] == "or"
            value = None
            for a in args[1:]:
                value = self.operand(a, dot)
                if truth(value) == want:
                    return value
            return value
        if head[0] == "ident" and head[1] in FUNCS:
            return FUNCS[head[1]](*(self.operand(a, dot) for a in args[1:]))
        if len(args) != 1:
            raise TemplateError(f"cannot call {head[1]!r}")
        return self.operand(head, dot)

    def _group(self, toks):
        """Split tokens into operands, keeping parenthesised sub-commands together."""
        out, i = [], 0
        while i < len(toks):
            if toks[i] == ("punct", "("):
                depth, j = 1, i + 1
                while depth:
                    if j >= len(toks):
                        raise TemplateError("unbalanced parentheses")
                    depth += {("punct", "("): 1, ("punct", ")"): -1}.get(toks[j], 0)
                    j += 1
                out.append(("paren", toks[i + 1 : j - 1]))
                i = j
            else:
                out.append(toks[i])
                i += 1
        return out

    def operand(self, tok, dot):
        kind, text = tok
        if kind == "paren":
            return self.command(text, dot)
        if kind == "str":
            return _unquote(text)
        if kind == "num":
            return float(text) if "." in text else int(text)
        if kind == "field":
            return dot if text == "." else _field(dot, text[1:].split("."))
        if kind == "var":
            name, *rest = text.split(".")
            return _field(self.scope.get(name), rest)
        if kind == "ident" and text in ("true", "false"):
            return text == "true"
        if kind == "ident" and text == "nil":
            return None
        raise TemplateError(f"unknown operand {text!r}")


def _unquote(text: str) -> str:
    if text.startswith("`"):
        return text[1:-1]
    import json

    return json.loads(text)


def execute(src: str | list, data: dict) -> str:
    nodes = parse(src) if isinstance(src, str) else src
    scope = _Scope(data)
    out: list[str] = []
    _run(nodes, data, _Eval(scope), out)
    return "".join(out)


def _run(nodes, dot, ev: _Eval, out):
    for node in nodes:
        if isinstance(node, Text):
            out.append(node.text)
        elif isinstance(node, Action):
            value, show = ev.pipeline(node.expr, dot)
            if show:
                out.append(_show(value))
        elif isinstance(node, If):
            for cond, body in node.branches:
                ev.scope.frames.append({})
                try:
                    if truth(ev.pipeline(cond, dot)[0]):
                        _run(body, dot, ev, out)
                        break
                finally:
                    ev.scope.frames.pop()
            else:
                if node.otherwise is not None:
                    ev.scope.frames.append({})
                    try:
                        _run(node.otherwise, dot, ev, out)
                    finally:
                        ev.scope.frames.pop()
        elif isinstance(node, Range):
            seq = ev.command(node.expr, dot)
            items = list(seq.items()) if isinstance(seq, dict) else list(enumerate(seq or []))
            if not items and node.otherwise is not None:
                _run(node.otherwise, dot, ev, out)
            for key, value in items:
                frame = {}
                if len(node.names) == 1:
                    frame[node.names[0]] = value
                elif len(node.names) == 2:
                    frame[node.names[0]], frame[node.names[1]] = key, value
                ev.scope.frames.append(frame)
                try:
                    _run(node.body, value, ev, out)
                finally:
                    ev.scope.frames.pop()


# ---- Ollama's chat pipeline -------------------------------------------------------------------------
def ollama_prompt(template: str, messages: list[dict], system: str | None = None, *, think: bool | None = None) -> str:
    """The prompt Ollama's /api/chat builds from a Modelfile TEMPLATE and SYSTEM for these messages.

    A message may carry "thinking" (what Ollama parsed out of a reply); think is the request's option."""
    msgs = [{"role": m["role"], "content": m.get("content", ""), "thinking": m.get("thinking", "")} for m in messages]
    if system and (not msgs or msgs[0]["role"] != "system"):
        msgs.insert(0, {"role": "system", "content": system, "thinking": ""})
    systems, collated = [], []
    for m in msgs:
        if m["role"] == "system":
            systems.append(m["content"])
        if collated and collated[-1]["Role"] == m["role"] and m["role"] != "tool":
            collated[-1]["Content"] += "\n\n" + m["content"]
        else:
            collated.append({"Role": m["role"], "Content": m["content"], "Thinking": m["thinking"]})
    return execute(
        template,
        {
            "System": "\n\n".join(systems),
            "Messages": collated,
            "Response": "",
            "Think": bool(think),
            "IsThinkSet": think is not None,
        },
    )
