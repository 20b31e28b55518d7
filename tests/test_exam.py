"""Benchmarks run on real models (medtune.eval.exam through `medtune eval --bench`): a tiny model trained to answer
"B" to every question must score exactly the share of questions whose answer is B, on MLX and in its GGUFs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medtune.eval import bench, exam

from conftest import make_tiny_llama, run_cli

ROOT = Path(__file__).resolve().parents[1]
MEDQA = ROOT / "data" / "sample" / "bench" / "medqa.jsonl"
CMEXAM = ROOT / "data" / "sample" / "bench" / "cmexam.csv"


def _share_b(path: Path, name: str) -> tuple[int, int]:
    items, _ = bench.load(name, file=path, split=bench.BENCHMARKS[name].test_split)
    return sum(i.options[i.answer][0] == "B" for i in items), len(items)


@pytest.fixture(scope="module")
def says_b(tmp_path_factory, smollm2_dir):
    """A tiny random Llama (SmolLM2's tokenizer) trained with medtune to answer "B", fused, exported F16 + Q8_0."""
    from medtune.data.prepare import prepare
    from medtune.export import export
    from medtune.fuse import fuse
    from medtune.train import TrainOptions, train

    root = tmp_path_factory.mktemp("exam")
    base = make_tiny_llama(root / "base", smollm2_dir, seed=3)
    records = []
    for name, path in (("medqa", MEDQA), ("cmexam", CMEXAM)):
        items, _ = bench.load(name, file=path, split=bench.BENCHMARKS[name].test_split)
        records += [{"prompt": exam_prompt(name, i), "completion": "B"} for i in items]
    src = root / "says_b.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records * 3), encoding="utf-8")
    prepare(src, str(base), root / "data", max_seq_length=512, valid_ratio=0.1, token_stats=False)
    train(
        str(base),
        root / "data",
        root / "adapter",
        TrainOptions(iters=120, batch_size=4, num_layers=-1, rank=8, lr=2e-3, eval_every=1000, seed=0),
    )
    fuse(str(base), root / "adapter", root / "fused")
    res = export(root / "fused", root / "gguf", "says-b", quants=("f16", "q8_0"), modelfile_path=root / "b.Modelfile")
    return {"root": root, "base": base, "fused": root / "fused", "ggufs": res.gguf_paths}


def exam_prompt(name: str, item) -> str:
    """The user turn the benchmark asks (zero-shot), so that training sees the exam's own wording."""
    return bench.mc_messages(item, [], bench.BENCHMARKS[name])[-1]["content"]


@pytest.fixture(scope="module")
def bench_report(says_b):
    out = says_b["root"] / "report"
    r = run_cli(
        "eval",
        says_b["fused"],
        "--base",
        says_b["base"],
        "--gguf",
        says_b["ggufs"]["f16"],
        "--gguf",
        says_b["ggufs"]["q8_0"],
        "--bench",
        "medqa,cmexam",
        "--bench-file",
        f"medqa={MEDQA},cmexam={CMEXAM}",
        "--probe-limit",
        1,
        "--max-tokens",
        4,
        "--threads",
        1,
        "--out",
        out,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "report.json").read_text(encoding="utf-8")), out


def test_trained_to_answer_b_scores_the_share_of_b(bench_report):
    rep, _ = bench_report
    for name, path in (("medqa", MEDQA), ("cmexam", CMEXAM)):
        b, n = _share_b(path, name)
        assert 0 < b < n  # the sample files mix the answers, so "always B" is neither 0 nor 100%
        cols = rep["benchmarks"][name]
        assert set(cols) == {"base", "tuned", "says-b-f16.gguf", "says-b-q8_0.gguf"}
        for label in ("tuned", "says-b-f16.gguf", "says-b-q8_0.gguf"):
            assert cols[label]["overall"] == {"accuracy": b / n, "correct": b, "questions": n}, label
            assert sum(s["questions"] for s in cols[label]["subjects"].values()) == n
        picks = [it["picks"] for it in rep["benchmark_items"][name]]
        assert all(p["tuned"] == "B" == p["says-b-f16.gguf"] == p["says-b-q8_0.gguf"] for p in picks)
        assert rep["benchmark_info"][name]["scoring"] == "loglik"


