"""The bad-input corpus: every stage of the real `medtune` command, fed broken files and options.

Each case runs `python -m medtune ...` in a subprocess (in a fresh folder, which is its working directory)
and checks the contract of medtune.core.errors: the documented exit code (2 for bad input: a bad file never gives
1, the code of an unforeseen error), exactly one `error:` line that names the file (and the line or record,
and the field, where that applies), a `hint:` line, no traceback, and nothing written: no output, no
temporary files beside it, the corpus untouched.

Static cases live in tests/data/bad/ (see its README.md); broken model folders, adapters, binary and huge
files are made here, from the tiny random Llama of conftest.py.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from conftest import SAMPLE, run_cli

BAD = Path(__file__).resolve().parent / "data" / "bad"
TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# ---- the broken things the corpus cannot hold as small static files --------------------------------
@dataclass
class World:
    root: Path
    tiny: Path  # a good tiny Llama (hidden size 64)
    models: dict = field(default_factory=dict)  # fault -> model folder
    adapters: dict = field(default_factory=dict)  # fault -> adapter folder
    files: dict = field(default_factory=dict)  # name -> generated file


def _model_copy(src: Path, dst: Path, *, config=True, tokenizer=True, weights=True) -> Path:
    dst.mkdir(parents=True)
    if config:
        shutil.copy(src / "config.json", dst / "config.json")
    if tokenizer:
        for name in TOKENIZER:
            if (src / name).is_file():
                shutil.copy(src / name, dst / name)
    if weights:
        shutil.copy(src / "model.safetensors", dst / "model.safetensors")  # a link out of the folder is refused
    return dst


def _mlx_adapter(dst: Path, hidden: int, rank: int = 4) -> Path:
    """mlx_lm's adapter layout (adapters.safetensors + adapter_config.json) for a model of `hidden` width."""
    import numpy as np
    from safetensors.numpy import save_file

    dst.mkdir(parents=True)
    weights = {}
    for layer in range(2):
        for name, width in (("self_attn.q_proj", hidden), ("self_attn.v_proj", hidden // 2)):
            weights[f"model.layers.{layer}.{name}.lora_a"] = np.zeros((hidden, rank), np.float32)
            weights[f"model.layers.{layer}.{name}.lora_b"] = np.zeros((rank, width), np.float32)
    save_file(weights, str(dst / "adapters.safetensors"))
    (dst / "adapter_config.json").write_text(
        json.dumps(
            {
                "fine_tune_type": "lora",
                "num_layers": 2,
                "lora_parameters": {
                    "rank": rank,
                    "scale": 20.0,
                    "dropout": 0.0,
                    "keys": ["self_attn.q_proj", "self_attn.v_proj"],
                },
            }
        )
    )
    return dst


def _peft_adapter(dst: Path, hidden: int, rank: int = 4) -> Path:
    """A PEFT LoRA adapter (the torch/unsloth backends' layout) for a model of `hidden` width."""
    import numpy as np
    from safetensors.numpy import save_file

    dst.mkdir(parents=True)
    weights = {}
    for layer in range(2):
        for name, width in (("q_proj", hidden), ("v_proj", hidden // 2)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            weights[f"{prefix}.lora_A.weight"] = np.zeros((rank, hidden), np.float32)
            weights[f"{prefix}.lora_B.weight"] = np.zeros((width, rank), np.float32)
    save_file(weights, str(dst / "adapter_model.safetensors"))
    (dst / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": rank,
                "lora_alpha": 2 * rank,
                "lora_dropout": 0.0,
                "target_modules": ["q_proj", "v_proj"],
                "bias": "none",
                "base_model_name_or_path": "another-model",
                "inference_mode": True,
            }
        )
    )
    return dst


@pytest.fixture(scope="module")
def w(tmp_path_factory, tiny_llama_dir) -> World:
    root = tmp_path_factory.mktemp("bad-world")
    world = World(root, tiny_llama_dir)
    m = root / "models"
    world.models["no_config"] = _model_copy(tiny_llama_dir, m / "no_config", config=False)
    world.models["no_tokenizer"] = _model_copy(tiny_llama_dir, m / "no_tokenizer", tokenizer=False)
    unk = _model_copy(tiny_llama_dir, m / "unknown_arch")
    cfg = json.loads((unk / "config.json").read_text())
    cfg.update(model_type="martian", architectures=["MartianForCausalLM"])
    (unk / "config.json").write_text(json.dumps(cfg))
    world.models["unknown_arch"] = unk
    weights = (tiny_llama_dir / "model.safetensors").read_bytes()
    for fault, cut in (("truncated_header", 100), ("truncated_data", len(weights) // 2)):
        d = _model_copy(tiny_llama_dir, m / fault, weights=False)
        (d / "model.safetensors").write_bytes(weights[:cut])
        world.models[fault] = d

    a = root / "adapters"
    world.adapters["other_base"] = _mlx_adapter(a / "other_base", hidden=96)  # trained for a wider model
    world.adapters["peft_other_base"] = _peft_adapter(a / "peft_other_base", hidden=96)
    garbled = a / "garbled"
    garbled.mkdir(parents=True)
    shutil.copy(BAD / "adapter_config_garbled.json", garbled / "adapter_config.json")
    shutil.copy(world.adapters["other_base"] / "adapters.safetensors", garbled / "adapters.safetensors")
    world.adapters["garbled"] = garbled
    no_weights = a / "no_weights"
    no_weights.mkdir()
    shutil.copy(world.adapters["other_base"] / "adapter_config.json", no_weights / "adapter_config.json")
    world.adapters["no_weights"] = no_weights
    cut = a / "truncated"
    cut.mkdir()
    shutil.copy(world.adapters["other_base"] / "adapter_config.json", cut / "adapter_config.json")
    whole = (world.adapters["other_base"] / "adapters.safetensors").read_bytes()
    (cut / "adapters.safetensors").write_bytes(whole[:60])
    world.adapters["truncated"] = cut

    f = root / "files"
    f.mkdir()
    world.files["binary"] = f / "binary.jsonl"
    world.files["binary"].write_bytes(bytes(range(256)) * 64)
    world.files["huge"] = f / "huge_record.jsonl"  # one record of ~300 kB: 150x what --max-seq-length allows
    world.files["huge"].write_text(
        json.dumps(
            {
                "Question": "Summarise this case history.",
                "Complex_CoT": "The patient reports pain. " * 12000,
                "Response": "A long history.",
            }
        )
        + "\n",
        encoding="utf-8",
    )
    import pyarrow as pa
    import pyarrow.parquet as pq

    world.files["parquet"] = f / "wrong_type.parquet"
    pq.write_table(
        pa.table({"Question": ["What is a pulse?"], "Complex_CoT": ["The heartbeat in an artery."], "Response": [72]}),
        world.files["parquet"],
    )
    return world


# ---- the table ------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    code: int
    build: Callable  # (world, tmp) -> argument list
    names: tuple  # substrings the error line must hold: the file, line or record, field
    out: str | None = "out"  # the output (relative to the case folder) that must not exist afterwards


def C(id, code, build, *names, out="out"):
    return pytest.param(Case(id, code, build, names, out), id=id)


def B(name):
    return BAD / name


def prep(src, *extra):
    """`medtune prepare SRC --model TINY --out OUT ...`; SRC a corpus name, a Path or a world.files key."""

    def build(w, t):
        path = w.files[src] if isinstance(src, str) and src in w.files else (src if isinstance(src, Path) else B(src))
        return ["prepare", path, "--model", w.tiny, "--out", t / "out", *extra]

    return build


def train(data=None, model=None, *extra):
    def build(w, t):
        return [
            "train",
            "--model",
            w.models[model] if model else w.tiny,
            "--data",
            B(data or "train_data_ok"),
            "--out",
            t / "out",
            "--iters",
            "1",
            "--batch-size",
            "1",
            *extra,
        ]

    return build


def fuse(adapter=None, model=None, *extra):
    def build(w, t):
        a = w.adapters[adapter] if adapter in w.adapters else t / "no-such-adapter"
        return ["fuse", "--model", w.models[model] if model else w.tiny, "--adapter", a, "--out", t / "out", *extra]

    return build


def export(model=None, *extra):
    def build(w, t):
        src = w.models[model] if model in (w.models or {}) else (t / "no-such-model" if model else w.tiny)
        return ["export", src, "--out", t / "out", "--modelfile", t / "out.Modelfile", *extra]

    return build


def gguf(name):
    return lambda w, t: ["gguf", "inspect", B(name) if name else t / "missing.gguf"]


def fidelity(name):
    return lambda w, t: ["eval", "fidelity", w.tiny, B(name), "--limit", "1"]


def run(name, *extra):
    return lambda w, t: ["run", *([B(name)] if name else []), *extra]


CASES = [
    # prepare: data files
    C("prepare-truncated-json", 2, prep("truncated.json"), "truncated.json:3", "invalid JSON"),
    C("prepare-jsonl-bad-middle-line", 2, prep("bad_line_middle.jsonl"), "bad_line_middle.jsonl:3", "invalid JSON"),
    C("prepare-csv-unbalanced-quote", 2, prep("unbalanced_quotes.csv"), "unbalanced_quotes.csv:3", "malformed CSV"),
    C("prepare-csv-ragged-row", 2, prep("ragged_row.csv"), "ragged_row.csv:3", "columns"),
    C("prepare-csv-duplicate-header", 2, prep("duplicate_header.csv"), "duplicate_header.csv:1", "Response"),
    C("prepare-wrong-field-type", 2, prep("wrong_type.jsonl"), "wrong_type.jsonl:2", "'Response'", "int"),
    C("prepare-missing-field", 2, prep("missing_field.jsonl"), "missing_field.jsonl:2", "'response'"),
    C("prepare-empty-file", 2, prep("empty.jsonl"), "empty.jsonl", "empty"),
    C("prepare-binary-file", 2, prep("binary"), "binary.jsonl", "binary"),
    C("prepare-not-utf8", 2, prep("latin1.jsonl"), "latin1.jsonl:2", "UTF-8"),
    C("prepare-enormous-record", 2, prep("huge"), "huge_record.jsonl:1", "max-seq-length"),
    C("prepare-json-object-not-list", 2, prep("not_a_list.json"), "not_a_list.json", "list of records"),
    C(
        "prepare-json-array-with-string",
        2,
        prep("array_with_string.json"),
        "array_with_string.json[1]",
        "not an object",
    ),
    C(
        "prepare-unknown-fields",
        2,
        prep("unknown_fields.jsonl"),
        "unknown_fields.jsonl:1",
        "cannot tell the dataset format",
    ),
    C("prepare-alpaca-bad-history", 2, prep("alpaca_bad_history.json"), "alpaca_bad_history.json[1]", "history"),
    C(
        "prepare-alpaca-output-not-text",
        2,
        prep("alpaca_output_not_text.json"),
        "alpaca_output_not_text.json[0]",
        "'output'",
        "dict",
    ),
    C(
        "prepare-sharegpt-unknown-role",
        2,
        prep("sharegpt_unknown_role.jsonl"),
        "sharegpt_unknown_role.jsonl:2",
        "conversations[1]",
        "'doctor'",
    ),
    C(
        "prepare-sharegpt-ends-with-user",
        2,
        prep("sharegpt_ends_with_user.jsonl"),
        "sharegpt_ends_with_user.jsonl:1",
        "assistant",
    ),
    C(
        "prepare-sharegpt-not-a-list",
        2,
        prep("sharegpt_not_a_list.jsonl"),
        "sharegpt_not_a_list.jsonl:1",
        "'conversations'",
        "list",
    ),
    C(
        "prepare-chat-content-not-text",
        2,
        prep("chat_content_not_text.jsonl"),
        "chat_content_not_text.jsonl:2",
        "messages[1].content",
        "list",
    ),
    C(
        "prepare-o1-missing-cot",
        2,
        prep("o1_missing_cot.jsonl", "--format", "medical-o1"),
        "o1_missing_cot.jsonl:2",
        "'complex_cot'",
    ),
    C("prepare-cmedqa2-missing-column", 2, prep("cmedqa2_missing_column"), "question.csv:1", "'content'"),
    C("prepare-parquet-garbage", 2, prep("not_parquet.parquet"), "not_parquet.parquet", "parquet"),
    C("prepare-parquet-wrong-type", 2, prep("parquet"), "wrong_type.parquet[0]", "'Response'", "int"),
    C("prepare-unsupported-suffix", 2, prep("notes.txt"), "notes.txt", "unsupported file type .txt"),
    C(
        "prepare-dataset-not-found",
        2,
        prep(Path("/nonexistent/medtune-data.jsonl")),
        "/nonexistent/medtune-data.jsonl",
        "not found",
    ),
    C("prepare-unknown-format", 2, prep(SAMPLE, "--format", "medical-o2"), "--format", "'medical-o2'"),
    C(
        "prepare-out-is-a-file",
        2,
        lambda w, t: ["prepare", SAMPLE, "--model", w.tiny, "--out", B("notes.txt")],
        "notes.txt",
        "--out",
    ),
    C(
        "prepare-model-without-config",
        2,
        lambda w, t: ["prepare", SAMPLE, "--model", w.models["no_config"], "--out", t / "out"],
        "no_config",
        "config.json",
    ),
    C(
        "prepare-model-without-tokenizer",
        2,
        lambda w, t: ["prepare", SAMPLE, "--model", w.models["no_tokenizer"], "--out", t / "out"],
        "no_tokenizer",
        "no tokenizer",
    ),
    # train: data folder, model folder, --config, options
    C("train-jsonl-bad-line", 2, train("train_bad_line"), "train_bad_line/train.jsonl:2", "invalid JSON"),
    C("train-jsonl-not-utf8", 2, train("train_not_utf8"), "train_not_utf8/train.jsonl:2", "UTF-8"),
    C("train-jsonl-not-object", 2, train("train_not_object"), "train_not_object/train.jsonl:2", "not an object"),
    C("train-record-without-fields", 2, train("train_no_fields"), "train_no_fields/train.jsonl:2", "prompt/completion"),
    C("train-no-valid-jsonl", 2, train("train_no_valid"), "valid.jsonl", "train_no_valid"),
    C("train-model-without-config", 2, train(None, "no_config"), "no_config", "config.json"),
    C("train-model-without-tokenizer", 2, train(None, "no_tokenizer"), "no_tokenizer", "no tokenizer"),
    C("train-model-unknown-architecture", 2, train(None, "unknown_arch"), "unknown_arch/config.json", "'martian'"),
    C(
        "train-model-truncated-safetensors",
        2,
        train(None, "truncated_header"),
        "truncated_header/model.safetensors",
        "truncated",
    ),
    C(
        "train-config-unknown-key",
        2,
        train(None, None, "--config", B("train_unknown_key.yaml")),
        "train_unknown_key.yaml",
        "'learning_rate'",
    ),
    C(
        "train-config-not-a-mapping",
        2,
        train(None, None, "--config", B("train_not_mapping.yaml")),
        "train_not_mapping.yaml",
        "mapping",
    ),
    C(
        "train-config-bad-yaml",
        2,
        train(None, None, "--config", B("train_bad_syntax.yaml")),
        "train_bad_syntax.yaml:",
        "invalid YAML",
    ),
    C(
        "train-config-wrong-type",
        2,
        train(None, None, "--config", B("train_wrong_type.yaml")),
        "train_wrong_type.yaml",
        "'iters'",
    ),
    C("train-option-iters-zero", 2, train(None, None, "--iters", "0"), "--iters"),
    C("train-option-unknown-backend", 2, train(None, None, "--backend", "tpu"), "'tpu'"),
    # fuse: adapters and base models
    C("fuse-adapter-for-another-base", 2, fuse("other_base"), "other_base", "does not fit", "shape"),
    C(
        "fuse-peft-adapter-for-another-base",
        2,
        fuse("peft_other_base"),
        "peft_other_base",
        "does not fit",
        "size mismatch",
    ),
    C("fuse-adapter-missing", 2, fuse(None), "no-such-adapter", "adapter_config.json"),
    C("fuse-adapter-config-garbled", 2, fuse("garbled"), "garbled/adapter_config.json:", "not valid JSON"),
    C("fuse-adapter-without-weights", 2, fuse("no_weights"), "no_weights", "adapters.safetensors"),
    C("fuse-adapter-truncated", 2, fuse("truncated"), "truncated/adapters.safetensors", "truncated"),
    C("fuse-model-without-config", 2, fuse("other_base", "no_config"), "no_config", "config.json"),
    C("fuse-model-without-tokenizer", 2, fuse("other_base", "no_tokenizer"), "no_tokenizer", "no tokenizer"),
    C(
        "fuse-model-unknown-architecture",
        2,
        fuse("other_base", "unknown_arch"),
        "unknown_arch/config.json",
        "'martian'",
    ),
    C(
        "fuse-model-truncated-header",
        2,
        fuse("other_base", "truncated_header"),
        "truncated_header/model.safetensors",
        "header is truncated",
    ),
    C(
        "fuse-model-truncated-data",
        2,
        fuse("other_base", "truncated_data"),
        "truncated_data/model.safetensors",
        "data is truncated",
    ),
    C("fuse-option-bad-dtype", 2, fuse("other_base", None, "--dtype", "float8"), "--dtype"),
    # export
    C("export-model-without-config", 2, export("no_config"), "no_config", "config.json"),
    C("export-model-without-tokenizer", 2, export("no_tokenizer"), "no_tokenizer", "tokenizer.json"),
    C(
        "export-unknown-architecture",
        2,
        export("unknown_arch", "--converter", "medtune"),
        "unknown_arch/config.json",
        "'MartianForCausalLM'",
    ),
    C(
        "export-truncated-header",
        2,
        export("truncated_header"),
        "truncated_header/model.safetensors",
        "header is truncated",
    ),
    C("export-truncated-data", 2, export("truncated_data"), "truncated_data/model.safetensors", "data is truncated"),
    C("export-model-missing", 2, export("missing"), "no-such-model", "does not exist"),
    C("export-bad-quant-type", 2, export(None, "--quant", "q9_k"), "'q9_k'"),
    C("export-bad-name", 2, export(None, "--name", "my model!"), "'my model!'"),
    # gguf inspect
    C("gguf-inspect-bad-magic", 2, gguf("bad_magic.gguf"), "bad_magic.gguf", "magic", out=None),
    C("gguf-inspect-empty", 2, gguf("empty.gguf"), "empty.gguf", "magic", out=None),
    C(
        "gguf-inspect-truncated-header",
        2,
        gguf("truncated_header.gguf"),
        "truncated_header.gguf",
        "past the end",
        out=None,
    ),
    C(
        "gguf-inspect-truncated-data",
        2,
        gguf("truncated_data.gguf"),
        "truncated_data.gguf",
        "truncated",
        "output_norm.weight",
        out=None,
    ),
    C("gguf-inspect-missing", 2, gguf(None), "missing.gguf", out=None),
    # eval fidelity
    C("fidelity-bad-magic", 2, fidelity("bad_magic.gguf"), "bad_magic.gguf", "magic", out=None),
    C("fidelity-empty", 2, fidelity("empty.gguf"), "empty.gguf", "magic", out=None),
    C(
        "fidelity-truncated-header",
        2,
        fidelity("truncated_header.gguf"),
        "truncated_header.gguf",
        "past the end",
        out=None,
    ),
    C("fidelity-truncated-data", 2, fidelity("truncated_data.gguf"), "truncated_data.gguf", "truncated", out=None),
    # run
    C("run-unknown-key", 2, run("run_unknown_key.yaml"), "run_unknown_key.yaml", "'run_dir'", out="runs"),
    C(
        "run-unknown-section-key",
        2,
        run("run_unknown_section_key.yaml"),
        "run_unknown_section_key.yaml",
        "'learning_rate'",
        "'train'",
        out="runs",
    ),
    C("run-not-a-mapping", 2, run("run_not_mapping.yaml"), "run_not_mapping.yaml", "mapping", out="runs"),
    C("run-bad-yaml", 2, run("run_bad_syntax.yaml"), "run_bad_syntax.yaml:", "invalid YAML", out="runs"),
    C(
        "run-section-not-a-mapping",
        2,
        run("run_section_not_mapping.yaml"),
        "run_section_not_mapping.yaml",
        "'train'",
        out="runs",
    ),
    C("run-unknown-stage", 2, run(None, "--from", "finetune"), "'finetune'", out="runs"),
    C("run-config-missing", 2, run("no_such_run.yaml"), "no_such_run.yaml", "not found", out="runs"),
]


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def corpus_listing():
    return {p: p.stat().st_mtime_ns for p in BAD.rglob("*")}


@pytest.mark.parametrize("case", CASES)
def test_bad_input(case: Case, w, tmp_path, corpus_listing):
    work = tmp_path / "work"  # the command's working directory and its outputs' parent
    work.mkdir()
    args = case.build(w, work)
    before = _listing(work)
    res = run_cli(*args, cwd=work, timeout=300)
    text = res.stdout + res.stderr
    shown = f"$ medtune {' '.join(map(str, args))}\n{text}"
    assert "Traceback" not in text, shown
    assert res.returncode == case.code, shown
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, shown
    print(f"{case.id}: exit {res.returncode}: {errors[0]}")  # shown with -rP: the corpus's messages at a glance
    for part in case.names:
        assert part in errors[0], f"{part!r} not in the error line\n{shown}"
    assert any(line.startswith("hint:") and line[5:].strip() for line in text.splitlines()), shown
    written = _listing(work) ^ before
    if case.out:
        assert not (work / case.out).exists(), shown
    assert not written, f"written: {written}\n{shown}"  # no output, no temp or lock files
    assert {p: p.stat().st_mtime_ns for p in BAD.rglob("*")} == corpus_listing  # inputs untouched


def test_corpus_is_listed_and_small():
    readme = (BAD / "README.md").read_text(encoding="utf-8")
    files = [p for p in BAD.rglob("*") if p.is_file() and p.name != "README.md"]
    for p in files:
        name = p.relative_to(BAD).as_posix()
        assert (name if p.parent == BAD else p.parent.name + "/") in readme, f"{name} is not in README.md"
    assert sum(p.stat().st_size for p in files) < 50_000


def test_enough_cases_across_stages():
    ids = [c.values[0].id for c in CASES]
    assert len(ids) == len(set(ids)) >= 35
    for stage in ("prepare", "train", "fuse", "export", "gguf", "fidelity", "run"):
        assert sum(i.startswith(stage) for i in ids) >= 3, stage


def test_debug_shows_the_traceback(tmp_path, tiny_llama_dir):
    res = run_cli(
        "--debug",
        "prepare",
        B("bad_line_middle.jsonl"),
        "--model",
        tiny_llama_dir,
        "--out",
        tmp_path / "out",
        cwd=tmp_path,
    )
    assert res.returncode != 0
    assert "Traceback" in res.stderr and "bad_line_middle.jsonl:3" in res.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_train_config_values_are_applied_and_checked(tmp_path, tiny_llama_dir):
    """The YAML --config reaches the options (typer vendors click: its ParameterSource is its own)."""
    cfg = tmp_path / "train.yaml"
    cfg.write_text("iters: 3\nbatch_size: 2\nlr: 2e-4\ntarget_modules: [q_proj, v_proj]\n", encoding="utf-8")
    res = run_cli(
        "train",
        "--config",
        cfg,
        "--model",
        tiny_llama_dir,
        "--data",
        B("train_data_ok"),
        "--out",
        tmp_path / "out",
        "--dry-run",
        "--json",
        "--iters",
        "2",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    pf = json.loads(res.stdout)["preflight"]
    assert pf["steps"] == 2  # the flag wins over the file
    assert pf["trainable_parameters"] < 16_384  # only q_proj and v_proj: the file's target_modules applied
