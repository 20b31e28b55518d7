"""The model card (medtune.models.card) and the licence that travels with a model (fuse, Modelfile).

The manifests are written by the stages' own writers (prepare's _manifest + write_outputs, train's write_manifest,
fuse's write_fused, export's _write_manifest) on files made here: no model is trained, fused or converted.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from medtune.core.fsutil import sha256_file
from medtune.models.card import (
    NOTICES,
    UNKNOWN_LICENCE,
    base_licence,
    card_text,
    detect_language,
    fmt,
    front_matter,
    hub_licence,
    write_card,
)

APACHE = "                                 Apache License\n                           Version 2.0, January 2004\n"
HUB_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
HUB_DATA = "FreedomIntelligence/medical-o1-reasoning-SFT"
EN_RECORD = {
    "messages": [
        {"role": "user", "content": "What is the first-line treatment for anaphylaxis in an adult?"},
        {"role": "assistant", "content": "Give intramuscular adrenaline 0.5 mg into the thigh and call for help."},
    ]
}
ZH_RECORD = {
    "messages": [
        {"role": "user", "content": "成人过敏性休克的一线治疗是什么？"},
        {"role": "assistant", "content": "立即在大腿外侧肌肉注射肾上腺素0.5毫克，并呼叫急救。"},
    ]
}


# ---- the stages' manifests, by their own writers ------------------------------------------------------
def _base(root: Path, readme: str | None = "---\nlicense: apache-2.0\n---\n# SmolLM2\n", licence=APACHE) -> Path:
    base = root / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "snapshots" / "abc"
    base.mkdir(parents=True)
    (base / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    (base / "tokenizer.json").write_text("{}")
    if readme is not None:
        (base / "README.md").write_text(readme)
    if licence is not None:
        (base / "LICENSE").write_text(licence)
    return base


def _dataset(root: Path, record: dict, spec: str, licence: str | None = "cc-by-4.0") -> tuple[str, Path]:
    """Source files as a Hub dataset snapshot holds them (README.md at its root, data below), or a local file."""
    if spec.startswith("hf:"):
        snap = root / "hub" / "datasets--X--Y" / "snapshots" / "def"
        src = snap / "data" / "train.jsonl"
        readme = snap / "README.md"
    else:
        src = root / "local" / "records.jsonl"
        readme = src.parent / "README.md"
        spec = str(src)
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    if licence is not None:
        readme.write_text(f"---\nlicense: {licence}\n---\n# data\n")
    return spec, src


def _prepare(root: Path, record: dict, spec: str = f"hf:{HUB_DATA}:en", licence: str | None = "cc-by-4.0") -> Path:
    from medtune.data.options import PrepareOptions
    from medtune.data.prepare import PrepareResult, _manifest, write_outputs

    spec, src = _dataset(root, record, spec, licence)
    out = root / "data" / "processed" / "run1"
    result = PrepareResult(
        out=out,
        counts={"read": 10, "examples": 10, "kept": 10, "dropped": {}, "train": 9, "valid": 1, "test": 0},
        format="messages",
        style="chat",
        template={"name": "chatml"},
        tokens={"min": 40, "median": 60, "p95": 90, "max": 95, "mean": 61.5, "total": 615},
        example={"where": f"{src}:1", "record": record, "rendered": "…", "prompt_chars": 20, "tokens": 60},
    )
    inputs = {
        "dataset": spec,
        "kind": "hf" if spec.startswith("hf:") else "local",
        "sha256": {str(src): sha256_file(src)},
        "model": {"spec": HUB_BASE, "kind": "hub", "path": "/somewhere"},
    }
    manifest = _manifest(result, PrepareOptions(max_seq_length=1024), {}, inputs, 10, False)
    splits = {"train": [record] * 9, "valid": [record], "test": []}
    write_outputs(out, splits, manifest)
    return out


def _train(root: Path, data: Path, base: Path) -> Path:
    from medtune.models import ModelRef
    from medtune.train.loop import write_manifest
    from medtune.train.options import TrainOptions, TrainResult

    out = root / "adapters" / "run1"
    out.mkdir(parents=True)
    (out / "adapters.safetensors").write_bytes(b"adapter weights")
    (out / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": 8}))
    (out / "metrics.jsonl").write_text('{"step": 10, "train_loss": 2.1}\n{"step": 10, "val_loss": 2.0}\n')
    backend = SimpleNamespace(
        name="mlx", size=1, adapter_file="adapters.safetensors", packages=("mlx-lm",), manifest_fields=lambda r: {}
    )
    opts = TrainOptions(iters=30, lr=2e-4, batch_size=2, rank=16, num_layers=8, max_seq_length=1024)
    result = TrainResult(
        out=out,
        adapter_file=out / "adapters.safetensors",
        steps=30,
        final_train_loss=1.5,
        final_val_loss=1.7,
        first_val_loss=2.4,
        tokens_per_second=91.25,
        seconds=754.3,
        trainable_parameters=1_000_000,
        total_parameters=135_000_000,
    )
    # written with a relative data path, as `medtune train --data data/processed/run1` run from the project records it
    write_manifest(backend, out, Path("data/processed/run1"), ModelRef(HUB_BASE, "hub", base), opts, result)
    assert json.loads((out / "manifest.json").read_text())["inputs"]["data"] == "data/processed/run1"
    return out


def _fuse(root: Path, adapter: Path, base: Path) -> Path:
    from medtune.fuse import write_fused
    from medtune.models import ModelRef

    out = root / "models" / "run1"
    manifest = {  # medtune.fuse.mlx.fuse_mlx's
        "inputs": {
            "base": ModelRef(HUB_BASE, "hub", base).to_dict(),
            "adapter": "adapters/run1",
            "adapter_sha256": sha256_file(adapter / "adapters.safetensors"),
            "adapter_config": json.loads((adapter / "adapter_config.json").read_text()),
        },
        "fused_layers": 8,
        "dtype": "float32",
        "dequantized": False,
    }
    cfg = json.loads((base / "config.json").read_text())
    write_fused(out, lambda tmp: (tmp / "model.safetensors").write_bytes(b"weights"), cfg, base, manifest)
    return out


def _export(root: Path, fused: Path, name: str = "med-run1") -> dict:
    from medtune.export import _write_manifest
    from medtune.export.modelfile import licence_value, modelfile_lines

    ggufs = {q: fused / f"{name}-{q}.gguf" for q in ("f16", "q8_0")}
    for q, p in ggufs.items():
        p.write_bytes(b"GGUF" + q.encode() * 100)
    mf = root / "Modelfiles" / "run1.Modelfile"
    mf.parent.mkdir(parents=True)
    licence = licence_value(base_licence(fused)[1] or "")  # as render_modelfile finds it
    lines = modelfile_lines("../models/run1/med-run1-f16.gguf", "{{ .Prompt }}", None, ["<|im_end|>"], {}, licence)
    mf.write_text("\n".join(lines) + "\n")
    job = SimpleNamespace(
        route=SimpleNamespace(converter="medtune", checkout=None),
        quantizer=None,
        ggufs=ggufs,
        mf_path=mf,
        out_dir=fused,
    )
    info = {
        "family": "chatml",
        "stops": ["<|im_end|>", "<|im_start|>"],
        "system": "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
        "default_system": None,
        "params": {"temperature": 0.6},
        "warnings": [],
    }
    summaries = [{"path": str(p), "outtype": q, "bytes": p.stat().st_size} for q, p in ggufs.items()]
    options = {"name": name, "quants": list(ggufs), "system": None, "params": None, "family": None}
    hashes = {fused / "model.safetensors": sha256_file(fused / "model.safetensors")}
    _write_manifest(job, fused, options, info, summaries, hashes)
    return {"name": name, "modelfile": mf, "ggufs": ggufs}


def _report(ggufs: dict) -> dict:
    from medtune.eval.quants import QuantStats, QuantTable, judge

    q8 = judge(QuantStats(str(ggufs["q8_0"]), "Q8_0", 1000, 322, 0.0057123, 0.04612, 0.31, 0.953271, 9.87654, 9.81))
    table = QuantTable(str(ggufs["f16"]), "F16", 9.81, 322, [q8])
    fid = {
        "file_type": "F16",
        "judged": True,
        "passed": True,
        "summary": {"prompts": 6, "tokens_equal": 6, "continuations_equal": 5, "max_logit_diff": 0.0123456},
        "notes": [],
        "runtime": "llama.cpp",
    }
    return {
        "medtune_eval": 1,
        "created": "2025-01-01T00:00:00Z",
        "data": "data/processed/run1",
        "max_tokens": 256,
        "models": [
            {"label": "base", "kind": "mlx", "metrics": {"val_loss": 2.456789, "val_ppl": 11.66, "stop_rate": 0.5}},
            {
                "label": "tuned",
                "kind": "mlx",
                "metrics": {
                    "val_loss": 1.6983215,
                    "val_ppl": 5.46489,
                    "stop_rate": 0.9166666666666666,
                    "mc_accuracy": 0.4,
                },
            },
            {
                "label": ggufs["f16"].name,
                "kind": "gguf",
                "metrics": {"stop_rate": 0.8333333333333334, "mean_tokens": 120.5},
                "fidelity": fid,
            },
        ],
        "quants": table.to_dict(),
        "benchmarks": {
            "medqa": {
                "base": {
                    "overall": {"accuracy": 0.3125, "correct": 5, "questions": 16},
                    "macro": 0.30208333,
                    "subjects": {},
                },
                "tuned": {
                    "overall": {"accuracy": 0.4375, "correct": 7, "questions": 16},
                    "macro": 0.421875,
                    "subjects": {},
                },
            }
        },
        "notes": [],
    }


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project after prepare, train, fuse and export (models/run1 holds both the fused model and the GGUFs)."""
    monkeypatch.chdir(tmp_path)
    base = _base(tmp_path)
    data = _prepare(tmp_path, EN_RECORD)
    adapter = _train(tmp_path, data, base)
    fused = _fuse(tmp_path, adapter, base)
    return SimpleNamespace(root=tmp_path, base=base, data=data, adapter=adapter, fused=fused)


