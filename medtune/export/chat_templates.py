"""Chat templates of medtune's own writing, for models whose files carry none.

A GGUF converted without its tokenizer_config (the embedded gemma-3-270m is one) has no
`tokenizer.chat_template`; importing it then gives a tokenizer that cannot render a chat, and export
could not tell which prompt format the Modelfile must reproduce. `default_template(arch)` gives the
format that architecture's instruction-tuned releases use, written here as Jinja that renders the same
text as the published template on text-only conversations, so family detection, training prompts and
llama-server's --jinja all see that format.
"""

from __future__ import annotations

import re

# Gemma 3: BOS, then one `<start_of_turn>ROLE\n ... <end_of_turn>\n` block per turn with the assistant called
# "model"; a leading system message is not a turn of its own but its text and a blank line open the first
# turn; turn texts are trimmed, the system text is not. Roles after the system message must alternate,
# user first, as the published template demands. Content may be a string or a list of text parts.
GEMMA3_TEMPLATE = """\
{{- bos_token -}}
{%- set state = namespace(lead='', skip=0) -%}
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set sys = messages[0]['content'] -%}
  {%- if sys is not string -%}{%- set sys = sys[0]['text'] -%}{%- endif -%}
  {%- set state.lead = sys + '\\n\\n' -%}
  {%- set state.skip = 1 -%}
{%- endif -%}
{%- for turn in messages[state.skip:] -%}
  {%- set is_user = turn['role'] == 'user' -%}
  {%- set want_user = loop.index0 % 2 == 0 -%}
  {%- if is_user != want_user -%}
    {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}
  {%- endif -%}
  {{- '<start_of_turn>' + ('model' if turn['role'] == 'assistant' else turn['role']) + '\\n' -}}
  {%- if loop.first -%}{{- state.lead -}}{%- endif -%}
  {%- if turn['content'] is string -%}
    {{- turn['content'] | trim -}}
  {%- else -%}
    {%- for part in turn['content'] -%}
      {%- if part['type'] == 'text' -%}{{- part['text'] | trim -}}{%- endif -%}
    {%- endfor -%}
  {%- endif -%}
  {{- '<end_of_turn>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}
"""

# Templates that write "Today Date: ..." (Llama 3.1 / 3.2 / 3.3) read `date_string`: transformers leaves it to the
# template's default (a fixed day in 3.1, today in 3.2), llama.cpp sets it to today. A prompt that changes with the
# calendar cannot be reproduced, so medtune fixes it: every HF rendering (prepare, training, family detection) is
# given TEMPLATE_VARS, the Modelfile's TEMPLATE writes FIXED_DATE, and the GGUF's template starts by setting it
# (with_fixed_vars), which overrides what llama-server passes. prepare records TEMPLATE_VARS in its metadata.
FIXED_DATE = "26 Jul 2024"  # Llama 3.1's own default: its renderings are unchanged
TEMPLATE_VARS = {"date_string": FIXED_DATE}


def with_fixed_vars(template: str) -> str:
    """`template` as written into a GGUF: one that reads a variable of TEMPLATE_VARS first sets it."""
    sets = "".join(f'{{%- set {k} = "{v}" %}}' for k, v in TEMPLATE_VARS.items() if k in template)
    return sets + template if sets else template


# A served model words every user turn as training did (prepare --prompt-template with one field): the GGUF's
# template starts by rebuilding `messages` with each user turn's text between the template's text before and after
# the question. Transformers' Jinja and llama.cpp's engine both run it; medtune export checks the rendering, and
# medtune eval fidelity tells by WORDING_MARK that this GGUF is to be sent the plain question.
WORDING_MARK = "{#- medtune: user turns in the training wording -#}"


def with_user_wording(template: str, before: str, after: str) -> str:
    """`template` with every user turn (a string) rendered as before + turn + after."""
    turn = f"{{'role': 'user', 'content': {_jinja_str(before)} + m['content'] + {_jinja_str(after)}}}"
    return (
        WORDING_MARK
        + "{%- set medtune_w = namespace(turns=[]) -%}"
        + "{%- for m in messages -%}"
        + "{%- if m['role'] == 'user' and m['content'] is string -%}"
        + f"{{%- set medtune_w.turns = medtune_w.turns + [{turn}] -%}}"
        + "{%- else -%}{%- set medtune_w.turns = medtune_w.turns + [m] -%}{%- endif -%}"
        + "{%- endfor -%}"
        + "{%- set messages = medtune_w.turns %}"
        + template
    )


def words_user_turns(template: str | None) -> bool:
    """Whether a GGUF's chat template words the user turns itself (with_user_wording)."""
    return bool(template) and template.startswith(WORDING_MARK)


def _jinja_str(text: str) -> str:
    """A Jinja string literal of `text` (quotes, backslashes and control characters escaped)."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\t", "\\t")
    return "'" + escaped.replace("\r", "\\r") + "'"


_BY_ARCH = {"gemma3": GEMMA3_TEMPLATE}


def default_template(gguf_arch: str) -> str | None:
    """medtune's chat template for a GGUF of `gguf_arch` (general.architecture) that has none, or None
    where the architecture has no single prompt format to assume."""
    return _BY_ARCH.get(gguf_arch)


# Jinja statements transformers' Jinja renders and llama.cpp's own engine (common/jinja/parser.cpp) does not parse:
# llama-server --jinja (and Ollama >= 0.30 through it) would fail on every request of such a GGUF.
_LLAMA_CPP_UNPARSED = ("with", "raw", "block", "extends", "include", "import", "from", "autoescape", "do")
_STATEMENT = re.compile(r"\{%[-+]?\s*([A-Za-z_]+)")
_COMMENT = re.compile(r"\{#.*?#\}", re.S)


def llama_cpp_refusal(template: str) -> str | None:
    """Why llama.cpp's Jinja engine cannot parse `template`, or None. (Statements only: a filter or test it lacks
    fails at render time, in the branch that uses it, which medtune eval fidelity and the tests exercise.)"""
    used = sorted({m.group(1) for m in _STATEMENT.finditer(_COMMENT.sub("", template))} & set(_LLAMA_CPP_UNPARSED))
    if not used:
        return None
    return f"the chat template uses {', '.join('{% ' + u + ' %}' for u in used)}, which llama.cpp's Jinja engine cannot parse"
