"""`medtune eval`: the pure metrics on constructed answers, then a tiny end-to-end run (base, tuned, GGUF) whose
report.html is opened in headless Chromium."""

import json
import shutil
import subprocess

import pytest

from medtune.eval.evaluate import (
    accuracy,
    parse_choice,
    pick,
    read_curves,
    repetition_rate,
    stop_rate,
    summarise,
    think_state,
    words,
)
from medtune.eval.report_html import svg_curves

from conftest import SAMPLE, make_tiny_llama, run_cli


# ---- pure metrics ---------------------------------------------------------------------------------
def test_repetition_rate_flags_a_looping_answer():
    fluent = "Give N-acetylcysteine within eight hours of the overdose, guided by the treatment nomogram."
    loop = "the patient should rest. " * 20
    assert repetition_rate(fluent) == 0.0
    assert repetition_rate(loop) > 0.8
    assert repetition_rate("too short") == 0.0
    # Chinese: every character is a word, so a repeated phrase is caught too
    assert words("急性心肌梗死") == list("急性心肌梗死")
    assert repetition_rate("立即溶栓治疗。" * 10) > 0.8
    assert repetition_rate("患者应立即行头颅CT检查以排除出血") == 0.0


def test_think_state_on_constructed_blocks():
    assert think_state("<think>ST elevation inferior.</think>\n\nInferior STEMI: PCI.") == "ok"
    assert think_state("Inferior STEMI.") == "absent"
    assert think_state("<think>reasoning that never ends") == "unclosed"
    assert think_state("<think>a</think>b<think>c</think>d") == "repeated"
    assert think_state("<think>a</think>\n  ") == "empty_answer"
    assert think_state("answer</think>more") == "unopened"
    assert think_state("</think>x<think>") == "unopened"  # closed before it was opened
    assert think_state("b</think> answer", in_think=True) == "ok"  # the template opened the block
    assert think_state("</think>a <think>", in_think=False) == "unopened"


def test_stop_rate_and_summary_count_a_missing_end_token():
    assert stop_rate(["stop", "length", "stop", "stop"]) == 0.75
    assert stop_rate([]) is None
    answers = [
        {"tokens": 10, "finish_reason": "stop", "think": "ok", "repetition": 0.0},
        {"tokens": 30, "finish_reason": "length", "think": "unclosed", "repetition": 0.5},
        {"tokens": 20, "finish_reason": "stop", "think": "absent", "repetition": 0.1},
    ]
    s = summarise(answers)
    assert s["stop_rate"] == pytest.approx(2 / 3)
    assert s["mean_tokens"] == 20
    assert s["think_present"] == pytest.approx(2 / 3)
    assert s["think_ok"] == 0.5
    assert s["repetition_rate"] == pytest.approx(0.2)
    assert summarise([]) == {"answers": 0}


def test_multiple_choice_parsing_and_scoring():
    c = parse_choice({"question": "Antidote?", "options": {"A": "Naloxone", "B": "Acetylcysteine"}, "answer": "B"})
    assert c.answer == 1 and c.options[1] == ("B", "Acetylcysteine")
    assert parse_choice({"question": "q", "options": ["x", "y", "z"], "answer": "z"}).answer == 2
    assert parse_choice({"question": "q", "options": ["x", "y"], "answer": 0}).answer == 0
    assert parse_choice({"prompt": "q", "completion": "a"}) is None
    from medtune.core.errors import BadInput

    with pytest.raises(BadInput):
        parse_choice({"question": "q", "options": ["x"], "answer": "D"})
    assert pick([-2.0, -0.5, -0.5]) == 1
    assert accuracy([c, c], [1, 0]) == 0.5


def test_curves_and_svg(tmp_path):
    m = tmp_path / "metrics.jsonl"
    m.write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [
                {"step": 0, "val_loss": 3.0},
                {"step": 1, "train_loss": 2.9},
                {"step": 2, "train_loss": 2.5, "x": 1},
                {"step": 2, "val_loss": 2.6},
            ]
        )
        + "{cut"
    )
    c = read_curves(m)
    assert c["train"] == [[1, 2.9], [2, 2.5]] and c["val"] == [[0, 3.0], [2, 2.6]]
    svg = svg_curves(c)
    assert svg.startswith("<svg") and svg.count("<polyline") == 2
    assert svg_curves({}) == ""


# ---- end to end on tiny models --------------------------------------------------------------------
@pytest.fixture(scope="module")
def evalset(tmp_path_factory, tiny_llama_dir, smollm2_dir):
    from medtune.data.prepare import prepare
    from medtune.export import export

    root = tmp_path_factory.mktemp("eval")
    tuned = make_tiny_llama(root / "tuned", smollm2_dir, seed=1)
    prepare(
        SAMPLE, str(tiny_llama_dir), root / "data", max_seq_length=1024, limit=12, valid_ratio=0.25, token_stats=False
    )
    res = export(tuned, root / "gguf", "tuned", quants=("f32",), modelfile_path=root / "tuned.Modelfile")
    probes = root / "probes.jsonl"
    probes.write_text(
        '{"id": "p1", "prompt": "What is the antidote for paracetamol overdose?"}\n'
        '{"id": "p2", "prompt": "急性胰腺炎的初始治疗是什么？"}\n',
        encoding="utf-8",
    )
    choices = root / "mc.jsonl"
    choices.write_text(
        json.dumps({"question": "Antidote for paracetamol?", "options": {"A": "Naloxone", "B": "NAC"}, "answer": "B"})
        + "\n",
        encoding="utf-8",
    )
    metrics = root / "metrics.jsonl"
    metrics.write_text(
        '{"step": 0, "val_loss": 10.9}\n{"step": 1, "train_loss": 10.8}\n{"step": 2, "train_loss": 10.1}\n'
        '{"step": 2, "val_loss": 10.3}\n',
        encoding="utf-8",
    )
    return {
        "root": root,
        "tuned": tuned,
        "base": tiny_llama_dir,
        "data": root / "data",
        "gguf": res.gguf_paths["f32"],
        "probes": probes,
        "choices": choices,
        "metrics": metrics,
    }


