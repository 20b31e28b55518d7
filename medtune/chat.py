"""An interactive, multi-turn chat with a model, streamed to the terminal.

Reads one line per turn with `input_fn` until EOF or /exit, so it works the same from a keyboard
and from a pipe (`printf 'question\\n/exit\\n' | medtune chat`). Reasoning (<think>…</think>) is
shown dim, or hidden with hide_think; the history keeps only the answers, as reasoning models
expect.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional

from medtune.runtimes.decoding import REPEAT_LAST_N, REPEAT_PENALTY
from medtune.runtimes.mlx import GenerationResult, generate

COMMANDS = {
    "/clear": "forget the conversation (keeps the system prompt)",
    "/exit": "end the chat (also /quit, or Ctrl-D)",
    "/help": "show these commands",
}


class _Printer:
    """Prints streamed pieces: reasoning dim (or not at all), then the answer."""

    def __init__(self, console, hide_think: bool):
        self.console, self.hide_think = console, hide_think
        self.last_kind: Optional[str] = None
        self.at_line_start = True

    def __call__(self, kind: str, text: str) -> None:
        if kind == "reasoning" and self.hide_think:
            return
        if kind == "answer" and self.last_kind in (None, "reasoning"):
            text = text.lstrip()  # the blank lines after </think>, or before the first word
            if not text:
                return
            if self.last_kind == "reasoning":
                self._write("\n\n", None)
        if kind == "reasoning" and self.last_kind is None:
            text = text.lstrip()
            if not text:
                return
        self._write(text, "dim" if kind == "reasoning" else None)
        self.last_kind = kind

    def _write(self, text: str, style: Optional[str]) -> None:
        self.console.print(text, end="", style=style, markup=False, highlight=False, soft_wrap=True)
        self.at_line_start = text.endswith("\n")
        file = getattr(self.console, "file", None)
        if file is not None and hasattr(file, "flush"):
            file.flush()

    def end(self) -> None:
        if not self.at_line_start:
            self._write("\n", None)


def _stats(res: GenerationResult) -> str:
    line = f"{res.tokens} tokens, {res.tokens_per_second:.1f} tokens/s"
    if res.finish_reason == "length":
        line += " — cut off at --max-tokens"
    return line


def chat_loop(
    model,
    tokenizer,
    *,
    system: Optional[str] = None,
    temp: float = 0.7,
    top_p: float = 0.9,
    max_tokens: int = 512,
    hide_think: bool = False,
    seed: int = 0,
    repeat_penalty: float = REPEAT_PENALTY,
    repeat_last_n: int = REPEAT_LAST_N,
    input_fn: Callable[[str], str] = input,
    console=None,
    wording: Optional[str] = None,
) -> list[dict]:
    """Chat until /exit or EOF; return the conversation (system prompt included). wording: the prompt template
    training saw (medtune.data.wording.word_prompt), each message put in it."""
    from medtune.data.wording import word_prompt

    if console is None:
        from medtune.core.console import out as console
    system_msgs = [{"role": "system", "content": system}] if system else []
    history = list(system_msgs)
    prompt = ">>> " if sys.stdin.isatty() else ""  # no prompt text when reading a pipe
    turn = 0
    while True:
        try:
            line = input_fn(prompt)
        except (EOFError, KeyboardInterrupt):
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd = text.split()[0].lower()
            if cmd in ("/exit", "/quit", "/bye"):
                break
            if cmd == "/clear":
                history = list(system_msgs)
                console.print("[dim](conversation cleared)[/]")
                continue
            if cmd in ("/help", "/?"):
                for name, what in COMMANDS.items():
                    console.print(f"[bold]{name}[/]  {what}")
                continue
            console.print(f"[yellow]unknown command {cmd}[/] (try /help)")
            continue
        history.append({"role": "user", "content": word_prompt(text, wording)})
        printer = _Printer(console, hide_think)
        try:
            res = generate(
                model,
                tokenizer,
                history,
                max_tokens=max_tokens,
                temp=temp,
                top_p=top_p,
                repeat_penalty=repeat_penalty,
                repeat_last_n=repeat_last_n,
                seed=seed + turn,
                on_text=printer,
            )
        except KeyboardInterrupt:
            printer.end()
            console.print("[yellow](answer interrupted)[/]")
            history.pop()
            continue
        printer.end()
        if not res.answer and not res.reasoning:
            console.print("[dim](empty answer)[/]")
        console.print(f"[dim]{_stats(res)}[/]")
        history.append({"role": "assistant", "content": res.answer})
        turn += 1
    return history
