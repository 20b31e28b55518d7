"""Ollama Modelfile: chat-template families, an explicit TEMPLATE, every stop token, a safe SYSTEM.

The family is chosen by rendering the tokenizer's own chat template (the one training used) on probe
conversations and comparing with what each family's reference renderer produces, never by model name.
The family's Go TEMPLATE makes Ollama build byte-for-byte the prompt the HF template builds (a BOS that
the HF template writes first is left to the runtime when the GGUF's add_bos is set). When the
HF template inserts a default system prompt (SmolLM2 does), the Modelfile's SYSTEM defaults to that
exact text, because Ollama only renders a system block when it has a system prompt.

Modelfile values: Ollama's parser has no escape sequences. A `\"\"\"` block ends at the first line that
ends in `\"\"\"`, and characters that are not printable (other than newline and tab) are silently
dropped. So a value containing `\"\"\"` or such characters is refused (BadInput): it cannot be encoded
without changing it, and `\"\"\"` followed by a newline would let the rest become Modelfile instructions.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from medtune.core.errors import BadInput
from medtune.export.chat_templates import FIXED_DATE, TEMPLATE_VARS
from medtune.runtimes.decoding import REPEAT_LAST_N, REPEAT_PENALTY  # also chat/generate's defaults

# ---- families ---------------------------------------------------------------------------------------
# Both templates walk .Messages, which in Ollama holds every system message in place (the Modelfile
# SYSTEM is prepended as one when a request starts without one), so an explicit empty system prompt
# and a system message in mid-conversation render exactly as the HF template renders them.
CHATML_TEMPLATE = """\
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- end }}"""

GENERIC_TEMPLATE = """\
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "system" }}{{ .Content }}

{{ else if eq .Role "user" }}User: {{ .Content }}
{{ else }}Assistant: {{ .Content }}
{{ end }}
{{- if and $last (ne .Role "assistant") }}Assistant:{{ end }}
{{- end }}"""


# Qwen3: ChatML whose assistant turns lose their reasoning in the history (HF cuts `content` at the last
# </think>); an assistant turn after the last user message (a continuation) shows its reasoning in a
# think block, empty or not. In Ollama the reasoning of a reply arrives as `.Thinking` (Ollama parses
# it out of the output because the template names `.Thinking` between <think> and </think>), and
# `.Content` is the answer with the whitespace after </think> eaten, as HF's lstrip does. `$.Think`
# false (`ollama run --think=false`) renders the empty think block of HF's enable_thinking=False.
QWEN3_TEMPLATE = """\
{{- $lastUser := len .Messages }}
{{- range $i, $m := .Messages }}{{ if eq $m.Role "user" }}{{ $lastUser = $i }}{{ end }}{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "assistant" }}<|im_start|>assistant
{{ if and (gt $i $lastUser) (or $last .Thinking) }}<think>
{{ .Thinking }}
</think>

{{ end }}{{ .Content }}<|im_end|>
{{ else }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ if and $.IsThinkSet (not $.Think) }}<think>

</think>