def _split(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def _results_comment(text: str) -> dict:
    m = re.search(r"<!-- medtune-results: (.*?) -->", text)
    assert m, "no medtune-results comment"
    return json.loads(m.group(1))


# ---- the card ---------------------------------------------------------------------------------------------
def test_fused_card_front_matter_and_facts(project):
    path = write_card(project.fused)
    text = path.read_text(encoding="utf-8")
    assert path == project.fused / "README.md"
    meta, body = _split(text)
    assert meta["base_model"] == HUB_BASE
    assert meta["license"] == "apache-2.0" and "license_name" not in meta
    assert meta["library_name"] == "mlx"
    assert {"medical", "lora", "medtune"} <= set(meta["tags"]) and "gguf" not in meta["tags"]
    assert meta["datasets"] == [HUB_DATA]
    assert meta["language"] == ["en"]
    assert front_matter(text) == meta
    # what it is, the base, the data with its sha256 and licence (the Hub snapshot's README), the training
    assert f"`{HUB_BASE}` was fine-tuned with LoRA on `hf:{HUB_DATA}:en`" in body
    assert "Licence: apache-2.0" in body and "Licence text: in LICENSE" in body
    src = next(iter(json.loads((project.data / "manifest.json").read_text())["inputs"]["sha256"].items()))
    assert f"| {src[0]} | `{src[1]}` |" in body
    assert "- Licence: cc-by-4.0 (from " in body
    train = json.loads((project.adapter / "manifest.json").read_text())
    assert f"| train.jsonl | `{train['inputs']['train_sha256']}` |" in body
    for key, shown in (("lr", "0.0002"), ("batch_size", "2"), ("rank", "16"), ("num_layers", "8"), ("iters", "30")):
        assert f"| {key} | {shown} |" in body
    assert "| max_seq_length | 1024 |" in body and "| seconds | 754.3 |" in body
    assert "- Backend: `mlx`" in body and "- Time: 754.3 s (0:12:34)" in body
    assert "metrics.jsonl (2 rows)" in body
    assert NOTICES["en"] in body and NOTICES["zh"] not in body
    assert "## Unknown" not in body and "## Use with Ollama" not in body
    assert "No evaluation report was given" in body


def test_export_card_has_ollama_lines_files_and_sha256(project):
    from medtune.export import ollama_commands

    exp = _export(project.root, project.fused)
    meta, body = _split(card_text(project.fused, _report(exp["ggufs"])))
    assert meta["library_name"] == "gguf" and {"gguf", "ollama", "medical", "lora"} <= set(meta["tags"])
    assert meta["license"] == "apache-2.0" and meta["base_model"] == HUB_BASE
    create, run = ollama_commands(exp["name"], exp["modelfile"])
    assert f"```sh\n{create}\n{run}\n```" in body
    assert create == f"ollama create med-run1 -f {exp['modelfile'].absolute()}"
    for q, gguf in exp["ggufs"].items():
        assert f"| {gguf.name} | {q} | {gguf.stat().st_size} | `{sha256_file(gguf)}` |" in body
    assert f"| {exp['modelfile'].absolute()} | — | " in body  # outside the folder: its path as the manifest has it
    assert "the Modelfile's LICENSE" in body
    assert "GGUF files (f16, q8_0)" in body


def test_card_numbers_are_report_json_numbers(project):
    exp = _export(project.root, project.fused)
    report = json.loads(json.dumps(_report(exp["ggufs"])))  # as read back from report.json
    text = card_text(project.fused, report)
    raw = _results_comment(text)
    models = {e["label"]: e for e in report["models"]}
    for label, e in models.items():
        for key, value in e["metrics"].items():
            if key in ("val_loss", "val_ppl", "stop_rate", "mc_accuracy", "mean_tokens"):
                assert raw["models"][label][key] == value
    tuned = models["tuned"]["metrics"]
    row = f"| tuned | {tuned['val_loss']:.4g} | {tuned['val_ppl']:.4g} | {tuned['stop_rate']:.4g} | 0.4 | — | — | — |"
    assert row in text and "| tuned | 1.698 | 5.465 | 0.9167 | 0.4 |" in text
    for name, per_model in report["benchmarks"].items():
        for label, r in per_model.items():
            got = raw["benchmarks"][name][label]
            assert got["accuracy"] == r["overall"]["accuracy"] and got["macro"] == r["macro"]
            o = r["overall"]
            assert (
                f"| {name} | {label} | {o['accuracy']:.4g} | {o['correct']}/{o['questions']} | {r['macro']:.4g} |"
                in text
            )
    q = report["quants"]["rows"][0]
    got = raw["quants"][Path(q["file"]).name]
    for key in ("mean_kld", "p99_kld", "same_top", "delta_ppl"):
        assert got[key] == q[key]
    assert f"| {Path(q['file']).name} | Q8_0 | {q['mean_kld']:.4g} | {q['p99_kld']:.4g} | {q['same_top']:.4g} |" in text
    assert raw["recommended"] == Path(report["quants"]["recommended"]).name == exp["ggufs"]["q8_0"].name
    fid = models[exp["ggufs"]["f16"].name]["fidelity"]
    assert raw["fidelity"][exp["ggufs"]["f16"].name]["max_logit_diff"] == fid["summary"]["max_logit_diff"]
    assert "| pass | 6/6 | 5/6 | 0.01235 |" in text
    assert fmt(0.0057123) == "0.005712" and fmt(3) == "3" and fmt(None) == "—"


def test_chinese_data_gets_the_chinese_notice_and_english_does_not(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cards = {}
    for lang, record in (("zh", ZH_RECORD), ("en", EN_RECORD)):
        root = tmp_path / lang
        root.mkdir()
        base = _base(root)
        data = _prepare(root, record, spec="local")
        monkeypatch.chdir(root)
        fused = _fuse(root, _train(root, data, base), base)
        cards[lang] = card_text(fused)
    zh_meta, zh_body = _split(cards["zh"])
    en_meta, en_body = _split(cards["en"])
    assert zh_meta["language"] == ["zh"] and en_meta["language"] == ["en"]
    assert NOTICES["zh"] in zh_body and NOTICES["en"] in zh_body
    assert NOTICES["zh"] not in en_body and NOTICES["en"] in en_body
    assert "datasets" not in zh_meta  # a local file is no Hub dataset
    assert "- Licence: cc-by-4.0 (from " in zh_body  # the README.md beside the local file


def test_a_chinese_benchmark_adds_its_language_and_notice(project):
    report = {
        "models": [],
        "benchmarks": {"cmexam": {"tuned": {"overall": {"accuracy": 0.5, "correct": 2, "questions": 4}, "macro": 0.5}}},
        "benchmark_info": {
            "cmexam": {"title": "CMExam", "lang": "zh", "questions": 4, "shots": 0, "scoring": "loglik"}
        },
    }
    meta, body = _split(card_text(project.fused, report))
    assert meta["language"] == ["en", "zh"] and NOTICES["zh"] in body
    assert "| cmexam | tuned | 0.5 | 2/4 | 0.5 |" in body
    assert "- cmexam: CMExam (zh, 4 questions, 0-shot, scoring loglik)" in body


def test_language_detection():
    assert detect_language("发热39度，伴咳嗽三天，应该怎么办？") == "zh"
    assert detect_language("You are a helpful assistant.\n发热39度，伴咳嗽三天，应该怎么办？") == "zh"
    assert detect_language("熱が39度あります。どうすればいいですか？") == "ja"
    assert detect_language("열이 39도입니다. 어떻게 해야 하나요?") == "ko"
    assert detect_language("What is the dose of amoxicillin for a child?") == "en"
    assert detect_language("Quel est le traitement de première intention ?") is None
    assert detect_language("") is None


def test_partial_folders_get_a_card_that_says_what_is_unknown(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    text = write_card(empty).read_text(encoding="utf-8")
    meta, body = _split(text)
    assert meta["license"] == "unknown" and "base_model" not in meta and "library_name" not in meta
    assert {"medical", "medtune"} <= set(meta["tags"]) and "lora" not in meta["tags"]
    assert "what it holds, and how it was made, is unknown" in body
    assert "## Unknown" in body and "no export_manifest.json and no medtune_manifest.json" in body
    assert "Base model\n\nUnknown" in body and "## Data\n\nUnknown" in body and "## Training\n\nUnknown" in body
    assert NOTICES["en"] in body
    # a fused folder whose adapter (and so the training and the data) is gone
    base = _base(tmp_path)
    adapter = _train(tmp_path, _prepare(tmp_path, EN_RECORD), base)
    fused = _fuse(tmp_path, adapter, base)
    shutil.rmtree(adapter)
    meta, body = _split(card_text(fused, {"models": "damaged", "quants": None}))
    assert meta["base_model"] == HUB_BASE and meta["license"] == "apache-2.0" and "datasets" not in meta
    assert "training: the adapter folder adapters/run1 is not here" in body
    assert "was fine-tuned with LoRA on data that is unknown here" in body  # the adapter config in the fuse manifest
    # an export whose fused folder is elsewhere and gone
    gone = tmp_path / "gone"
    shutil.copytree(fused, gone)
    exp = _export(tmp_path, gone, name="gone")
    out = tmp_path / "export-only"
    out.mkdir()
    shutil.copy(gone / "export_manifest.json", out / "export_manifest.json")
    shutil.rmtree(gone)
    meta, body = _split(card_text(out))
    assert meta["library_name"] == "gguf" and meta["license"] == "unknown"
    assert "the folder the GGUF was made from" in body and "ollama create gone -f" in body
    assert exp["ggufs"]["f16"].name in body


def test_data_licence_unknown_without_a_readme(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = _base(tmp_path)
    fused = _fuse(tmp_path, _train(tmp_path, _prepare(tmp_path, EN_RECORD, licence=None), base), base)
    assert f"- Licence: {UNKNOWN_LICENCE}" in card_text(fused)


def test_base_licence_reads_readme_config_import_and_licence_file(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    assert base_licence(d) == (None, None)
    (d / "medtune_import.json").write_text(json.dumps({"general.license": "apache-2.0"}))
    assert base_licence(d) == ("apache-2.0", None)
    (d / "config.json").write_text(json.dumps({"license": "mit"}))
    assert base_licence(d) == ("mit", None)
    (d / "README.md").write_text("---\nlicense: other\nlicense_name: qwen-research\n---\n# Qwen\n")
    assert base_licence(d)[0] == "qwen-research"
    (d / "README.md").write_text("---\nlicense: llama3.1\n---\n")
    (d / "LICENSE.txt").write_text("LLAMA 3.1 COMMUNITY LICENSE AGREEMENT\n")
    assert base_licence(d) == ("llama3.1", "LLAMA 3.1 COMMUNITY LICENSE AGREEMENT\n")
    assert hub_licence("Apache-2.0") == ("apache-2.0", None)
    assert hub_licence("Gemma Terms of Use") == ("gemma", None)
    assert hub_licence("Qwen Research License") == ("other", "qwen-research-license")
    assert hub_licence(None) == ("unknown", None)


def test_unknown_base_licence_is_other_with_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = _base(tmp_path, readme="---\nlicense: Tongyi Qianwen\n---\n", licence=None)
    fused = _fuse(tmp_path, _train(tmp_path, _prepare(tmp_path, EN_RECORD), base), base)
    meta, body = _split(card_text(fused))
    assert meta["license"] == "other" and meta["license_name"] == "tongyi-qianwen"
    assert "Licence: Tongyi Qianwen" in body and "Licence text: none found" in body


def test_fuse_copies_the_base_licence_files(project):
    assert (project.fused / "LICENSE").read_text() == APACHE
    (project.base / "NOTICE").write_text("notice\n")
    (project.base / "USE_POLICY.md").write_text("policy\n")
    again = _fuse(project.root / "again", project.adapter, project.base)
    assert {"LICENSE", "NOTICE", "USE_POLICY.md"} <= {p.name for p in again.iterdir()}
    assert base_licence(again)[1] == APACHE


def test_card_is_redacted(project, monkeypatch):
    token = "hf_" + "A1b2C3d4" * 5
    report = {"models": [{"label": token, "kind": "mlx", "metrics": {"val_loss": 1.0}}]}
    text = write_card(project.fused, report).read_text(encoding="utf-8")
    assert token not in text and "<redacted>" in text


# ---- the Modelfile's LICENSE -----------------------------------------------------------------------------
def test_modelfile_licence_value_round_trips_or_is_refused():
    from medtune.core.errors import BadInput
    from medtune.export.modelfile import licence_value, modelfile_lines, parse_modelfile

    for text in (APACHE, 'MIT License\r\n\r\nCopyright (c) 2024 "Someone"\n\fPage two\n', 'ends with a quote"'):
        value = licence_value(text)
        lines = modelfile_lines("/m.gguf", "{{ .Prompt }}", None, ["<|im_end|>"], {"temperature": 0.5}, value)
        cmds = parse_modelfile("\n".join(lines) + "\n")
        assert [k for k, _ in cmds] == ["model", "template", "stop", "temperature", "license"]
        assert cmds[-1][1] == value
        assert "\r" not in value and "\f" not in value and value == value.strip()
    assert licence_value('a """ b') is None and licence_value(" \n ") is None
    with pytest.raises(BadInput):
        modelfile_lines("/m.gguf", "t", None, [], {}, 'x"""\nFROM /etc/passwd')
    assert "license" not in [k for k, _ in parse_modelfile("\n".join(modelfile_lines("/m.gguf", "t", None, [], {})))]


def test_modelfile_has_a_licence_line_when_the_model_folder_has_a_licence_file(smollm2_dir, tmp_path):
    from medtune.export.modelfile import parse_modelfile, render_modelfile

    model = tmp_path / "model"
    model.mkdir()
    for name in (
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ):
        if (Path(smollm2_dir) / name).is_file():
            shutil.copy(Path(smollm2_dir) / name, model / name)
    text, info = render_modelfile("/m.gguf", model)
    assert "license" not in [k for k, _ in parse_modelfile(text)] and info["licence"] is False
    (model / "LICENSE").write_text(APACHE + "\n   TERMS AND CONDITIONS\n")
    text, info = render_modelfile("/m.gguf", model)
    assert [v for k, v in parse_modelfile(text) if k == "license"] == [(APACHE + "\n   TERMS AND CONDITIONS").strip()]
    assert info["licence"] is True
    text, _ = render_modelfile("/m.gguf", model, licence="")  # asked for none
    assert "license" not in [k for k, _ in parse_modelfile(text)]
    (model / "LICENSE").write_text('holds """ somewhere')
    text, info = render_modelfile("/m.gguf", model)
    assert "license" not in [k for k, _ in parse_modelfile(text)] and any("LICENSE" in w for w in info["warnings"])