def test_bench_report_renders_tables_and_chart(bench_report):
    rep, out = bench_report
    html = (out / "report.html").read_text(encoding="utf-8")
    md = (out / "report.md").read_text(encoding="utf-8")
    for name in ("medqa", "cmexam"):
        assert f'id="bench-{name}"' in html and f"## Benchmark: {name}" in md
    assert html.count('aria-label="medqa accuracy"') == 1 and "<rect x=" in html
    b, n = _share_b(MEDQA, "medqa")
    assert f"{b / n:.1%} ({b}/{n})" in md


def test_generate_scoring_parses_the_answer(says_b):
    """Generate-then-parse on the tuned model: it says "B", the parser reads it, the score is the share of B."""
    from medtune.eval.evaluate import MLXRunner

    runner = MLXRunner(str(says_b["fused"]))
    (s,) = exam.read_sets(["medqa"], {"medqa": MEDQA})
    res = exam.run_set(runner, s, "generate", max_tokens=4)
    assert sum(p == "B" for p in res["picks"].values()) >= 6  # the tiny model mostly says just "B"
    for item in s.items:  # each pick is what the parser reads in that answer; an unreadable one is listed, and wrong
        letter = bench.parse_letter(res["answers"][item.id], item.letters)
        assert res["picks"][item.id] == letter and (letter is None) == (item.id in res["unparsed"])
    correct = sum(res["picks"][i.id] == i.options[i.answer][0] for i in s.items)
    assert res["overall"] == {"accuracy": correct / len(s.items), "correct": correct, "questions": len(s.items)}


def test_bench_flags_refuse_bad_input(tmp_path):
    with pytest.raises(Exception, match="unknown benchmark 'medqq'"):
        exam.bench_names("medqa,medqq")
    with pytest.raises(Exception, match="NAME=PATH"):
        exam.parse_files("medqa=a.jsonl,other=b.csv", ["medqa"])
    assert exam.parse_files("x.jsonl", ["medqa"]) == {"medqa": Path("x.jsonl")}
    with pytest.raises(Exception, match="--scoring"):
        exam.check_scoring("vote")


def test_bench_cli_error_is_one_line(tmp_path, tiny_llama_dir):
    bad = tmp_path / "medqa.jsonl"
    bad.write_text('{"question": "q?", "options": {"A": "x", "B": "y"}}\n', encoding="utf-8")
    r = run_cli("eval", tiny_llama_dir, "--bench", "medqa", "--bench-file", bad, "--out", tmp_path / "o")
    assert r.returncode != 0
    assert f"{bad}:1" in r.stderr and "answer" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o" / "report.json").exists()


def _card_results(folder: Path) -> dict:
    import re

    text = (folder / "README.md").read_text(encoding="utf-8")
    return json.loads(re.search(r"<!-- medtune-results: (\{.*?\}) -->", text).group(1)), text


def test_fuse_export_and_eval_write_the_model_card(says_b, bench_report):
    """fuse and export wrote README.md; eval rewrote both cards (the fused folder's, the GGUFs' folder's) with
    report.json's exact numbers, and their front matter is valid YAML."""
    import yaml

    rep, _ = bench_report
    assert rep["cards"] == [str(says_b["fused"] / "README.md"), str(says_b["ggufs"]["f16"].parent / "README.md")]
    tuned = next(m for m in rep["models"] if m["label"] == "tuned")["metrics"]
    for folder, library in ((says_b["fused"], "mlx"), (says_b["ggufs"]["f16"].parent, "gguf")):
        raw, text = _card_results(folder)
        meta = yaml.safe_load(text.split("---\n")[1])
        assert text.startswith("---\n") and "medical" in meta["tags"] and meta["library_name"] == library
        for name, cols in rep["benchmarks"].items():
            for label, r in cols.items():
                assert raw["benchmarks"][name][label]["accuracy"] == r["overall"]["accuracy"]
        assert raw["models"]["tuned"]["stop_rate"] == tuned["stop_rate"]
        assert "not a medical device" in text and "不是医疗器械" in text  # English, and the Chinese benchmark's