{{ end }}
{{- end }}
{{- end }}"""

# DeepSeek-R1 (the Qwen and Llama distills): BOS, every system message joined by a blank line (Ollama's
# .System is exactly that), then <｜User｜>/<｜Assistant｜> turns; an assistant turn keeps only what
# follows its last </think>. The BOS is not in the TEMPLATE: the GGUF's add_bos makes the runtime add it
# (see render_modelfile). For a reply whose reasoning Ollama parsed out, HF's history keeps what the model
# wrote after </think>, which is "\n\n" for these models: the TEMPLATE writes that back.
# Two published versions differ only in the generation prompt: the later one (February 2025 on) opens the
# think block itself (`<｜Assistant｜><think>\n`); the January 2025 one ends at `<｜Assistant｜>`, so the
# model opens <think> on its own. DS_THINK_OPEN is what the later prompt adds.
DS_BOS, DS_EOS, DS_USER, DS_ASSISTANT = (
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
)
DS_THINK_OPEN = "<think>\n"


def _deepseek_r1_template(think_open: str) -> str:
    """The DeepSeek-R1 Go TEMPLATE whose generation prompt is <｜Assistant｜> + `think_open`."""
    return (
        """\
{{- .System }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<｜User｜>{{ .Content }}
{{- else if eq .Role "assistant" }}<｜Assistant｜>{{ if and (not $last) .Thinking }}

{{ end }}{{ if and $last .Thinking }}<think>
{{ .Thinking }}
</think>

{{ end }}{{ .Content }}<｜end▁of▁sentence｜>
{{- end }}
{{- if and $last (ne .Role "assistant") }}<｜Assistant｜>"""
        + think_open
        + """{{ end }}
{{- end }}"""
    )


DEEPSEEK_R1_TEMPLATE = _deepseek_r1_template(DS_THINK_OPEN)
DEEPSEEK_R1_JAN_TEMPLATE = _deepseek_r1_template("")

# Llama 3: header-delimited turns, BOS first (added by the runtime, as for DeepSeek). HF trims every
# content; a Go template cannot, so contents with leading/trailing whitespace render differently.
LLAMA3_BOS = "<|begin_of_text|>"
LLAMA3_TEMPLATE = """\
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- if and $last (ne .Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- end }}"""


# Phi-3 / Phi-3.5: each turn is its role tag on a line of its own, the content, <|end|> and a newline; a system
# message with empty content is left out (as the HF template does), as is any role other than these three.
PHI3_TEMPLATE = """\
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if and (eq .Role "system") .Content }}<|system|>
{{ .Content }}<|end|>
{{ else if eq .Role "user" }}<|user|>
{{ .Content }}<|end|>
{{ else if eq .Role "assistant" }}<|assistant|>
{{ .Content }}<|end|>
{{ end }}
{{- if and $last (ne .Role "assistant") }}<|assistant|>
{{ end }}
{{- end }}"""

# Phi-4-mini: the same tags with no newlines, and every role (an empty system prompt too) written as <|role|>.
PHI4_MINI_TEMPLATE = """\
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}<|{{ .Role }}|>{{ .Content }}<|end|>
{{- if and $last (ne .Role "assistant") }}<|assistant|>{{ end }}
{{- end }}"""
PHI_EOS = "<|endoftext|>"  # what both Phi templates append to a conversation rendered without a generation prompt

# Llama 3.1 / 3.2 / 3.3: the Llama 3 turns, but a system block always comes first with the knowledge cut-off and
# "Today Date: <date>" ahead of the (trimmed) system prompt, written with no system message too. The HF template
# takes the date from `date_string`, defaulting to a fixed day (3.1) or today (3.2, strftime_now): medtune fixes
# it to chat_templates.FIXED_DATE everywhere (prepare, training, detection, the GGUF's template), and the TEMPLATE
# writes that same date. A system message after the first is a turn of its own, as in HF.
LLAMA31_HEADER = "Cutting Knowledge Date: December 2023\nToday Date: "


def _llama31_template(date: str) -> str:
    """The Llama 3.1 Go TEMPLATE with `date` in its system block."""
    return (
        """\
{{- $sys := false }}<|start_header_id|>system<|end_header_id|>

"""
        + LLAMA31_HEADER
        + date
        + """

{{ range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if and (eq $i 0) (eq .Role "system") }}{{ .Content }}
{{- else }}
{{- if eq $i 0 }}<|eot_id|>{{ end }}
{{- if $sys }}<|eot_id|>{{ end }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}
{{- $sys = and (eq $i 0) (eq .Role "system") }}
{{- if and $last $sys }}<|eot_id|>{{ end }}
{{- if and $last (ne .Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- end }}"""
    )


# Mistral v0.3 ([INST]): BOS (left to the runtime), `[INST] user[/INST]`, ` answer</s>`; the system prompt and a
# blank line open the LAST user message (HF uses only a first system message: others raise there). The HF
# template trims answers and writes a system block for an empty system message; a Go template does neither.
MISTRAL_BOS, MISTRAL_EOS = "<s>", "</s>"
MISTRAL_TEMPLATE = """\
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}[INST] {{ if and $last $.System }}{{ $.System }}

{{ end }}{{ .Content }}[/INST]
{{- else if eq .Role "assistant" }} {{ .Content }}</s>
{{- end }}
{{- end }}"""

# Gemma 3: `<start_of_turn>ROLE\n...<end_of_turn>\n` with the assistant called "model"; a first system message
# is no turn of its own: its text and a blank line open the first user turn. BOS left to the runtime.
GEMMA_BOS = "<bos>"
GEMMA3_TEMPLATE = """\
{{- $open := false }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "system" }}<start_of_turn>user
{{ .Content }}

