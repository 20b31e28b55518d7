"""`medtune run`: fingerprints, skipping, --only/--from/--force, and an interrupted run that resumes."""

import json

import pytest

from medtune.core.errors import BadInput
from medtune.pipeline import Hasher, Run, fingerprint, load_config, run_pipeline

from conftest import SAMPLE, run_cli

STAGES = ["prepare", "train", "fuse", "export", "ollama", "eval"]
RUN_SYSTEM = "You are a careful clinician."
RUN_WORDING = {"system": RUN_SYSTEM, "prompt_template": r"Question: {question}\nAnswer:"}  # done_run's


def tiny_config(root, model, name="tiny", **train):
    return {
        "name": name,
        "model": str(model),
        "runs_dir": str(root),
        "outputs_dir": str(root),
        "prepare": {
            "dataset": str(SAMPLE),
            "max_seq_length": 1024,
            "limit": 10,
            "valid_ratio": 0.2,
            "token_stats": False,
        },
        "train": {
            "iters": 4,
            "batch_size": 2,
            "num_layers": 2,
            "max_seq_length": 1024,
            "eval_every": 2,
            "save_every": 2,
            "backend": "mlx",
            **train,
        },
        "export": {"quant": ["f32"]},
        "ollama": {"create": "auto", "host": "http://127.0.0.1:9"},  # nothing answers there
        "eval": {"max_tokens": 4, "limit": 1, "probe_limit": 1, "threads": 1},
    }


def test_config_defaults_and_unknown_keys(tmp_path):
    cfg = load_config(None)
    assert cfg["model"] == "builtin:smollm2-135m" and cfg["train"]["iters"] == 24 and cfg["train"]["batch_size"] == 2
    p = tmp_path / "c.yaml"
    p.write_text("name: x\ntrain:\n  itres: 3\n", encoding="utf-8")
    with pytest.raises(BadInput, match="itres") as e:
        load_config(p)
    assert "iters" in e.value.hint
    cfg = load_config({"name": "x", "train": {"batch-size": 8}, "export": {"quants": "q8_0"}})
    assert cfg["train"]["batch_size"] == 8 and cfg["export"]["quant"] == ["q8_0"]


def test_print_config_is_the_default():
    r = run_cli("run", "--print-config")
    assert r.returncode == 0, r.stderr
    import yaml

    assert yaml.safe_load(r.stdout) == load_config(None) | {}  # comments aside, the same settings
    assert "# " in r.stdout


