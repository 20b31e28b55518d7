"""medtune.runtimes.mlx, medtune.chat and their commands, on real (tiny and SmolLM2) models. No mocks."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from medtune.core.errors import BadInput
from medtune.runtimes.mlx import GenerationResult, ThinkSplitter, generate, generate_many, load, split_reasoning

from conftest import ROOT

QUESTION = "What is the normal resting heart rate for an adult? Answer in one sentence."

# Until medtune.cli.app registers the commands, run them through a two-command Typer app with the same
# error handling as medtune.cli.app.main.
HARNESS = """
import sys, typer
from medtune.cli.chat import chat, generate
from medtune.core.errors import MedtuneError
app = typer.Typer(pretty_exceptions_enable=False)
app.command()(chat)
app.command()(generate)
try:
    app()
except MedtuneError as exc:
    from medtune.core.console import error
    error(exc)
    sys.exit(exc.exit_code)
"""


def _registered() -> bool:
    from medtune.cli.app import app

    names = {c.name or c.callback.__name__ for c in app.registered_commands}
    return {"chat", "generate"} <= names


def medtune(*args, input: str | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    """`python -m medtune ARGS` with stdin from `input` (piped, no TTY)."""
    head = ["-m", "medtune"] if _registered() else ["-c", HARNESS]
    return subprocess.run(
        [sys.executable, *head, *map(str, args)],
        input=input,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"},
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load(str(tiny_llama_dir))


# --- split_reasoning -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "<think>\nweigh anemia vs. thyroid\n</think>\n\nCheck ferritin.",
            ("weigh anemia vs. thyroid", "Check ferritin."),
        ),
        ("  Check ferritin.  ", ("", "Check ferritin.")),
        ("<think>still thinking about the dose", ("still thinking about the dose", "")),  # unterminated
        ("<think></think>Answer.", ("", "Answer.")),
        ("Before <think>r</think> after", ("r", "Before  after")),
        ("", ("", "")),
    ],
)
def test_split_reasoning(text, expected):
    assert split_reasoning(text) == expected


def test_split_reasoning_when_the_prompt_opened_the_block():
    # DeepSeek-R1 templates end the generation prompt with "<think>\n": the output starts inside it.
    assert split_reasoning("r1 r2\n</think>\n\nA.", in_think=True) == ("r1 r2", "A.")
    assert split_reasoning("cut off mid-thought", in_think=True) == ("cut off mid-thought", "")


def test_streamed_split_matches_whole_text_even_with_markers_cut_across_segments():
    text = "<think>\nA vs B, lab first.\n</think>\n\nOrder a CBC. a < b, </thin is text."
    splitter, parts = ThinkSplitter(), {"reasoning": "", "answer": ""}
    for ch in text:  # one character per segment: every marker arrives in pieces
        for kind, piece in splitter.feed(ch):
            parts[kind] += piece
    for kind, piece in splitter.flush():
        parts[kind] += piece
    assert (parts["reasoning"].strip(), parts["answer"].strip()) == split_reasoning(text)
    assert parts["answer"].strip() == "Order a CBC. a < b, </thin is text."


# --- generate (library) --------------------------------------------------------------------------


def test_generate_stops_at_max_tokens_on_tiny_model(tiny):
    model, tok = tiny
    seen = []
    res = generate(model, tok, [{"role": "user", "content": "Hi"}], max_tokens=8, on_text=lambda k, t: seen.append(t))
    assert isinstance(res, GenerationResult)
    assert res.finish_reason == "length" and res.tokens == 8
    assert res.prompt_tokens > 5 and res.tokens_per_second > 0
    assert "".join(seen) == res.text  # what was streamed is what was returned
    d = res.to_dict()
    assert set(d) >= {"text", "tokens", "prompt_tokens", "finish_reason", "tokens_per_second", "reasoning", "answer"}
    json.dumps(d)


def _greedy_with_penalty(model, tok, msgs, n, penalty, last_n):
    """Reference decoding, written out: full forward each step, the llama.cpp penalty over the last
    `last_n` tokens of prompt + answer, argmax."""
    from medtune.core import runtime

    mx = runtime.mx()
    import numpy as np

    ids = tok.apply_chat_template(msgs, add_generation_prompt=True)
    out = []
    for _ in range(n):
        logits = np.array(model(mx.array([ids + out]))[0, -1].astype(mx.float32))
        for t in set((ids + out)[-last_n:]):
            logits[t] = logits[t] * penalty if logits[t] < 0 else logits[t] / penalty
        out.append(int(logits.argmax()))
    return out


def test_repeat_penalty_decodes_like_llama_cpp_and_breaks_loops(tiny):
    """A random tiny model loops under plain greedy; the penalty (Ollama's repeat_penalty/repeat_last_n,
    which our Modelfile sets) changes the tokens exactly as the reference rule says, and 1.0 is off."""
    model, tok = tiny
    msgs = [{"role": "user", "content": "Hi"}]
    plain = generate(model, tok, msgs, max_tokens=24, repeat_penalty=1.0)
    ref_plain = _greedy_with_penalty(model, tok, msgs, 24, 1.0, 64)
    assert plain.text.strip() == tok.decode(ref_plain).strip()
    pen = generate(model, tok, msgs, max_tokens=24, repeat_penalty=1.5, repeat_last_n=64)
    ref_pen = _greedy_with_penalty(model, tok, msgs, 24, 1.5, 64)
    assert pen.text.strip() == tok.decode(ref_pen).strip()
    assert ref_pen != ref_plain
    assert len(set(ref_pen)) > len(set(ref_plain))  # fewer repeats
    with pytest.raises(BadInput, match="repeat_penalty"):
        generate(model, tok, msgs, max_tokens=4, repeat_penalty=0)


def test_end_of_turn_token_is_a_stop_token(tiny):
    _, tok = tiny
    assert tok.convert_tokens_to_ids("<|im_end|>") in tok.eos_token_ids


def test_generate_answers_a_medical_question_with_smollm2(smollm2_dir):
    model, tok = load(str(smollm2_dir))
    msgs = [{"role": "user", "content": QUESTION}]
    first = generate(model, tok, msgs, max_tokens=64)
    again = generate(model, tok, msgs, max_tokens=64)
    assert first.text.strip() and first.answer == first.text.strip() and first.reasoning == ""
    assert first.finish_reason in {"stop", "length"}
    assert 0 < first.tokens <= 64
    assert first.finish_reason == "length" or first.tokens < 64  # a stop ends early, on the end token
    assert again.text == first.text and again.tokens == first.tokens  # greedy is deterministic


def test_generate_many_with_an_adapter_applies_it(tiny_llama_dir, tmp_path):
    """A fresh LoRA adapter (lora_b = 0) changes nothing; the same adapter with weights does."""
    from medtune.core import runtime

    mx = runtime.mx()
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = load(str(tiny_llama_dir))
    model.freeze()
    lora = {"rank": 4, "scale": 20.0, "dropout": 0.0}
    linear_to_lora_layers(model, 2, lora)
    weights = dict(tree_flatten(model.trainable_parameters()))
    (tmp_path / "zero").mkdir()
    (tmp_path / "zero" / "adapter_config.json").write_text(
        json.dumps({"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": lora})
    )
    mx.save_safetensors(str(tmp_path / "zero" / "adapters.safetensors"), weights)
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "adapter_config.json").write_text((tmp_path / "zero" / "adapter_config.json").read_text())
    big = {k: (mx.ones(v.shape) * 0.5 if k.endswith("lora_b") else v) for k, v in weights.items()}
    mx.save_safetensors(str(tmp_path / "big" / "adapters.safetensors"), big)

    prompts = ["Hi", "What is a fever?"]
    base = generate_many(str(tiny_llama_dir), prompts, max_tokens=6)
    zero = generate_many(str(tiny_llama_dir), prompts, adapter=tmp_path / "zero", max_tokens=6)
    tuned = generate_many(str(tiny_llama_dir), prompts, adapter=tmp_path / "big", max_tokens=6, system="Be brief.")
    assert [r.prompt for r in base] == prompts
    assert [r.text for r in zero] == [r.text for r in base]
    assert [r.text for r in tuned] != [r.text for r in base]


def test_bad_adapter_is_bad_input(tiny_llama_dir, tmp_path):
    with pytest.raises(BadInput, match="adapter folder not found"):
        load(str(tiny_llama_dir), tmp_path / "nope")
    with pytest.raises(BadInput, match="adapters.safetensors"):
        load(str(tiny_llama_dir), tmp_path)
    (tmp_path / "adapter_config.json").write_text(
        json.dumps(
            {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 4, "scale": 1.0, "dropout": 0.0}}
        )
    )
    (tmp_path / "adapters.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(BadInput, match="cannot apply the adapter"):
        load(str(tiny_llama_dir), tmp_path)
    with pytest.raises(BadInput, match="no prompts"):
        generate_many(str(tiny_llama_dir), [])


# --- chat (library) ------------------------------------------------------------------------------


def test_chat_loop_keeps_history_and_clear_keeps_the_system_prompt(tiny):
    from rich.console import Console

    from medtune.chat import chat_loop

    model, tok = tiny
    lines = iter(["First question?", "", "Second?", "/clear", "Third?"])  # then EOF

    def input_fn(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    buf = io.StringIO()
    history = chat_loop(
        model,
        tok,
        system="You are a nurse.",
        temp=0.0,
        top_p=1.0,
        max_tokens=4,
        input_fn=input_fn,
        console=Console(file=buf, width=200),
    )
    roles = [m["role"] for m in history]
    assert roles == ["system", "user", "assistant"]  # /clear dropped the first two turns, kept the system
    assert history[0]["content"] == "You are a nurse." and history[1]["content"] == "Third?"
    text = buf.getvalue()
    assert text.count("tokens/s") == 3 and "conversation cleared" in text


@pytest.mark.parametrize("hide", [False, True])
def test_chat_printer_shows_reasoning_dim_or_hides_it(hide):
    from rich.console import Console

    from medtune.chat import _Printer

    buf = io.StringIO()
    printer = _Printer(Console(file=buf, force_terminal=True, color_system="standard", width=200), hide_think=hide)
    for kind, piece in [("reasoning", "\nferritin first"), ("answer", "\n\n"), ("answer", "Order ferritin.")]:
        printer(kind, piece)
    printer.end()
    text = buf.getvalue()
    assert "Order ferritin." in text
    if hide:
        assert "ferritin first" not in text and text.startswith("Order ferritin.")
    else:
        assert "\x1b[2mferritin first" in text  # dim
        assert "\n\nOrder ferritin." in text


# --- the commands --------------------------------------------------------------------------------


def test_cli_generate_json(tiny_llama_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "What is a fever?"}) + "\n\n" + json.dumps({"prompt": "And a cough?"}) + "\n"
    )
    res = medtune("generate", tiny_llama_dir, "--prompt", "Hi", "--prompts", prompts, "--max-tokens", "5", "--json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert [r["prompt"] for r in rows] == ["Hi", "What is a fever?", "And a cough?"]
    assert all(r["finish_reason"] == "length" and r["tokens"] == 5 for r in rows)
    assert "tokens/s" in res.stderr


def test_cli_generate_without_prompt_is_bad_input(tiny_llama_dir):
    res = medtune("generate", tiny_llama_dir)
    assert res.returncode == 2
    assert "no prompt given" in res.stderr and "Traceback" not in res.stderr


def test_cli_chat_from_a_pipe(tiny_llama_dir):
    res = medtune(
        "chat",
        tiny_llama_dir,
        "--temp",
        "0",
        "--max-tokens",
        "6",
        "--system",
        "Be brief.",
        input="What is anemia?\n/clear\nWhat is a fever?\n/exit\nnever read\n",
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("tokens/s") == 2  # two answers, each followed by its speed
    assert "conversation cleared" in res.stdout
    answers = [ln for ln in res.stdout.splitlines() if ln.strip() and "tokens/s" not in ln and "cleared" not in ln]
    assert len(answers) >= 2


def test_numpy_penalty_rule_is_mlx_lms():
    """apply_repeat_penalty (used to decode GGUFs in `medtune eval`) changes logits exactly as mlx_lm's processor
    that `generate` uses: same window, each distinct token once, sign-aware."""
    import numpy as np
    from mlx_lm.sample_utils import make_logits_processors

    from medtune.core import runtime
    from medtune.runtimes.decoding import apply_repeat_penalty

    mx = runtime.mx()
    rng = np.random.default_rng(0)
    row = rng.normal(size=50).astype(np.float32)
    history = [int(t) for t in rng.integers(0, 50, size=90)]
    (proc,) = make_logits_processors(repetition_penalty=1.3, repetition_context_size=16)
    want = np.array(proc(mx.array(history), mx.array(row[None]))[0])
    got = apply_repeat_penalty(row.copy(), history, 1.3, 16)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert not np.allclose(got, row)
    assert np.array_equal(apply_repeat_penalty(row.copy(), history, 1.0, 16), row)
