"""The DeepSeek-R1-Distill-Qwen chat templates, both published versions, through prepare and export.

January 2025: the generation prompt is `<｜Assistant｜>` alone, so the model opens <think> itself; February 2025 on:
`<｜Assistant｜><think>\\n`, so the reasoning follows the prompt directly. Either way the prepared record's prompt
must end exactly where the engine's prompt ends (llama-server rendering the GGUF's own template, which is what
apply_chat_template renders; older Ollama rendering the Modelfile TEMPLATE): what the model learns to write is
what follows that prompt. The models are tiny random ones on SmolLM2's vocabulary (tests/families.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medtune.core.errors import BadInput
from medtune.data import encode
from medtune.data.prepare import prepare
from medtune.export.gotemplate import ollama_prompt
from medtune.export.modelfile import FAMILIES, detect_family, parse_modelfile

from conftest import run_cli
from families import CASES, DS_BOS, DS_EOS, make_model

R1_CASES = ("deepseek-r1-qwen", "deepseek-r1-jan-qwen")
RECORDS = [
    {
        "Question": "A 58-year-old has crushing chest pain and ST elevation in II, III, aVF. First step?",
        "Complex_CoT": "Inferior STEMI. Time is muscle: reperfusion first, aspirin on the way.",
        "Response": "Give aspirin and arrange primary PCI at once.",
    },
    {
        "Question": "Is 38.5 C a fever in an adult?",
        "Complex_CoT": "Adults: fever from 38.0 C measured orally.",
        "Response": "Yes, a mild one.",
    },
    {
        "Question": "发烧39度怎么办？",
        "Complex_CoT": "高热，先排除危险信号，再对症退热。",
        "Response": "多喝水、休息，可服对乙酰氨基酚；持续不退请就医。",
    },
]


@pytest.fixture(scope="module")
def r1(tmp_path_factory, smollm2_dir):
    """case name -> model folder, for both R1-distill template versions."""
    root = tmp_path_factory.mktemp("r1")
    return {name: make_model(root / name, Path(smollm2_dir), CASES[name]) for name in R1_CASES}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("r1data") / "o1.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS), encoding="utf-8")
    return path


def _rows(out: Path) -> list[dict]:
    return [
        json.loads(line)
        for side in ("train", "valid")
        if (out / f"{side}.jsonl").exists()
        for line in (out / f"{side}.jsonl").read_text(encoding="utf-8").splitlines()
    ]


def _expected_completion(case: str, reasoning: str, rec: dict) -> str:
    """What the model must learn to write after the engine's prompt, end token included."""
    cot, answer = rec["Complex_CoT"], rec["Response"]
    opened = case == "deepseek-r1-qwen"  # its generation prompt already holds "<think>\n"
    if reasoning == "think":
        body = f"{cot}\n</think>\n\n{answer}" if opened else f"<think>\n{cot}\n</think>\n\n{answer}"
    else:
        text = f"{cot}\n\n{answer}" if reasoning == "inline" else answer
        body = f"</think>\n\n{text}" if opened else text
    return body + DS_EOS


def test_both_templates_are_detected_and_their_modelfile_prompt_ends_where_hf_does(r1):
    from transformers import AutoTokenizer

    conv = [{"role": "user", "content": RECORDS[0]["Question"]}]
    for name, family, tail in (
        ("deepseek-r1-qwen", "deepseek-r1", "<｜Assistant｜><think>\n"),
        ("deepseek-r1-jan-qwen", "deepseek-r1-jan", "<｜Assistant｜>"),
    ):
        match = detect_family(r1[name])
        assert match.family.name == family and match.default_system is None
        hf = AutoTokenizer.from_pretrained(str(r1[name])).apply_chat_template(
            conv, tokenize=False, add_generation_prompt=True
        )
        assert hf.endswith(RECORDS[0]["Question"] + tail)
        assert DS_BOS + ollama_prompt(match.family.template, conv) == hf  # the runtime adds BOS (add_bos)
    assert FAMILIES["deepseek-r1-jan"].stops == FAMILIES["deepseek-r1"].stops


