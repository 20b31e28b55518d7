"""scripts/bench_report.py: every medtune figure beside its peer's from the same run, with the right ratio."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_bench_report_pairs_each_figure_with_its_peer(tmp_path):
    (tmp_path / "prepare.json").write_text(
        json.dumps(
            {
                "records": 100,
                "plain_s": 2.0,
                "prepare_no_stats_s": 3.0,
                "bare_tokenize_s": 10.0,
                "prepare_stats_s": 12.0,
            }
        )
    )
    (tmp_path / "train.json").write_text(
        json.dumps(
            {
                "runs": {  # bench_train.py's shape: a run's figures under "summary"
                    "a": {"label": "mlx_lm.lora", "summary": {"tokens_per_second": 5.0, "peak_memory_gb": 4.0}},
                    "b": {"label": "medtune", "summary": {"tokens_per_second": 6.0, "peak_memory_gb": 1.0}},
                    "c": {"label": "medtune+openblas", "summary": {"tokens_per_second": 40.0, "peak_memory_gb": 1.0}},
                }
            }
        )
    )
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_report.py"), "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "results.json").read_text())
    got = {
        (f["bench"], f["what"].split(",")[0].split(":")[0]): f["ratio"]
        for f in res["figures"]
        if "peak" not in f["what"]
    }
    assert got[("prepare", "prepare --no-token-stats")] == 1.5
    assert got[("prepare", "prepare with token stats (every record checked)")] == 1.2
    assert got[("train", "medtune")] == 1.2 and got[("train", "medtune+openblas")] == 8.0
    peaks = [f for f in res["figures"] if f["what"].endswith("peak memory")]
    assert [(f["what"], f["ratio"]) for f in peaks] == [("medtune: peak memory", 0.25)]  # (c, a): BLAS differs
    assert len(res["figures"]) == 5  # no (c, d) pair without d
    assert res["missing"] == ["export.json (FileNotFoundError)"]
    md = (tmp_path / "results.md").read_text()
    assert (
        "| train | medtune+openblas: tokens/s | 40.00 tok/s | mlx_lm.lora | 5.00 tok/s | 8.00× (higher is better)" in md
    )
