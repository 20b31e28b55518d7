import json
import subprocess
import sys

from conftest import ROOT, run_cli

COMMANDS = ("doctor", "models", "prepare", "train", "fuse", "export")


def test_help_lists_every_command():
    res = run_cli("--help")
    assert res.returncode == 0
    for cmd in COMMANDS:
        assert cmd in res.stdout


def test_cli_import_stays_light():
    """`medtune --help` must stay fast: importing the CLI pulls in none of the heavy libraries."""
    code = (
        "import sys, medtune.cli.app; heavy = ('mlx', 'mlx_lm', 'torch', 'transformers', 'llama_cpp', 'gguf', "
        "'numpy', 'safetensors'); print([m for m in heavy if m in sys.modules])"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_doctor_json_reports_the_machine():
    res = run_cli("doctor", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    for key in ("os", "cpu", "gpu", "mlx", "versions", "ollama", "memory", "disk"):
        assert key in report
    assert report["versions"]["mlx-lm"]
    assert report["ollama"]["reachable"] in (True, False)
    assert "device" in report["mlx"] and report["mlx"]["matmul_gflops"] > 0
    if sys.platform.startswith("linux"):
        assert report["mlx"]["blas"]["wanted"] is True


def test_unknown_option_is_a_usage_error():
    res = run_cli("prepare", "--no-such-option")
    assert res.returncode == 2


def test_readme_guarantees_name_real_tests():
    """Every test the README's "What medtune guarantees" section names exists, so the promises stay backed."""
    import re

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## What medtune guarantees") : readme.index("## Benchmarks")]
    named = re.findall(r"`(?:(test_\w+)\.py::)?(test_\w+)`", section)
    assert len(named) >= 25
    sources = {p.stem: p.read_text(encoding="utf-8") for p in (ROOT / "tests").glob("test_*.py")}
    for file, name in named:
        where = [stem for stem, text in sources.items() if re.search(rf"^def {name}\(", text, re.M)]
        assert where and (not file or file in where), (file, name)


def test_piped_output_is_not_wrapped_at_80_columns(tmp_path):
    """Off a terminal (a pipe, a log file) a long message comes out whole, one line each: rich's 80-column
    default must not cut a path or a sentence in two."""
    adapter = tmp_path / "a-rather-long-folder-name-for-the-adapter" / "that-goes-on-and-on" / "and-on" / "adapter"
    res = run_cli(
        "fuse",
        "--model",
        "builtin:smollm2-135m",
        "--adapter",
        adapter,
        "--out",
        tmp_path / "fused",
        env={"COLUMNS": "80"},
    )
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(f"▶ fusing {adapter} into builtin:smollm2-135m") > 100
    assert lines == [
        f"▶ fusing {adapter} into builtin:smollm2-135m",
        f"error: no adapter_config.json in {adapter}",
        "hint: pass the --out folder of `medtune train`",
    ]


def test_piped_tables_keep_their_rows_whole():
    """Off a terminal a table is laid out at its own width (up to 200 columns), not squeezed into 80: doctor's
    llama-server row (path and llama.cpp build, ~130 characters) stays on one line."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    res = subprocess.run(
        [sys.executable, "-m", "medtune", "doctor"], capture_output=True, text=True, env=env, timeout=120
    )
    assert res.returncode == 0, res.stderr
    row = next(line for line in res.stderr.splitlines() if line.lstrip().startswith("llama-server"))
    assert "bin/llama-server" in row and "commit" in row and row.rstrip().endswith(")"), res.stderr
