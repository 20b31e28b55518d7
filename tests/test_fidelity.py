"""`medtune eval fidelity`: an exported GGUF (llama.cpp) against the MLX model, on a tiny random Llama
with SmolLM2's real tokenizer and chat template. An F32 export must agree everywhere; a copy with one
tensor scaled must be reported as divergent, with exit code 1."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import SAMPLE, run_cli

pytest.importorskip("llama_cpp")

PROMPTS = [
    "What is the antidote for paracetamol overdose?",
    "患者，男，45岁，饮酒后上腹部剧痛，向背部放射。最可能的诊断是什么？",
    "List 3 causes of hyperkalaemia.",
]


@pytest.fixture(scope="module")
def f32(tmp_path_factory, tiny_llama_dir):
    from medtune.export import export

    root = tmp_path_factory.mktemp("fidelity")
    res = export(tiny_llama_dir, root, "tiny", quants=("f32",), modelfile_path=root / "tiny.Modelfile")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in PROMPTS), encoding="utf-8")
    return {"gguf": res.gguf_paths["f32"], "prompts": prompts, "root": root}


@pytest.mark.parametrize("runtime, templates", [("auto", 3), ("llama-server", 3), ("llama-cpp-python", 0)])
def test_f32_export_matches_mlx(f32, tiny_llama_dir, runtime, templates):
    res = run_cli(
        "eval",
        "fidelity",
        tiny_llama_dir,
        f32["gguf"],
        "--prompts",
        f32["prompts"],
        "--tokens",
        "16",
        "--runtime",
        runtime,
        "--json",
    )
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["runtime"] == ("llama-server" if runtime == "auto" else runtime)  # auto: the server, when found
    assert report["passed"] is True and report["file_type"] == "F32" and report["judged"] is True
    assert report["summary"] | {"max_logit_diff": 0} == {
        "prompts": 3,
        "tokens_equal": 3,
        "continuations_equal": 3,
        "near_ties": 0,
        "mlx_stopped": 0,
        "gguf_stopped": 0,
        "failed": 0,
        "max_logit_diff": 0,
        "templates": templates,
        "templates_equal": templates,
    }
    assert report["summary"]["max_logit_diff"] < 0.01
    assert report["gguf_adds_bos"] is False  # SmolLM2's template has no BOS, and the GGUF adds none
    for p in report["prompts"]:
        assert p["ok"] and p["divergence"] is None and len(p["mlx_tokens"]) == 16 and p["mlx_text"] == p["gguf_text"]


def test_a_corrupted_gguf_is_reported_divergent(f32, tiny_llama_dir):
    import gguf

    bad = f32["root"] / "tiny-f32-corrupted.gguf"
    shutil.copy(f32["gguf"], bad)
    reader = gguf.GGUFReader(str(bad), "r+")
    tensor = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    tensor.data[...] *= 4.0  # one MLP's output four times too strong
    reader.data.flush()
    del reader, tensor

    from medtune.eval.fidelity import fidelity

    report = fidelity(tiny_llama_dir, bad, PROMPTS, 16)
    summary = report.summary
    assert report.passed is False and summary["tokens_equal"] == 3
    assert summary["continuations_equal"] < 3 and summary["max_logit_diff"] > 0.1
    broken = [p for p in report.prompts if not p.ok]
    assert broken and all(p.near_tie is False and p.top2_margin > report.tie_tolerance for p in broken)
    assert all("continuations part at token" in p.reason for p in broken)

    res = run_cli(
        "eval", "fidelity", tiny_llama_dir, bad, "--prompts", f32["prompts"], "--tokens", "16", env={"COLUMNS": "120"}
    )
    assert res.returncode == 1, res.stderr
    assert f"{len(broken)} of 3 prompt(s) do not match" in res.stderr and "differs @" in res.stderr


def test_verdicts_near_tie_and_end_tokens():
    """The judging rules on hand-made logits: a flip inside the tolerance is a near-tie; a runtime that
    does not stop on the end token the other stops on is a failure whatever the margins."""
    from medtune.eval.fidelity import _compare, _rows_run

    v = 8
    rows = [np.zeros(v, np.float32) for _ in range(3)]
    mlx_rows = [r.copy() for r in rows]
    gguf_rows = [r.copy() for r in rows]
    mlx_rows[1][[3, 4]] = [1.0, 0.99]  # MLX: 3 by 0.01
    gguf_rows[1][[3, 4]] = [0.995, 1.0]  # llama.cpp: 4 by 0.005
    args = dict(stops={7}, decode=lambda ids: " ".join(map(str, ids)))

    def run(tokens, grows):
        return _rows_run(tokens, grows, mlx_rows[0], lambda t: t == 7)

    tie = _compare("p", [1, 2], [1, 2], ([5, 3, 6], mlx_rows), run([5, 4, 6], gguf_rows), tolerance=0.05, **args)
    assert tie.ok and tie.near_tie and tie.divergence == 1 and abs(tie.top2_margin - 0.01) < 1e-6
    strict = _compare("p", [1, 2], [1, 2], ([5, 3, 6], mlx_rows), run([5, 4, 6], gguf_rows), tolerance=0.001, **args)
    assert not strict.ok and strict.near_tie is False
    no_stop = _compare("p", [1, 2], [1, 2], ([5, 7], mlx_rows[:2]), run([5, 7, 6], gguf_rows), tolerance=0.05, **args)
    assert not no_stop.ok and no_stop.mlx_stopped and not no_stop.gguf_stopped and "MLX stops" in no_stop.reason
    quantized = _compare("p", [1, 2], [1, 2], ([5, 3, 6], mlx_rows), run([5, 4, 6], gguf_rows), tolerance=None, **args)
    assert quantized.ok and not quantized.continuation_equal
    bos = _compare("p", [1, 2], [0, 1, 2], ([5], rows[:1]), run([5], rows[:1]), tolerance=0.05, **args)
    assert not bos.ok and bos.first_token_mismatch == 0 and "token ids differ" in bos.reason


def test_default_prompts_are_the_sample_questions(tmp_path):
    from medtune.core.errors import BadInput
    from medtune.eval.fidelity import read_prompts

    questions = [
        json.loads(line)["Question"] for line in SAMPLE.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    assert read_prompts() == questions and read_prompts(limit=2) == questions[:2]
    txt = tmp_path / "p.txt"
    txt.write_text("one\n\ntwo\n")
    assert read_prompts(txt) == ["one", "two"]
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"answer": "no prompt"}\n')
    with pytest.raises(BadInput, match="no prompt text") as err:
        read_prompts(bad)
    assert err.value.where == f"{bad}:2"