{{ $open = true }}
{{- else }}
{{- if not $open }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}{{ end }}
{{ end }}{{ $open = false }}{{ .Content }}<end_of_turn>
{{ end }}
{{- if and $last (ne .Role "assistant") }}<start_of_turn>model
{{ end }}
{{- end }}"""


def _render_chatml(messages: list[dict], add_generation_prompt: bool = True) -> str:
    out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return out + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def _render_generic(messages: list[dict], add_generation_prompt: bool = True) -> str:
    out = []
    for m in messages:
        if m["role"] == "system":
            out.append(f"{m['content']}\n\n")
        else:
            out.append(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}\n")
    return "".join(out) + ("Assistant:" if add_generation_prompt else "")


def _split_reasoning(content: str) -> tuple[str, str]:
    """Qwen3's split of an assistant message into (reasoning, answer) around the last </think>."""
    if "</think>" not in content:
        return "", content
    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
    return reasoning, content.split("</think>")[-1].lstrip("\n")


def _render_qwen3(messages: list[dict], add_generation_prompt: bool = True) -> str:
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=len(messages) - 1)
    out = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            out.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
            continue
        reasoning, answer = _split_reasoning(m["content"])
        if i > last_user and (i == len(messages) - 1 or reasoning):
            answer = f"<think>\n{reasoning.strip(chr(10))}\n</think>\n\n{answer.lstrip(chr(10))}"
        out.append(f"<|im_start|>assistant\n{answer}<|im_end|>\n")
    return "".join(out) + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def _render_deepseek_r1(
    messages: list[dict], add_generation_prompt: bool = True, think_open: str = DS_THINK_OPEN
) -> str:
    out = [DS_BOS, "\n\n".join(m["content"] for m in messages if m["role"] == "system")]
    for m in messages:
        if m["role"] == "user":
            out.append(DS_USER + m["content"])
        elif m["role"] == "assistant":
            out.append(DS_ASSISTANT + m["content"].split("</think>")[-1] + DS_EOS)
    return "".join(out) + (DS_ASSISTANT + think_open if add_generation_prompt else "")


def _render_llama3(messages: list[dict], add_generation_prompt: bool = True) -> str:
    out = "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in messages
    )
    return LLAMA3_BOS + out + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")


def _render_phi3(messages: list[dict], add_generation_prompt: bool = True) -> str:
    out = "".join(
        f"<|{m['role']}|>\n{m['content']}<|end|>\n"
        for m in messages
        if m["role"] in ("user", "assistant") or (m["role"] == "system" and m["content"])
    )
    return out + ("<|assistant|>\n" if add_generation_prompt else PHI_EOS)


def _render_phi4_mini(messages: list[dict], add_generation_prompt: bool = True) -> str:
    out = "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)
    return out + ("<|assistant|>" if add_generation_prompt else PHI_EOS)


def _render_llama31(messages: list[dict], add_generation_prompt: bool = True, date: str = FIXED_DATE) -> str:
    system = messages[0]["content"].strip() if messages and messages[0]["role"] == "system" else ""
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    head = f"<|start_header_id|>system<|end_header_id|>\n\n{LLAMA31_HEADER}{date}\n\n{system}<|eot_id|>"
    return LLAMA3_BOS + head + _render_llama3(turns, add_generation_prompt)[len(LLAMA3_BOS) :]