def test_fingerprints_change_with_inputs_and_options(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_text('{"a": 1}\n')
    h = Hasher(tmp_path / "hashes.json")
    v = {"medtune": "0"}
    base = fingerprint("prepare", {"dataset": h.spec(str(f))}, {"seed": 1}, v)
    assert base == fingerprint("prepare", {"dataset": h.spec(str(f))}, {"seed": 1}, v)
    assert base != fingerprint("prepare", {"dataset": h.spec(str(f))}, {"seed": 2}, v)
    assert base != fingerprint("prepare", {"dataset": h.spec(str(f))}, {"seed": 1}, {"medtune": "1"})
    f.write_text('{"a": 2}\n')
    assert base != fingerprint("prepare", {"dataset": h.spec(str(f))}, {"seed": 1}, v)
    assert h.spec("builtin:smollm2-135m") == "spec:builtin:smollm2-135m"


@pytest.fixture(scope="module")
def done_run(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("runs")
    cfg = tiny_config(root, tiny_llama_dir)
    cfg["prepare"] |= RUN_WORDING
    first = run_pipeline(cfg)
    return {"root": root, "cfg": cfg, "first": first}


def test_run_does_every_stage_then_skips_them(done_run):
    first = done_run["first"]
    assert first["stages"] == {
        "prepare": "done",
        "train": "done",
        "fuse": "done",
        "export": "done",
        "ollama": "not run",
        "eval": "done",
    }
    root = done_run["root"] / "tiny"
    for p in (
        "config.yaml",
        "run.log",
        "outputs.json",
        "data/train.jsonl",
        "eval/report.html",
        "eval/report.json",
        "stages/train.json",
    ):
        assert (root / p).exists(), p
    # the results land in the project's folders, and the run folder points to them
    top = done_run["root"]
    for p in (
        "adapters/tiny/adapters.safetensors",
        "models/tiny/config.json",
        "models/tiny/tiny-f32.gguf",
        "Modelfiles/tiny.Modelfile",
    ):
        assert (top / p).exists(), p
    assert not any((root / p).exists() for p in ("adapter", "fused", "gguf", "tiny.Modelfile"))
    where = json.loads((root / "outputs.json").read_text())
    assert where["adapter"] == str(top / "adapters" / "tiny") and where["gguf"] == [
        str(top / "models/tiny/tiny-f32.gguf")
    ]
    assert first["outputs"] == where
    assert "FROM ../models/tiny/tiny-f32.gguf" in (top / "Modelfiles" / "tiny.Modelfile").read_text()
    rec = json.loads((root / "stages" / "train.json").read_text())
    assert rec["options"]["iters"] == 4 and rec["inputs"]["data"] and rec["versions"]["medtune"]
    assert first["report"].endswith("report.html")
    rep = json.loads((root / "eval" / "report.json").read_text())
    assert [m["label"] for m in rep["models"]] == ["base", "tuned", "tiny-f32.gguf"]
    # the folder alone reproduces the run: its config.yaml is the resolved config
    assert load_config(root / "config.yaml") == load_config(done_run["cfg"])

    second = run_pipeline(done_run["cfg"])
    assert second["stages"] == {s: "skipped" for s in STAGES if s != "ollama"} | {"ollama": "not run"}


def test_the_runs_system_prompt_and_wording_reach_ollama(done_run):
    """prepare's system and prompt_template keys in a run config: the data, the fused model and the Modelfile carry
    them, and Ollama's rendering of the plain question is the prompt training saw."""
    from medtune.export.gotemplate import ollama_prompt
    from medtune.ollama import read_modelfile

    top, root = done_run["root"], done_run["root"] / "tiny"
    row = json.loads((root / "data" / "valid.jsonl").read_text(encoding="utf-8").splitlines()[0])
    system, user = row["messages"][:2]
    assert system["content"] == RUN_SYSTEM and user["content"].startswith("Question: ")
    assert user["content"].endswith("\nAnswer:")
    fused = json.loads((top / "models" / "tiny" / "medtune_manifest.json").read_text(encoding="utf-8"))
    assert fused["wording"]["system"] == RUN_SYSTEM
    spec = read_modelfile(top / "Modelfiles" / "tiny.Modelfile")
    assert spec.system == RUN_SYSTEM
    question = user["content"][len("Question: ") : -len("\nAnswer:")]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(top / "models" / "tiny")
    want = tok.apply_chat_template([system, user], tokenize=False, add_generation_prompt=True)
    assert ollama_prompt(spec.template, [{"role": "user", "content": question}], spec.system) == want


def test_changed_option_reruns_from_that_stage(done_run):
    cfg = json.loads(json.dumps(done_run["cfg"]))
    cfg["eval"]["max_tokens"] = 3
    res = run_pipeline(cfg)
    assert res["stages"]["train"] == "skipped" and res["stages"]["eval"] == "done"
    res = run_pipeline(cfg)
    assert res["stages"]["eval"] == "skipped"


def test_only_from_and_force(done_run):
    cfg = done_run["cfg"]
    assert run_pipeline(cfg, only="eval")["stages"] == {"eval": "done"}
    res = run_pipeline(cfg, from_stage="export")
    assert res["stages"] == {"export": "done", "ollama": "not run", "eval": "done"}
    with pytest.raises(BadInput):
        run_pipeline(cfg, only="nope")
    forced = json.loads(json.dumps(cfg))
    forced["eval"]["enabled"] = False
    res = run_pipeline(forced, force=True)
    assert all(res["stages"][s] == "done" for s in ("prepare", "train", "fuse", "export", "eval")), res["stages"]
    run = Run(load_config(forced))
    assert run.record("train")["result"]["resumed_from"] is None  # forced: trained afresh, not resumed
    assert run_pipeline(forced, only="train")["stages"] == {"train": "done"}
    assert run.record("train")["result"]["resumed_from"] is None


def test_interrupted_training_resumes_to_the_same_adapter(done_run, tiny_llama_dir):
    import mlx.core as mx

    cfg = tiny_config(done_run["root"], tiny_llama_dir, name="broken")
    cfg["eval"]["enabled"] = False
    cfg["prepare"] |= RUN_WORDING  # the same data as the unbroken run

    class Crash(Exception):
        pass

    def crash(step, metrics):
        if step == 3:  # after the checkpoint at step 2
            raise Crash

    with pytest.raises(Crash):
        run_pipeline(cfg, on_step=crash)
    run = Run(load_config(cfg))
    assert (run.adapter / "checkpoints" / "step-0000002").is_dir() and run.record("train") is None
    res = run_pipeline(cfg)
    assert res["stages"]["prepare"] == "skipped" and res["stages"]["train"] == "done"
    rec = run.record("train")
    assert rec["result"]["resumed_from"] == 2
    assert "resuming from the last checkpoint" in (run.root / "run.log").read_text()
    # the unbroken run (its fingerprint for train is the same: the name is not an input)
    unbroken = mx.load(str(done_run["root"] / "adapters" / "tiny" / "adapters.safetensors"))
    resumed = mx.load(str(run.adapter / "adapters.safetensors"))
    assert unbroken.keys() == resumed.keys()
    for k in unbroken:
        assert mx.allclose(unbroken[k], resumed[k], atol=1e-6).item(), k


def test_ctrl_c_during_training_then_run_again_resumes(done_run, tiny_llama_dir, tmp_path):
    """The real command: SIGINT after the first checkpoint stops with exit 130 and a hint; the same command again
    resumes training from the checkpoint and skips prepare."""
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from conftest import ROOT

    # validation and periodic checkpoints only at the end: Ctrl-C itself saves the checkpoint to resume from
    cfg = tiny_config(done_run["root"], tiny_llama_dir, name="ctrlc", iters=12, eval_every=12, save_every=12)
    cfg["eval"]["enabled"] = False
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    metrics = done_run["root"] / "adapters" / "ctrlc" / "metrics.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "medtune", "run", str(path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while (
        proc.poll() is None
        and time.time() < deadline
        and not (metrics.is_file() and "train_loss" in metrics.read_text(encoding="utf-8"))
    ):
        time.sleep(0.01)
    if proc.poll() is not None:
        pytest.skip("training finished before the signal could be sent")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "run the same `medtune run` again" in err + out
    r = run_cli("run", path, "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert res["stages"]["prepare"] == "skipped" and res["stages"]["train"] == "done"
    rec = json.loads((done_run["root"] / "ctrlc" / "stages" / "train.json").read_text())
    assert 0 < rec["result"]["resumed_from"] < 12 and rec["result"]["steps"] == 12


def test_installing_a_package_a_stage_does_not_use_redoes_nothing(tmp_path, tiny_llama_dir, monkeypatch):
    """Installing the test extras (torch, peft, llama-cpp-python) after a finished MLX run must not retrain: a
    stage's fingerprint holds only the versions of the packages it uses, and a change of one of those redoes
    that stage (and what depends on its output) only."""
    import importlib.metadata as metadata
    import re

    cfg = tiny_config(tmp_path, tiny_llama_dir, name="pkgs")
    first = run_pipeline(cfg)
    assert first["stages"]["train"] == "done" and first["stages"]["eval"] == "done", first["stages"]
    rec = Run(load_config(cfg)).record("train")
    assert {"medtune", "mlx", "mlx-lm"} <= set(rec["versions"]) and "torch" not in rec["versions"]
    assert "gguf" not in rec["versions"]  # only what training uses

    real = metadata.version
    fake: dict[str, str] = {}

    def version(name):
        key = re.sub(r"[-_.]+", "-", name).lower()
        return fake[key] if key in fake else real(name)

    monkeypatch.setattr(metadata, "version", version)
    # the test extras appear, or change version: no stage of an MLX run with an f32 export uses them but eval
    fake.update({"torch": "99.0", "peft": "99.0", "bitsandbytes": "99.0", "llama-cpp-python": "99.0"})
    res = run_pipeline(cfg)
    assert res["stages"] == {
        "prepare": "skipped",
        "train": "skipped",
        "fuse": "skipped",
        "export": "skipped",
        "ollama": "not run",
        "eval": "done",
    }, res["stages"]
    assert run_pipeline(cfg)["stages"]["eval"] == "skipped"
    # a package the export stage uses: export runs again, what came before it does not
    fake["gguf"] = "99.0"
    res = run_pipeline(cfg)
    assert [s for s in ("prepare", "train", "fuse") if res["stages"][s] != "skipped"] == [], res["stages"]
    assert res["stages"]["export"] == "done"
    # mlx-lm, which training uses: training runs again, prepare is still skipped
    fake["mlx-lm"] = "99.0"
    res = run_pipeline(cfg)
    assert res["stages"]["prepare"] == "skipped" and res["stages"]["train"] == "done", res["stages"]
    assert Run(load_config(cfg)).record("train")["versions"]["mlx-lm"] == "99.0"


def test_a_missing_gguf_runtime_is_said_in_one_line_not_dropped(done_run, monkeypatch):
    """Without llama-cpp-python the eval has no GGUF column: the run log, the report (json/md/html) say so."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    lines = []
    res = run_pipeline(done_run["cfg"], only="eval", log=lines.append)
    root = done_run["root"] / "tiny" / "eval"
    rep = json.loads((root / "report.json").read_text())
    assert [m["label"] for m in rep["models"]] == ["base", "tuned"]
    note = [n for n in rep["notes"] if n.startswith("no GGUF column: llama-cpp-python")]
    assert len(note) == 1 and note[0] in lines and res["stages"] == {"eval": "done"}
    assert note[0] in (root / "report.md").read_text() and "no GGUF column" in (root / "report.html").read_text()
    monkeypatch.undo()
    run_pipeline(done_run["cfg"], only="eval")  # the GGUF column comes back


def test_waiting_for_a_running_llama_cpp_build(tmp_path, monkeypatch):
    """make all starts the llama.cpp build in the background (scripts/build_llama_cpp.sh holds its lock); a stage
    that uses llama.cpp (export with K-quants, eval with GGUFs) waits on that lock before its fingerprint is taken,
    so the next make all does not redo it because llama-cpp-python appeared meanwhile."""
    import fcntl
    import threading
    import time

    from medtune.runtimes import tools

    monkeypatch.setenv("MEDTUNE_CACHE", str(tmp_path))
    tools.build_lock().parent.mkdir(parents=True)
    held = open(tools.build_lock(), "w")
    fcntl.flock(held, fcntl.LOCK_EX)
    assert tools.building()
    released = []
    threading.Timer(1.5, lambda: (released.append(time.monotonic()), fcntl.flock(held, fcntl.LOCK_UN))).start()
    notes = []
    t0 = time.monotonic()
    assert tools.wait_for_build(note=notes.append, poll=0.1) is True
    assert released and time.monotonic() >= released[0] and time.monotonic() - t0 >= 1.4
    assert notes and "waiting for the llama.cpp build" in notes[0] and not tools.building()
    assert tools.wait_for_build(poll=0.1) is False  # nothing running: no wait
    held.close()


def test_eval_section_runs_benchmarks_and_their_file_is_an_input(done_run, tmp_path):
    """eval.bench / eval.bench_file in the config: only eval reruns, its record has the accuracies, the model card
    of the run's model folder gets them; editing the benchmark file makes eval run again."""
    import shutil
    from pathlib import Path

    medqa = tmp_path / "medqa.jsonl"
    shutil.copy(Path(__file__).resolve().parents[1] / "data" / "sample" / "bench" / "medqa.jsonl", medqa)
    cfg = json.loads(json.dumps(done_run["cfg"]))
    cfg["eval"].update(bench="medqa", bench_file={"medqa": str(medqa)}, bench_limit=2)
    res = run_pipeline(cfg)
    assert res["stages"] == {
        **{s: "skipped" for s in ("prepare", "train", "fuse", "export")},
        "ollama": "not run",
        "eval": "done",
    }
    result = Run(load_config(cfg)).record("eval")["result"]
    assert set(result["benchmarks"]["medqa"]) == {"base", "tuned", "tiny-f32.gguf"}
    card = (Path(res["outputs"]["model"]) / "README.md").read_text(encoding="utf-8")
    assert '"medqa"' in card and "| medqa | tuned |" in card
    assert run_pipeline(cfg)["stages"]["eval"] == "skipped"
    medqa.write_text(medqa.read_text(encoding="utf-8").replace('"answer_idx": "C"', '"answer_idx": "D"', 1))
    assert run_pipeline(cfg)["stages"]["eval"] == "done"


PAIRS = SAMPLE.parent / "preference_sample.jsonl"


def steps_config(root, model):
    cfg = tiny_config(root, model, name="steps")
    cfg["train"]["steps"] = [
        {"method": "sft"},
        {
            "method": "dpo",
            "dataset": str(PAIRS),
            "lr": 5e-3,
            "beta": 0.1,
            "prepare": {"valid_ratio": 0.25, "limit": None},
        },
    ]
    cfg["eval"]["gguf"] = False
    return cfg


def test_train_steps_sft_then_dpo_each_a_fingerprinted_stage(tmp_path, tiny_llama_dir):
    cfg = steps_config(tmp_path, tiny_llama_dir)
    first = run_pipeline(cfg)
    order = ["prepare", "train.sft", "prepare.dpo", "train.dpo", "fuse", "export", "ollama", "eval"]
    assert list(first["stages"]) == order
    assert first["stages"] == {s: "done" for s in order} | {"ollama": "not run"}
    sft, dpo = tmp_path / "adapters/steps/sft", tmp_path / "adapters/steps/dpo"
    assert (sft / "adapters.safetensors").is_file() and (dpo / "reference_logps.npz").is_file()
    assert first["outputs"]["adapter"] == str(dpo)  # fuse reads the last step's adapter
    assert first["outputs"]["steps"]["train.dpo"]["data"] == str(tmp_path / "steps" / "data-dpo")
    stages = tmp_path / "steps" / "stages"
    rec = json.loads((stages / "train.dpo.json").read_text())
    assert rec["options"]["method"] == "dpo" and rec["options"]["adapter"] == str(sft)
    assert rec["options"]["iters"] == 4  # the train section's options, updated with the step's
    assert json.loads((stages / "prepare.dpo.json").read_text())["result"]["counts"]["pairs"] == 24
    # the DPO step started from the SFT adapter: at step 0 the policy is its own reference (loss log 2)
    rows = [json.loads(x) for x in (dpo / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["val_loss"] == pytest.approx(0.6931, abs=1e-3)
    # the report scores the DPO step's held-out pairs beside the SFT data's answers
    rep = json.loads((tmp_path / "steps" / "eval" / "report.json").read_text())
    assert rep["pairs"] == str(tmp_path / "steps" / "data-dpo" / "valid.jsonl")
    tuned = next(m for m in rep["models"] if m["label"] == "tuned")["metrics"]
    held = (tmp_path / "steps" / "data-dpo" / "valid.jsonl").read_text().splitlines()
    assert tuned["pref_pairs"] == len(held) >= 5 and tuned["pref_margin_vs_base"] > 0

    assert run_pipeline(cfg)["stages"] == {s: "skipped" for s in order} | {"ollama": "not run"}
    cfg["train"]["steps"][1]["beta"] = 0.2  # only the DPO step, and what reads its adapter, is redone
    res = run_pipeline(cfg)["stages"]
    assert [s for s in order if res[s] == "done"] == ["train.dpo", "fuse", "export", "eval"]
    cfg["train"]["steps"][0]["lr"] = 2e-4  # a new SFT adapter: the DPO step that starts from it is redone too
    res = run_pipeline(cfg, only="train")["stages"]
    assert res == {"train.sft": "done", "train.dpo": "done"}
    with pytest.raises(BadInput, match="not a stage of this run") as e:
        run_pipeline(cfg, from_stage="train.orpo")
    assert "train.sft, prepare.dpo, train.dpo" in e.value.hint


@pytest.mark.parametrize(
    "steps, match",
    [
        ([], "must be a list of mappings"),
        ([{"method": "sft"}, {"method": "sft"}], "'sft' is taken"),
        ([{"method": "sft"}, {"method": "dpo", "adapter": "x"}], "a later step starts from"),
        ([{"method": "kto"}], "'kto' is not one of"),
        ([{"method": "dpo", "betta": 0.1}], "unknown option 'betta'"),
        ([{"method": "dpo", "prepare": {"valid_ration": 0.1}}], "unknown option 'valid_ration'"),
        ([{"name": "a.b"}], "a dot"),
    ],
)
def test_bad_train_steps_are_refused_with_where(steps, match):
    with pytest.raises(BadInput, match=match) as e:
        load_config({"name": "x", "train": {"steps": steps}})
    assert e.value.where == "config"


def test_export_lora_writes_the_adapter_gguf_on_a_base_shared_by_runs(tmp_path, tiny_llama_dir):
    """export.lora: besides the fused GGUF, the adapter as a LoRA GGUF on one base GGUF that a second run on the
    same base reuses; its Modelfile stacks FROM and ADAPTER; a second run skips the stage."""
    from medtune.ollama import read_modelfile

    results = []
    for name in ("cardio", "peds"):
        cfg = tiny_config(tmp_path, tiny_llama_dir, name=name, seed=len(results))
        cfg["export"]["lora"] = True
        cfg["eval"]["enabled"] = False
        results.append(run_pipeline(cfg))
    base = tmp_path / "models" / f"base-{tiny_llama_dir.name}" / f"{tiny_llama_dir.name}-f32.gguf"
    first, second = (json.loads((tmp_path / n / "stages" / "export.json").read_text()) for n in ("cardio", "peds"))
    assert first["result"]["lora"]["base_written"] and not second["result"]["lora"]["base_written"]
    assert first["result"]["lora"]["base_gguf"] == second["result"]["lora"]["base_gguf"] == str(base.absolute())
    lora = tmp_path / "models" / "peds" / "peds-lora-f32.gguf"
    assert results[1]["outputs"]["lora"] == [str(base), str(lora), str(tmp_path / "Modelfiles" / "peds-lora.Modelfile")]
    spec = read_modelfile(tmp_path / "Modelfiles" / "peds-lora.Modelfile")
    assert spec.gguf == base.resolve() and spec.adapters == [lora.resolve()]
    assert "adapter" in second["inputs"]  # a new adapter redoes the export
    assert run_pipeline(cfg)["stages"]["export"] == "skipped"
    # the eval stage holds the base + adapter stack to the fused model, beside the fused GGUF
    cfg["eval"] = {"enabled": True, "base": False, "max_tokens": 4, "limit": 1, "probe_limit": 1, "threads": 1}
    assert run_pipeline(cfg)["stages"]["eval"] == "done"
    rep = json.loads((tmp_path / "peds" / "eval" / "report.json").read_text())
    stack = next(m for m in rep["models"] if "+" in m["label"])
    assert stack["label"] == f"{base.name} + {lora.name}" and stack["adapter"] == str(lora)
    assert stack["fidelity"]["passed"] and stack["fidelity"]["summary"]["continuations_equal"] == 1
    assert [m["label"] for m in rep["models"]] == ["tuned", "peds-f32.gguf", stack["label"]]
    (row,) = rep["quants"]["rows"]  # the stack against the fused F32 GGUF, teacher-forced: the same model
    assert row["lora"] == str(lora) and row["mean_kld"] < 1e-4 and row["same_top"] == 1.0
    assert rep["quants"]["recommended_name"] == row["name"] == stack["label"]  # named with its adapter
    assert not any(str(base.parent) in c for c in rep["cards"])  # the shared base's card is not this model's