@pytest.mark.parametrize("reasoning", ["think", "drop", "inline"])
def test_prepared_completion_starts_where_the_engine_prompt_ends(r1, dataset, tmp_path, reasoning):
    """For both template versions and every --reasoning mode: the prompt of each prepared record is exactly the
    engine's prompt (HF's generation prompt = llama-server's rendering; the Modelfile TEMPLATE's, BOS added by
    the runtime), its tokens are the head of the record's tokens, and the rest is what the model must write."""
    from transformers import AutoTokenizer

    for name in R1_CASES:
        tok = AutoTokenizer.from_pretrained(str(r1[name]))
        template = detect_family(r1[name]).family.template
        res = prepare(dataset, str(r1[name]), tmp_path / f"{name}-{reasoning}", reasoning=reasoning)
        rows = _rows(tmp_path / f"{name}-{reasoning}")
        assert len(rows) == len(RECORDS), res.counts
        render = encode.Renderer(tok)
        for row in rows:
            full, prompt = encode.texts(row, render)
            src = next(r for r in RECORDS if r["Question"] in prompt)
            conv = [{"role": "user", "content": src["Question"]}]
            engine = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
            assert prompt == engine == DS_BOS + ollama_prompt(template, conv), (name, res.style)
            assert full[len(prompt) :] == _expected_completion(name, reasoning, src), (name, res.style)
            ids, offset = encode.encode(tok, row)
            assert ids[:offset] == tok(engine, add_special_tokens=False)["input_ids"]
            assert ids == tok(full, add_special_tokens=False)["input_ids"]


def test_style_that_would_move_the_prompt_is_refused(r1, dataset, tmp_path):
    """The later template's generation prompt ends in <think>\\n, which its assistant turns do not start with:
    --style completions would train on a prompt the model never gets, so it is refused before anything is
    written, naming --style text; the January template's prompt is a true head, so completions are fine."""
    out = tmp_path / "c"
    with pytest.raises(BadInput, match="generation prompt") as err:
        prepare(dataset, str(r1["deepseek-r1-qwen"]), out, reasoning="drop", style="completions")
    assert "--style text" in err.value.hint and not out.exists()
    res = prepare(dataset, str(r1["deepseek-r1-jan-qwen"]), tmp_path / "jan", reasoning="drop", style="completions")
    assert res.style == "completions" and res.template["prompt_is_prefix"] is True


def test_export_family_option(r1, tmp_path):
    """`medtune export --family NAME` writes that family's TEMPLATE (warning that it is not what the chat
    template renders); an unknown name is one error listing the known ones, before anything is written."""
    model = r1["deepseek-r1-jan-qwen"]
    help_ = run_cli("export", "--help")
    assert help_.returncode == 0 and "--family" in help_.stdout
    for name in FAMILIES:
        assert name in help_.stdout

    out, mf = tmp_path / "out", tmp_path / "x.Modelfile"
    res = run_cli(
        "export", model, "--name", "x", "--quant", "f16", "--family", "chatml", "--out", out, "--modelfile", mf
    )
    assert res.returncode == 0, res.stderr
    cmds = parse_modelfile(mf.read_text(encoding="utf-8"))
    assert [v for k, v in cmds if k == "template"] == [FAMILIES["chatml"].template]
    assert [v for k, v in cmds if k == "stop"][:2] == ["<|im_end|>", "<|im_start|>"]
    assert "'chatml' was forced" in " ".join((res.stdout + res.stderr).split())

    bad = run_cli(
        "export",
        model,
        "--name",
        "x",
        "--quant",
        "f16",
        "--family",
        "deepseek",
        "--out",
        tmp_path / "bad",
        "--modelfile",
        tmp_path / "bad.Modelfile",
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    error = next(line for line in bad.stderr.splitlines() if line.startswith("error:"))
    assert "--family" in error and "'deepseek'" in error
    for name in FAMILIES:
        assert name in error
    assert "hint:" in bad.stderr
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.Modelfile").exists()


def test_family_hints_speak_to_the_user(tmp_path):
    """A chat template no family renders like, or none at all: the hint names what the user can pass
    (--family and the known names), not a medtune source file to edit."""
    model = tmp_path / "odd"
    model.mkdir()
    odd = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": odd}))
    with pytest.raises(BadInput, match="matches no known family") as err:
        detect_family(model)
    assert "--family" in err.value.hint and "medtune/" not in err.value.hint
    for name in FAMILIES:
        assert name in err.value.hint
    with pytest.raises(BadInput, match="no chat template") as err:
        detect_family(model, template="")
    assert "--family generic" in err.value.hint and "medtune/" not in err.value.hint