def _render_mistral(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """(The template has no generation prompt: a prompt ends at [/INST] either way.)"""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    out = [MISTRAL_BOS]
    for i, m in enumerate(turns):
        if m["role"] == "user":
            lead = f"{system}\n\n" if system is not None and i == len(turns) - 1 else ""
            out.append(f"[INST] {lead}{m['content']}[/INST]")
        else:
            out.append(f" {m['content'].strip()}{MISTRAL_EOS}")
    return "".join(out)


def _render_gemma3(messages: list[dict], add_generation_prompt: bool = True) -> str:
    lead = messages[0]["content"] + "\n\n" if messages and messages[0]["role"] == "system" else ""
    turns = messages[1:] if lead else messages
    out = [GEMMA_BOS]
    for i, m in enumerate(turns):
        role = "model" if m["role"] == "assistant" else m["role"]
        out.append(f"<start_of_turn>{role}\n{lead if i == 0 else ''}{m['content'].strip()}<end_of_turn>\n")
    return "".join(out) + ("<start_of_turn>model\n" if add_generation_prompt else "")


@dataclass(frozen=True)
class Family:
    name: str
    template: str  # Ollama Go template
    render: Callable[..., str]  # what a matching HF chat template renders
    stops: tuple[str, ...]  # end-of-turn and role markers, in this order
    system_open: str  # text before / after the system prompt in a rendering (to find a default one)
    system_close: str
    bos: str = ""  # the BOS text the HF template starts with; the runtime adds it when the GGUF's add_bos says so


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> None:
    FAMILIES[family.name] = family


def _pass_family() -> str:
    """The user's way out when detection fails: name the family the model was trained on."""
    return f"pass --family NAME with the prompt format the model was trained on ({', '.join(FAMILIES)})"


def get_family(name: str) -> Family:
    """The registered family `name` (export's --family); an unknown name is refused listing the known ones."""
    if name not in FAMILIES:
        raise BadInput(
            f"unknown chat-template family {name!r} (known: {', '.join(FAMILIES)})",
            where="--family",
            hint="pass one of those, or leave --family out to detect the family from the tokenizer's chat template",
        )
    return FAMILIES[name]


register(
    Family(
        "chatml",
        CHATML_TEMPLATE,
        _render_chatml,
        ("<|im_end|>", "<|im_start|>"),
        "<|im_start|>system\n",
        "<|im_end|>\n",
    )
)
register(Family("generic", GENERIC_TEMPLATE, _render_generic, ("User:",), "", "\n\n"))
register(
    Family(
        "qwen3", QWEN3_TEMPLATE, _render_qwen3, ("<|im_end|>", "<|im_start|>"), "<|im_start|>system\n", "<|im_end|>\n"
    )
)
register(
    Family(
        "deepseek-r1",
        DEEPSEEK_R1_TEMPLATE,
        _render_deepseek_r1,
        (DS_EOS, DS_USER, DS_ASSISTANT),
        DS_BOS,
        DS_USER,
        bos=DS_BOS,
    )
)
register(
    replace(
        FAMILIES["deepseek-r1"],
        name="deepseek-r1-jan",
        template=DEEPSEEK_R1_JAN_TEMPLATE,
        render=functools.partial(_render_deepseek_r1, think_open=""),
    )
)
register(
    Family(
        "llama3",
        LLAMA3_TEMPLATE,
        _render_llama3,
        ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"),
        LLAMA3_BOS + "<|start_header_id|>system<|end_header_id|>\n\n",
        "<|eot_id|>",
        bos=LLAMA3_BOS,
    )
)
register(
    Family("phi3", PHI3_TEMPLATE, _render_phi3, ("<|end|>", "<|user|>", "<|assistant|>"), "<|system|>\n", "<|end|>\n")
)
register(
    Family(
        "phi4-mini",
        PHI4_MINI_TEMPLATE,
        _render_phi4_mini,
        ("<|end|>", "<|user|>", "<|assistant|>"),
        "<|system|>",
        "<|end|>",
    )
)
register(
    replace(
        FAMILIES["llama3"],
        name="llama3.1",
        template=_llama31_template(FIXED_DATE),
        render=_render_llama31,
    )
)
register(
    Family(
        "mistral",
        MISTRAL_TEMPLATE,
        _render_mistral,
        (MISTRAL_EOS, "[INST]", "[/INST]"),
        MISTRAL_BOS + "[INST] ",
        "\n\n",
        bos=MISTRAL_BOS,
    )
)
register(
    Family(
        "gemma3",
        GEMMA3_TEMPLATE,
        _render_gemma3,
        ("<end_of_turn>", "<start_of_turn>"),
        GEMMA_BOS + "<start_of_turn>user\n",
        "\n\n",
        bos=GEMMA_BOS,
    )
)

# Probe conversations: what the template is checked against. Contents avoid what a template might
# rewrite by accident (leading/trailing spaces); the last probe has reasoning in an assistant turn of
# the history, which tells the families that strip it (qwen3, deepseek-r1) from those that keep it.
_PROBES = [
    [
        {"role": "system", "content": "You are a careful clinician."},
        {"role": "user", "content": "What lowers fever?"},
        {"role": "assistant", "content": "Paracetamol, fluids and rest."},
        {"role": "user", "content": "And in children?"},
    ],
    [{"role": "user", "content": "Define tachycardia."}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Dose of\nibuprofen?"},
    ],
    [
        {"role": "user", "content": "Is 38.5 C a fever?"},
        {"role": "assistant", "content": "<think>\nAdults: fever from 38.0 C.\n</think>\n\nYes, a mild one."},
        {"role": "user", "content": "Treat it?"},
    ],
]


@dataclass
class Match:
    family: Family
    default_system: str | None  # the system prompt the HF template inserts when none is given


_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _hf_renderer(model_dir: Path, template: str | None = None):
    """The tokenizer's chat template (or `template`), compiled by transformers' own jinja compiler and given what
    apply_chat_template gives it (messages, add_generation_prompt, the special tokens). Building the
    whole tokenizer would import torch and cost ~3 s and ~450 MB in an export that needs neither;
    tests compare this with apply_chat_template (`hf_render`)."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    from medtune.export.tokenizer import _load_json, _token_text, chat_template

    template = template or chat_template(model_dir)
    if template is None:
        raise ValueError("the tokenizer has no chat template")
    cfg = _load_json(model_dir / "tokenizer_config.json")
    special = {k: _token_text(cfg.get(k)) for k in _SPECIAL_KEYS}
    special = {k: v for k, v in special.items() if v is not None}
    compiled = _compile_jinja_template(template)

    def render(messages):
        return compiled.render(
            messages=messages, add_generation_prompt=True, tools=None, documents=None, **special, **TEMPLATE_VARS
        )

    return render


def hf_render(model_dir: str | Path, messages: list[dict]) -> str:
    """The reference: transformers' apply_chat_template with add_generation_prompt=True (and medtune's fixed
    template variables, chat_templates.TEMPLATE_VARS)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **TEMPLATE_VARS)


