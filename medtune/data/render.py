"""How the model's chat template renders a training record, and the checks that keep it honest.

The template, not the record, closes the assistant turn. We find out which token it closes the
turn with, and check on every record that (a) the prompt's tokens are a true prefix of the full
sequence, (b) the end-of-turn token appears exactly once in the assistant part, at its end, and
(c) the reasoning survived rendering (some templates delete <think> blocks from assistant turns).
We also find out whether the generation prompt (what an engine sends before the model's reply) is
where the template's assistant turns start: the later DeepSeek-R1 templates end it with <think>\n,
which their assistant turns do not hold, so records must be written from the generation prompt.
The per-record checks live in medtune.data.prepare; this module inspects the template itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from medtune.core.errors import BadInput
from medtune.export.chat_templates import TEMPLATE_VARS

PROBE_ANSWER = "medtune-probe-answer-7c1f"
PROBE_REASONING = "medtune-probe-reasoning-42ab"


@dataclass
class TemplateInfo:
    end_token: str
    end_token_id: int
    eos_token: str | None
    strips_think: bool
    think_open: str = "<think>"
    think_close: str = "</think>"
    prompt_is_prefix: bool = True  # the generation prompt is the start of a rendered assistant turn

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def load_tokenizer(model_dir):
    from transformers import AutoTokenizer

    from medtune.core import safety

    safety.check_links(model_dir)
    safety.check_remote_code(model_dir)  # before transformers reads tokenizer_config.json's auto_map
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=safety.trust_remote_code())
    except Exception as exc:  # transformers raises OSError/ValueError/... for broken folders
        from pathlib import Path

        from medtune.models.modelcheck import TOKENIZER_FILES

        if not any((Path(model_dir) / name).is_file() for name in TOKENIZER_FILES):
            raise BadInput(
                f"no tokenizer in the model folder (none of {', '.join(TOKENIZER_FILES[:2])})",
                where=str(model_dir),
                hint="copy the base model's tokenizer files into the folder",
            ) from exc
        raise BadInput(
            f"cannot load the tokenizer: {str(exc).splitlines()[0]}",
            where=str(model_dir),
            hint="the model folder needs tokenizer.json or tokenizer.model and tokenizer_config.json",
        ) from exc


def chat(tok, messages, **kw):
    """apply_chat_template with medtune's fixed template variables (TEMPLATE_VARS: Llama 3.x's date), as encode renders."""
    return tok.apply_chat_template(messages, return_dict=False, **{**TEMPLATE_VARS, **kw})


def _special_strings(tok) -> list[str]:
    specials = set(tok.all_special_tokens)
    for added in getattr(tok, "added_tokens_decoder", {}).values():
        if added.special:
            specials.add(added.content)
    return sorted(specials, key=len, reverse=True)


def inspect_template(tok, model_dir="") -> TemplateInfo:
    if not getattr(tok, "chat_template", None):
        raise BadInput(
            "the model's tokenizer has no chat template",
            where=str(model_dir),
            hint="use an instruct/chat model, or add a chat_template to tokenizer_config.json",
        )
    msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": PROBE_ANSWER}]
    text = chat(tok, msgs, tokenize=False)
    if PROBE_ANSWER not in text:
        raise BadInput(
            "the chat template drops the assistant's answer",
            where=str(model_dir),
            hint="this template cannot be used for training",
        )
    tail = text[text.rindex(PROBE_ANSWER) + len(PROBE_ANSWER) :]
    end = next((s for s in _special_strings(tok) if tail.lstrip().startswith(s)), None)
    if end is None:
        raise BadInput(
            f"the chat template does not close the assistant turn with a special token (renders {tail!r})",
            where=str(model_dir),
            hint="the tuned model would never learn to stop; fix the chat template",
        )
    think = [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": f"<think>\n{PROBE_REASONING}\n</think>\n\n{PROBE_ANSWER}"},
    ]
    strips = PROBE_REASONING not in chat(tok, think, tokenize=False)
    prefix = text.startswith(chat(tok, msgs[:1], tokenize=False, add_generation_prompt=True))
    open_, close = think_markers(tok)
    return TemplateInfo(
        end_token=end,
        end_token_id=tok.convert_tokens_to_ids(end),
        eos_token=tok.eos_token,
        strips_think=strips,
        think_open=open_,
        think_close=close,
        prompt_is_prefix=prefix,
    )


def think_markers(tok) -> tuple[str, str]:
    """The model's own reasoning markers when its vocabulary has them as tokens, else <think></think>."""
    vocab = tok.get_vocab()
    for open_, close in (
        ("<think>", "</think>"),
        ("<|begin_of_thought|>", "<|end_of_thought|>"),
        ("<reasoning>", "</reasoning>"),
    ):
        if open_ in vocab and close in vocab:
            return open_, close
    return "<think>", "</think>"