@pytest.fixture(scope="module")
def report(evalset):
    out = evalset["root"] / "report"
    r = run_cli(
        "eval",
        evalset["tuned"],
        "--data",
        evalset["data"],
        "--base",
        evalset["base"],
        "--gguf",
        evalset["gguf"],
        "--out",
        out,
        "--probes",
        evalset["probes"],
        "--choices",
        evalset["choices"],
        "--metrics",
        evalset["metrics"],
        "--max-tokens",
        6,
        "--limit",
        1,
        "--threads",
        1,
        "--gguf-loss",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("report.html")
    return {"out": out, "json": json.loads((out / "report.json").read_text(encoding="utf-8"))}


def test_eval_report_has_every_model_and_metric(report, evalset):
    rep = report["json"]
    labels = [m["label"] for m in rep["models"]]
    assert labels == ["base", "tuned", evalset["gguf"].name]
    base, tuned, gguf = rep["models"]
    for m in (base, tuned):
        assert m["metrics"]["val_loss"] > 0 and m["metrics"]["val_ppl"] > 1
        assert m["metrics"]["mc_questions"] == 1 and m["metrics"]["mc_accuracy"] in (0.0, 1.0)
    assert base["metrics"]["val_loss"] != tuned["metrics"]["val_loss"]  # two different models
    for m in rep["models"]:
        assert m["metrics"]["answers"] == 3  # 2 probes + 1 held-out question
        assert 0 <= m["metrics"]["stop_rate"] <= 1 and m["metrics"]["mean_tokens"] <= 6
    # F32 GGUF, same weights: llama.cpp's validation loss is the tuned MLX model's
    assert gguf["metrics"]["val_loss"] == pytest.approx(tuned["metrics"]["val_loss"], rel=1e-4)
    assert gguf["metrics"]["val_tokens"] == tuned["metrics"]["val_tokens"]
    assert gguf["mc_picks"] == tuned["mc_picks"]
    assert gguf["fidelity"]["file_type"] == "F32" and gguf["fidelity"]["summary"]["tokens_equal"] == 2
    assert len(rep["questions"]) == 3
    for q in rep["questions"]:
        assert set(q["answers"]) == set(labels)
    # greedy with the same repeat-penalty rule, same weights, F32: the GGUF answers exactly like the tuned MLX
    # model, every question (the side-by-side view compares files, not samplers)
    for q in rep["questions"]:
        a, b = q["answers"][gguf["label"]], q["answers"]["tuned"]
        assert (a["text"], a["tokens"], a["finish_reason"]) == (b["text"], b["tokens"], b["finish_reason"])
    assert rep["curves"]["val"] == [[0, 10.9], [2, 10.3]]
    md = (report["out"] / "report.md").read_text(encoding="utf-8")
    assert "| base | mlx |" in md and "急性胰腺炎" in md


def test_gguf_answers_like_mlx_with_the_same_penalty_rule(evalset):
    """Without --gguf-loss (llama.cpp keeps no per-position logits) the GGUF column still decodes with the MLX
    column's rule: the same text, token count and finish on an F32 file of the same weights, and not merely
    on the first tokens (a random tiny model loops, so the penalty matters at every step)."""
    from medtune.eval.evaluate import GGUFRunner, MLXRunner

    mlx = MLXRunner(str(evalset["tuned"]))
    gguf = GGUFRunner(evalset["gguf"], n_threads=1, tokenizer=mlx.tokenizer, markers=mlx.markers, logits_all=False)
    try:
        for prompt in ("What is the antidote for paracetamol overdose?", "急性胰腺炎的初始治疗是什么？"):
            msgs = [{"role": "user", "content": prompt}]
            want, got = mlx.answer(msgs, 20), gguf.answer(msgs, 20)
            assert want["tokens"] == 20 and want["text"]
            assert (got["text"], got["tokens"], got["finish_reason"]) == (
                want["text"],
                want["tokens"],
                want["finish_reason"],
            )
    finally:
        gguf.close()


def _browser():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_report_html_renders_in_headless_chromium(report):
    browser = _browser()
    if browser is None:
        pytest.skip("no Chromium/Chrome on PATH (apt-get install chromium)")
    html = report["out"] / "report.html"
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", html.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    dom = proc.stdout
    assert proc.returncode == 0 and "<table" in dom, proc.stderr[-2000:]
    assert 'id="metrics"' in dom and 'id="answers"' in dom and "<svg" in dom
    assert "What is the antidote for paracetamol overdose?" in dom and "急性胰腺炎" in dom
    rep = report["json"]
    for m in rep["models"]:
        assert f"<th>{m['label']}</th>" in dom
    from html import escape

    answer = rep["questions"][0]["answers"]["tuned"]["answer"]
    if answer:
        assert escape(answer, quote=False) in dom