def _match_family(family: Family, render) -> Match | None:
    """Match if every probe renders as the family does, with one consistent default system prompt
    (or none) on the probes that give no system message."""
    defaults = set()
    for probe in _PROBES:
        got = render(probe)
        if got == family.render(probe):
            if probe[0]["role"] != "system":
                defaults.add(None)
            continue
        if probe[0]["role"] == "system":
            return None
        # Maybe the template inserts a default system prompt: find it, then re-check with it.
        if not got.startswith(family.system_open):
            return None
        end = got.find(family.system_close, len(family.system_open))
        if end < 0:
            return None
        candidate = got[len(family.system_open) : end]
        if got != family.render([{"role": "system", "content": candidate}, *probe]):
            return None
        defaults.add(candidate)
    if len(defaults) > 1:
        return None
    return Match(family, defaults.pop() if defaults else None)


def go_with_user_wording(template: str, before: str, after: str) -> str:
    """A family's Go TEMPLATE with every user turn written as before + .Content + after (the training wording,
    medtune.data.wording.user_wrap), the other turns as they were."""
    import json

    def quoted(text: str) -> str:
        return json.dumps(text, ensure_ascii=False)  # a Go string literal: JSON's escapes are Go's

    worded = (
        f'{{{{ if eq .Role "user" }}}}{{{{ {quoted(before)} }}}}{{{{ .Content }}}}{{{{ {quoted(after)} }}}}'
        "{{ else }}{{ .Content }}{{ end }}"
    )
    return template.replace("{{ .Content }}", worded)


def check_user_wording(model_dir: Path, jinja: str, wrap: tuple[str, str], family: str | None = None) -> str | None:
    """Why the served templates cannot word the user turns themselves, or None: on every probe conversation, the
    family's Go TEMPLATE (through medtune.export.gotemplate) and the chat template `jinja` (through transformers'
    Jinja), each with the wording added, render the plain conversation exactly as they render the worded one."""
    from medtune.export.chat_templates import with_user_wording
    from medtune.export.gotemplate import TemplateError, ollama_prompt

    go = get_family(family).template if family else detect_family(model_dir, jinja).family.template
    go_worded = go_with_user_wording(go, *wrap)
    plain, worded = _hf_renderer(model_dir, jinja), _hf_renderer(model_dir, with_user_wording(jinja, *wrap))
    for probe in _PROBES:
        want = [{**m, "content": wrap[0] + m["content"] + wrap[1]} if m["role"] == "user" else m for m in probe]
        try:
            if ollama_prompt(go_worded, probe) != ollama_prompt(go, want):
                return "the Modelfile's TEMPLATE does not take the prompt wording (its user turns are not plain)"
        except TemplateError as exc:
            return f"the Modelfile's TEMPLATE does not take the prompt wording ({exc})"
        if worded(probe) != plain(want):
            return "the chat template does not take the prompt wording (it rewrites the user turns)"
    return None


