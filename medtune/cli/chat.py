"""`medtune chat` and `medtune generate`: talk to a model (base, fused, or base + adapter).

Registered in medtune.cli.app with `app.command()(chat)` and `app.command()(generate)`. Nothing heavy is
imported here at module level: `medtune --help` must stay fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from medtune.cli.options import (
    DEFAULT_MODEL,
    AllowPickleOpt,
    JsonOpt,
    ModelArg,
    ModelFlag,
    TrustRemoteCodeOpt,
    emit_json,
    pick_model,
    untrusted,
)
from medtune.core.errors import BadInput
from medtune.runtimes.decoding import REPEAT_LAST_N, REPEAT_PENALTY  # light: numpy only, inside its functions

AdapterOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--adapter",
        "-a",
        metavar="DIR",
        help="LoRA adapter folder from `medtune train` (adapter_config.json + adapters.safetensors).",
    ),
]
SystemOpt = Annotated[Optional[str], typer.Option("--system", "-s", metavar="TEXT", help="System prompt.")]
MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", help="Most tokens per answer.")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Nucleus sampling (1 = off).")]
RepeatPenaltyOpt = Annotated[
    float,
    typer.Option(
        "--repeat-penalty",
        help="Penalise tokens seen in the last --repeat-last-n (1 = off); the Modelfile sets the same for Ollama.",
    ),
]
RepeatLastNOpt = Annotated[
    int, typer.Option("--repeat-last-n", help="How many recent tokens the penalty looks at (0 = off).")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed for sampling.")]


def chat(
    model: ModelArg = None,
    model_flag: ModelFlag = None,
    adapter: AdapterOpt = None,
    system: SystemOpt = None,
    temp: Annotated[float, typer.Option("--temp", help="Sampling temperature (0 = greedy).")] = 0.7,
    top_p: TopPOpt = 0.9,
    max_tokens: MaxTokensOpt = 512,
    repeat_penalty: RepeatPenaltyOpt = REPEAT_PENALTY,
    repeat_last_n: RepeatLastNOpt = REPEAT_LAST_N,
    hide_think: Annotated[bool, typer.Option("--hide-think", help="Do not show the <think> reasoning.")] = False,
    seed: SeedOpt = 0,
    trust_remote_code: TrustRemoteCodeOpt = False,
    allow_pickle: AllowPickleOpt = False,
):
    """Chat with a model in the terminal (or from a pipe, one message per line). /clear, /exit."""
    model = pick_model(model, model_flag, DEFAULT_MODEL)
    from medtune.chat import chat_loop
    from medtune.core.console import console
    from medtune.runtimes.mlx import load

    console.print(f"[dim]loading {model}" + (f" + {adapter}" if adapter else "") + " …[/]")
    with untrusted(trust_remote_code, allow_pickle):
        net, tokenizer = load(model, adapter)
    system, template = _training_wording(model, adapter, system)
    console.print("[dim]ready. /clear resets the conversation, /exit (or Ctrl-D) ends it.[/]")
    chat_loop(
        net,
        tokenizer,
        system=system,
        wording=template,
        temp=temp,
        top_p=top_p,
        max_tokens=max_tokens,
        hide_think=hide_think,
        seed=seed,
        repeat_penalty=repeat_penalty,
        repeat_last_n=repeat_last_n,
    )


def read_prompts(path: Path) -> list[str]:
    """One prompt per line, or JSON Lines with a "prompt" field (.jsonl)."""
    if not path.is_file():
        raise BadInput(f"prompts file not found: {path}", hint='one prompt per line, or .jsonl with a "prompt" field')
    if path.suffix.lower() != ".jsonl":
        with open(path, encoding="utf-8") as fh:
            return [line.strip() for line in fh if line.strip()]
    from medtune.core.jsonl import iter_jsonl

    hint = 'each line must be a JSON object with a "prompt" field'
    prompts = []
    for n, row in iter_jsonl(path, hint):
        value = row.get("prompt")
        if not isinstance(value, str) or not value.strip():
            raise BadInput('no "prompt" text in this record', where=f"{path}:{n}", hint=hint)
        prompts.append(value.strip())
    return prompts


def generate(
    model: ModelArg = None,
    model_flag: ModelFlag = None,
    adapter: AdapterOpt = None,
    prompt: Annotated[
        Optional[List[str]], typer.Option("--prompt", "-p", metavar="TEXT", help="A prompt; repeat for several.")
    ] = None,
    prompts: Annotated[
        Optional[Path],
        typer.Option("--prompts", metavar="FILE", help='File: one prompt per line, or .jsonl with a "prompt" field.'),
    ] = None,
    system: SystemOpt = None,
    temp: Annotated[float, typer.Option("--temp", help="Sampling temperature (0 = greedy).")] = 0.0,
    top_p: TopPOpt = 1.0,
    max_tokens: MaxTokensOpt = 256,
    repeat_penalty: RepeatPenaltyOpt = REPEAT_PENALTY,
    repeat_last_n: RepeatLastNOpt = REPEAT_LAST_N,
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    allow_pickle: AllowPickleOpt = False,
):
    """Answer prompts with a model, each on its own; answers on stdout (or --json)."""
    model = pick_model(model, model_flag, DEFAULT_MODEL)
    from medtune.core.console import console, out, warn
    from medtune.runtimes.mlx import generate_many

    todo = list(prompt or []) + (read_prompts(prompts) if prompts else [])
    todo = [p for p in todo if p.strip()]
    if not todo:
        raise BadInput("no prompt given", hint="pass --prompt TEXT (repeatable) or --prompts FILE")

    def show(i: int, res) -> None:
        if not as_json:
            if len(todo) > 1:
                console.print(f"[bold]## {i + 1}/{len(todo)}:[/] ", end="")
                console.print(res.prompt, markup=False, highlight=False)
            if res.reasoning:
                console.print(res.reasoning, style="dim", markup=False, highlight=False, soft_wrap=True)
            out.print(res.answer, markup=False, highlight=False)
            if len(todo) > 1 and i + 1 < len(todo):
                out.print()
        console.print(f"[dim]{res.tokens} tokens, {res.tokens_per_second:.1f} tokens/s, finish {res.finish_reason}[/]")
        if res.finish_reason == "length":
            warn(f"answer {i + 1} was cut off at --max-tokens {max_tokens}")

    console.print(f"[dim]loading {model}" + (f" + {adapter}" if adapter else "") + f", {len(todo)} prompt(s) …[/]")
    system, template = _training_wording(model, adapter, system)
    from medtune.data.wording import word_prompt

    with untrusted(trust_remote_code, allow_pickle):
        results = generate_many(
            model,
            [word_prompt(p, template) for p in todo],
            adapter=adapter,
            system=system,
            on_result=show,
            max_tokens=max_tokens,
            temp=temp,
            top_p=top_p,
            seed=seed,
            repeat_penalty=repeat_penalty,
            repeat_last_n=repeat_last_n,
        )
    if as_json:
        emit_json([r.to_dict() for r in results])


def _training_wording(model, adapter, system):
    """(the system prompt, the prompt template) to ask in: --system, else the one training saw (the adapter's or the
    fused folder's manifest); said on the console when it comes from training."""
    from medtune.core.console import console
    from medtune.data.wording import served, unescape

    words = served(model, adapter)
    if system is None and words.get("system"):
        console.print(
            f"system prompt from training: {words['system'][:80]}", style="dim", markup=False, highlight=False
        )
    if words.get("prompt_template"):
        shown = repr(words["prompt_template"])
        console.print(f"prompt wording from training: {shown}", style="dim", markup=False, highlight=False)
    return (words.get("system") if system is None else unescape(system)), words.get("prompt_template")