def detect_family(model_dir: str | Path, template: str | None = None) -> Match:
    """The family whose rendering equals the tokenizer's own chat template on every probe."""
    from medtune.export.tokenizer import chat_template

    model_dir = Path(model_dir)
    template = template if template is not None else chat_template(model_dir)
    if not template:
        raise BadInput(
            "the tokenizer has no chat template",
            where=str(model_dir),
            hint="fine-tune a chat model (its tokenizer has a chat template), or pass --family generic for "
            "medtune's plain User:/Assistant: format",
        )
    try:
        render = _hf_renderer(model_dir)
        for family in FAMILIES.values():
            found = _match_family(family, render)
            if found:
                return found
    except BadInput:
        raise
    except Exception as exc:  # jinja errors: the template raised on a probe
        raise BadInput(
            f"the tokenizer's chat template cannot render a probe conversation ({exc})",
            where=str(model_dir),
            hint="copy the base chat model's tokenizer_config.json into the folder, or " + _pass_family(),
        ) from exc
    raise BadInput(
        f"the tokenizer's chat template matches no known family ({', '.join(FAMILIES)})",
        where=str(model_dir),
        hint=_pass_family() + "; Ollama's prompts then follow that family, not this template",
    )


# ---- Modelfile values -------------------------------------------------------------------------------
_PARAM_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
# repeat_penalty/repeat_last_n are medtune chat's and generate's defaults too (medtune.runtimes.decoding), so the
# two runtimes decode with the same penalty; they are written out rather than left to Ollama's defaults.
DEFAULT_PARAMS = {"temperature": 0.6, "top_p": 0.9, "repeat_penalty": REPEAT_PENALTY, "repeat_last_n": REPEAT_LAST_N}


def _check_chars(value: str, what: str) -> None:
    for ch in value:
        if ch in "\n\r\t":
            continue
        if not ch.isprintable():
            raise BadInput(
                f"{what} contains the non-printable character U+{ord(ch):04X}, which Ollama's Modelfile parser drops",
                hint="remove it (or replace it with a plain space)",
            )


def quote_value(value: str, what: str = "value") -> str:
    """A Modelfile argument that Ollama's parser reads back as exactly `value`."""
    if not isinstance(value, str):
        raise BadInput(f"{what} must be text, got {type(value).__name__}")
    _check_chars(value, what)
    if '"""' in value:
        raise BadInput(
            f'{what} contains """, which cannot be written into a Modelfile safely',
            hint='Modelfile values have no escapes and """ ends a block; rephrase without """',
        )
    simple = (
        value and value == value.strip(" \t") and "\n" not in value and "\r" not in value and not value.startswith('"')
    )
    if simple:
        return value
    return f'"""{value}"""'


def _param_value(name: str, value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value) if isinstance(value, float) else str(value)
    return quote_value(str(value), f"PARAMETER {name}")


def licence_value(text: str) -> str | None:
    """A licence text as a Modelfile LICENSE value: line ends made LF, characters Ollama's parser would drop
    (form feeds, a BOM...) removed, trimmed as the parser trims; None when it cannot be written (it holds \"\"\")."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "".join(ch for ch in text if ch in "\n\t" or ch.isprintable()).strip()
    return text if text and '"""' not in text else None


def modelfile_lines(
    from_path: str,
    template: str,
    system: str | None,
    stops: list[str],
    params: dict,
    licence: str | None = None,
    wording: tuple[str, str] | None = None,
) -> list[str]:
    lines = [
        "# Written by medtune. TEMPLATE reproduces the tokenizer's chat template; do not edit by hand.",
        "# Ollama >= 0.30 runs the GGUF in llama-server: for a chat template that mentions tools or <think> it renders",
        "# the GGUF's own template (tokenizer.chat_template) instead of TEMPLATE (OLLAMA_GO_TEMPLATE=1 forces TEMPLATE);",
        "# older Ollama renders TEMPLATE. `medtune eval fidelity` proves the GGUF's template in llama-server, the tests",
        "# prove TEMPLATE with Go's text/template. Stopping rests on the GGUF's end tokens (eos, eot): llama-server",
        "# runs without --special, so a stop that is a control token only matters to older Ollama.",
        *(
            ["# TEMPLATE uses .Thinking (the reasoning Ollama parses out of a reply): it needs Ollama >= 0.9."]
            if ".Thinking" in template
            else []
        ),
        *(
            [
                f"# TEMPLATE (and the GGUF's template) word every question as training did: {wording[0]!r} before, "
                f"{wording[1]!r} after. Send the plain question."
            ]
            if wording
            else []
        ),
        f"FROM {quote_value(str(from_path), 'FROM path')}",
        f"TEMPLATE {quote_value(template, 'TEMPLATE')}",
    ]
    if system:
        lines.append(f"SYSTEM {quote_value(system, 'system prompt')}")
    for s in stops:
        lines.append(f"PARAMETER stop {quote_value(s, 'stop')}")
    for name, value in params.items():
        if not _PARAM_NAME.fullmatch(name) or name == "stop":
            raise BadInput(f"bad Modelfile parameter name {name!r}", hint="use Ollama option names such as temperature")
        values = value if isinstance(value, (list, tuple)) else [value]
        lines += [f"PARAMETER {name} {_param_value(name, v)}" for v in values]
    if licence:
        _check_chars(licence, "LICENSE")
        if '"""' in licence or licence != licence.strip():
            raise BadInput('the licence text holds """ or is not trimmed', hint="pass it through licence_value")
        lines.append(f'LICENSE """{licence}"""')  # always a block, as `ollama show --modelfile` writes one
    return lines


# ---- the Modelfile ----------------------------------------------------------------------------------
def stop_tokens(family: Family, vocab) -> list[str]:
    """Family markers, then every end-of-sequence token and <|endoftext|>-like special tokens."""
    stops = list(family.stops)
    for idx in vocab.eos_ids:
        text = vocab.text(idx)
        if text:
            stops.append(text)
    for text in ("<|endoftext|>", "<|eot_id|>", "<|end|>"):
        if vocab.is_special(text):
            stops.append(text)
    return list(dict.fromkeys(s for s in stops if s))


def _with_bos(family: Family, vocab, model_dir: Path, warnings: list[str]) -> str:
    """The family's TEMPLATE such that BOS + prompt tokens are what training saw.

    Training tokenizes the HF rendering without adding special tokens, so a BOS comes only from the
    template text; Ollama adds one itself when the GGUF's add_bos is set. A family that starts with BOS
    leaves it to the runtime then, and writes it into the TEMPLATE otherwise."""
    bos_text = vocab.text(vocab.bos_id) if vocab.bos_id is not None else None
    if not family.bos:
        if vocab.add_bos:
            warnings.append(
                f"the GGUF adds {bos_text} before every prompt and the chat template does not: "
                "Ollama's prompts start with one token that training did not see"
            )
        return family.template
    if not vocab.add_bos:
        return family.bos + family.template
    if bos_text != family.bos:
        raise BadInput(
            f"the chat template starts with {family.bos} but the tokenizer's BOS (added to every prompt) is {bos_text}",
            where=str(model_dir),
            hint="fix bos_token in the model folder's tokenizer_config.json, or set add_bos_token false there",
        )
    return family.template


def render_modelfile(
    gguf_filename: str | Path,
    model_dir: str | Path,
    system: str | None = None,
    params: dict | None = None,
    *,
    family: str | None = None,
    vocab=None,
    licence: str | None = None,
    wording: tuple[str, str] | None = None,
) -> tuple[str, dict]:
    """Modelfile text for the GGUF at `gguf_filename`, written as FROM as given (`medtune export` passes it relative
    to the Modelfile's folder, medtune.export.modelfile_from, which is how Ollama resolves FROM).

    system: None -> the chat template's own default system prompt, if it has one; "" -> no SYSTEM.
    params: Ollama PARAMETERs added to / overriding the defaults (temperature, top_p, num_ctx, ...).
    family: force a family by name instead of detecting it (e.g. "generic" for a template-less base).
    licence: the LICENSE text; None -> the model folder's LICENSE file (the base's, which fuse copies), if any;
    "" -> no LICENSE.
    wording: (text before, text after) every user turn, the training wording the TEMPLATE puts around the plain
    question (checked by export first, check_user_wording).
    Returns (text, info) where info has family, stops, system, default_system, template, params, licence (whether
    a LICENSE was written), wording, warnings.
    """
    from medtune.export.tokenizer import read_vocab
    from medtune.models.config import read_config

    model_dir = Path(model_dir)
    vocab = vocab or read_vocab(model_dir)
    warnings: list[str] = []
    if family is not None:
        forced = get_family(family)
        found = None
        if vocab.chat_template:
            try:
                found = _match_family(forced, _hf_renderer(model_dir))
            except Exception:  # noqa: BLE001 - a forced family does not need the HF template to render
                found = None
            if found is None:
                warnings.append(
                    f"family {family!r} was forced and does not match the tokenizer's chat template: "
                    "Ollama's prompts will differ from training"
                )
        else:
            warnings.append(
                f"the tokenizer has no chat template: the Modelfile uses the {family!r} format, "
                "which the model only follows if it was trained on it"
            )
        match = found or Match(forced, None)
    else:
        match = detect_family(model_dir, vocab.chat_template)
    fam = match.family
    if system is None:
        system = match.default_system
    elif system == "" and match.default_system:
        warnings.append(
            "system prompt disabled although the chat template has a default one: "
            "Ollama's prompts will differ from training"
        )

    template = _with_bos(fam, vocab, model_dir, warnings)
    if wording:
        template = go_with_user_wording(template, *wording)
    cfg = read_config(model_dir)
    ctx = int(cfg.get("max_position_embeddings") or 4096)
    merged = {**DEFAULT_PARAMS, "num_ctx": min(ctx, 4096), **(params or {})}
    stops = stop_tokens(fam, vocab)
    if isinstance(merged.get("stop"), (list, tuple, str)):
        extra = merged.pop("stop")
        stops += [s for s in ([extra] if isinstance(extra, str) else extra) if s not in stops]
    if licence is None:
        from medtune.models.card import base_licence

        licence = base_licence(model_dir)[1] or ""
    licence_text = licence_value(licence) if licence else None
    if licence and licence_text is None:
        warnings.append('the licence text holds """, which a Modelfile cannot carry: the Modelfile has no LICENSE')
    lines = modelfile_lines(str(gguf_filename), template, system or None, stops, merged, licence_text, wording)
    text = "\n".join(lines) + "\n"
    info = {
        "family": fam.name,
        "stops": stops,
        "system": system or None,
        "default_system": match.default_system,
        "template": template,
        "params": merged,
        "licence": licence_text is not None,
        "wording": list(wording) if wording else None,
        "warnings": warnings,
    }
    return text, info


# ---- reading a Modelfile back (the way Ollama's parser does) ---------------------------------------
def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(command, argument) pairs as Ollama's parser (parser/parser.go) reads them.

    A value ends at a newline once the text gathered so far, trimmed, is a complete value: unquoted,
    "…" or \"\"\"…\"\"\". Non-printable characters other than newline and tab are dropped, as there.
    Lines starting with # are comments.
    """
    commands: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " \t\r\n":
            i += 1
        if i >= n:
            break
        if text[i] == "#":
            while i < n and text[i] not in "\r\n":
                i += 1
            continue
        j = i
        while j < n and text[j].isascii() and text[j].isalpha():
            j += 1
        name = text[i:j].lower()
        if j >= n or text[j] not in " \t":
            raise ValueError(f"invalid command at offset {i}: {text[i : j + 10]!r}")
        if name not in (
            "from",
            "license",
            "template",
            "system",
            "adapter",
            "draft",
            "renderer",
            "parser",
            "parameter",
            "message",
            "requires",
        ):
            raise ValueError(f"invalid command {name!r}")
        i = j + 1
        if name in ("parameter", "message"):
            j = i
            while j < n and (text[j].isalnum() or text[j] == "_"):
                j += 1
            sub = text[i:j]
            i = j + 1
        buf = []
        value = None
        while i < n:
            ch = text[i]
            i += 1
            if ch in "\r\n":
                ok, value = _unquote("".join(buf).strip())
                if ok:
                    break
                buf.append(ch)
                value = None
                continue
            if ch in " \t" or ch.isprintable():
                buf.append(ch)
        if value is None:
            ok, value = _unquote("".join(buf).strip())
            if not ok:
                raise ValueError("unexpected end of file inside a quoted value")
        if name == "parameter":
            commands.append((sub, value))
        elif name == "message":
            commands.append(("message", f"{sub}: {value}"))
        else:
            commands.append(("model" if name == "from" else name, value))
    return commands


def _unquote(s: str) -> tuple[bool, str]:
    if s.startswith('"""'):
        if len(s) >= 6 and s.endswith('"""'):
            return True, s[3:-3]
        return False, ""
    if s.startswith('"'):
        if len(s) >= 2 and s.endswith('"'):
            return True, s[1:-1]
        return False, ""
    return True, s
