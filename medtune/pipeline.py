"""`medtune run`: prepare → train → fuse → export → ollama → eval from one YAML, skipping what is done.

    result = run_pipeline("medtune.yaml")            # or a dict; see DEFAULT_CONFIG for the keys
    print(result["stages"], result["report"])

The results land where the project keeps them: adapters/<name>/, models/<name>/ (the fused model and its GGUFs)
and Modelfiles/<name>.Modelfile (under outputs_dir, by default the folder that holds runs_dir). The run itself
lives in runs/<name>/: config.yaml (the resolved config: `medtune run runs/<name>/config.yaml` reproduces it),
outputs.json (where the results are), data/ (the prepared data), eval/ (the report), stages/<stage>.json (each stage's
fingerprint, inputs, options, result) and run.log.

Each stage has a fingerprint: the content hashes of its inputs (the dataset, the model when it is a local
path, the previous stage's outputs), its options, and the versions of medtune and of the packages that stage
uses (REGISTRY: installing or upgrading a package no stage uses, e.g. torch next to an MLX run, redoes
nothing; one only the eval stage uses redoes only eval). A stage whose
fingerprint equals the one recorded in stages/<stage>.json, and whose outputs are still there, is skipped.
Training that was interrupted (Ctrl-C, a crash) with the same fingerprint resumes from its last checkpoint.
The stages call the library functions (medtune.data.prepare.prepare, medtune.train.train,
medtune.fuse.fuse, medtune.export.export, medtune.ollama, medtune.eval.evaluate.evaluate), not subprocesses.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from medtune.core import options
from medtune.core.config import check_keys, normalise_keys, read_yaml_mapping
from medtune.core.errors import BadInput, MedtuneError, MissingDependency
from medtune.core.options import option
from medtune.core.versions import versions  # a stage's packages' versions, for its fingerprint
from medtune.eval.options import EvalOptions
from medtune.export.options import ExportOptions


# ---- the stages, and the packages each one uses -----------------------------------------------------
@dataclass(frozen=True)
class Stage:
    """One stage of a run (Run.do_<name> does it). packages(run): the distributions whose versions can change
    what the stage writes, for this run's config; their versions (and medtune's) are in its fingerprint and
    its record, and no other package's is."""

    name: str
    packages: Callable[["Run"], tuple[str, ...]]


TEXT = ("transformers", "tokenizers", "jinja2")  # tokenizing and rendering chat templates
FUSE_PACKAGES = {  # per adapter kind (medtune.fuse.adapter_kind)
    "mlx": ("mlx", "mlx-lm", *TEXT),
    "peft": ("torch", "peft", "safetensors", *TEXT),
    "torch-full": ("torch", "safetensors", *TEXT),
}


def _train_packages(run: "Run") -> tuple[str, ...]:
    from medtune.train.backends import backend_class

    extra = ("bitsandbytes",) if run.cfg["train"].get("load_in_4bit") else ()  # QLoRA on CUDA
    return backend_class(run.train_backend()).uses + TEXT + extra


def _fuse_packages(run: "Run") -> tuple[str, ...]:
    return FUSE_PACKAGES.get(run.adapter_kind(), FUSE_PACKAGES["peft"])


def _export_packages(run: "Run") -> tuple[str, ...]:
    from medtune.export.quantize import KQUANTS, parse_quants

    e = run.cfg["export"]
    found = ("gguf", "numpy", "safetensors", *TEXT)
    if any(q in KQUANTS for q in parse_quants(list(e.get("quant") or ["f16"]))):
        found += ("llama-cpp-python",)  # its quantizer makes the K-quants
    if str(e.get("converter") or "") == "llama.cpp":
        found += ("torch",)  # llama.cpp's convert_hf_to_gguf.py reads the weights with torch
    return found


def _eval_packages(run: "Run") -> tuple[str, ...]:
    e = run.cfg["eval"]
    if not e.get("enabled", True):
        return ()
    return ("mlx", "mlx-lm", *TEXT) + (("llama-cpp-python",) if e.get("gguf") else ())


REGISTRY: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("prepare", lambda run: TEXT),
        Stage("train", _train_packages),
        Stage("fuse", _fuse_packages),
        Stage("export", _export_packages),
        Stage("ollama", lambda run: ()),  # the server is not a package: its version is in the stage's result
        Stage("eval", _eval_packages),
    )
}
STAGES = tuple(REGISTRY)
DEFAULT_RUNS = Path("runs")
PREPARED = ("train.jsonl", "valid.jsonl", "test.jsonl")  # a prepared folder's splits
ADAPTER_FILES = ("adapters.safetensors", "adapter_config.json", "adapter_model.safetensors")


def base_stage(stage: str) -> str:
    """train.dpo → train, prepare.dpo → prepare: the REGISTRY entry of a run's stage."""
    return stage.partition(".")[0]


def _path(value) -> Path | None:
    return Path(value) if value else None


DEFAULT_CONFIG_TEXT = """\
# medtune run: one config for the whole chain. Write it with `medtune run --print-config > medtune.yaml`,
# then `medtune run medtune.yaml`. Keys mirror the options of each command (snake_case or dashed).
# A second run skips every stage whose inputs and options did not change; an interrupted run resumes.

name: medtune-smollm2            # the run folder: runs/<name>/
model: builtin:smollm2-135m      # folder, .gguf, builtin:NAME, ORG/NAME (Hub) or modelscope:ORG/NAME
runs_dir: runs                   # runs/<name>/: config, stage records, log, prepared data, eval report
# outputs_dir: .                 # adapters/<name>/, models/<name>/ (fused + GGUFs), Modelfiles/<name>.Modelfile
                                 # (default: the folder that holds runs_dir)
trust_remote_code: false         # true: let a model run its own Python code (auto_map); only models you trust
allow_pickle: false              # true: accept *.bin/*.pt weights when there are no safetensors (weights_only)

prepare:                         # medtune prepare DATASET --model MODEL --out runs/<name>/data
  dataset: data/sample/medical_o1_sample.jsonl   # or a list of sources: [A, {path: B, weight: 0.3, format: alpaca}]
  max_seq_length: 512
  valid_ratio: 0.1
  test_ratio: 0.0
  seed: 42
  reasoning: think               # think | drop | inline
  style: auto
  # format: medical-o1           # detected from the fields when omitted
  # limit: 1000
  # sample: 2000
  # system: "你是一名专业的医生。"     # or @prompts/doctor.txt: every record's system prompt; export, chat, eval use it
  # prompt_template: "问题：{question}\\n回答："   # the wording of every user turn (fields by name, {prompt}: the turn)

train:                           # medtune train --model MODEL --data runs/<name>/data --out adapters/<name>
  backend: auto                  # auto | mlx | torch | unsloth
  fine_tune_type: lora
  iters: 24
  batch_size: 2
  grad_accum: 1
  num_layers: 8
  rank: 8
  lr: 1.0e-4
  lr_schedule: constant
  max_seq_length: 512
  eval_every: 12
  save_every: 12                 # checkpoints: an interrupted run resumes from the last one
  seed: 0
  # steps:                       # train in steps, each from the adapter of the one before (each a stage):
  #   - method: sft              #   each step: this section's options, updated with its own keys
  #   - method: dpo              #   name: (default: the method) → stage train.<name>, adapters/<name>/<step>/
  #     dataset: data/sample/preference_sample.jsonl   # its own data: stage prepare.<name>, runs/<name>/data-<step>/
  #     iters: 12                #   (prepared with the prepare section's options; prepare: {…} overrides them)
  #     lr: 5.0e-6
  #     beta: 0.1

fuse:                            # medtune fuse --model MODEL --adapter adapters/<name> --out models/<name>
  dtype: auto

export:                          # medtune export models/<name> --name <name>
  quant: [f16]                   # f16 f32 bf16 q8_0 q4_0 q4_k_m …
  # system: "You are a careful clinician."
  # lora: true                   # also the adapter as a LoRA GGUF (Ollama's ADAPTER) on a shared base GGUF:
                                 # models/base-<base>/, models/<name>/<name>-lora-f16.gguf, Modelfiles/<name>-lora.Modelfile

ollama:                          # ollama create <name> -f Modelfiles/<name>.Modelfile
  create: auto                   # auto: when an Ollama server answers; true: required; false: never
  # host: http://127.0.0.1:11434

eval:                            # medtune eval models/<name> --data runs/<name>/data --base MODEL --gguf …
  enabled: true
  base: true                     # compare with the base model
  gguf: true                     # evaluate the exported GGUF(s) with llama.cpp (when llama-cpp-python is installed)
  gguf_loss: false               # also their validation loss (llama.cpp keeps context x vocabulary logits)
  max_tokens: 128
  limit: 4                       # held-out questions answered
  # probe_limit: 8
  # threads: 1
  # bench: medqa,cmexam           # medical benchmarks on base, tuned and each GGUF (medtune eval --bench)
  # bench_file: medqa=data/sample/bench/medqa.jsonl,cmexam=data/sample/bench/cmexam.csv
  # shots: 0                      # few-shot examples from the benchmark's dev split
  # bench_limit: 50               # questions per subject
  # scoring: loglik               # or generate (reasoning models: the letter after </think>)
"""


@dataclass
class OllamaStageOptions:
    """The `ollama:` section: create the model in Ollama after export."""

    create: bool | str = option("auto", "auto: when an Ollama server answers; true: required; false: never")
    host: str | None = option(None, "the Ollama server (default: $OLLAMA_HOST or http://127.0.0.1:11434)")


@dataclass
class ExportStageOptions(ExportOptions):
    """The `export:` section: medtune export's options, and whether the adapter is exported too."""

    lora: bool = option(
        False,
        "also the adapter as a LoRA GGUF (Ollama's ADAPTER) on a base GGUF of the first type, shared by every run on "
        "that base: models/base-<base>/, models/<name>/<name>-lora-f16.gguf, Modelfiles/<name>-lora.Modelfile",
    )


@dataclass
class EvalStageOptions(EvalOptions):
    """The `eval:` section: medtune eval's options, and which columns the run's report has."""

    enabled: bool = option(True, "false: no eval stage")
    base: bool = option(True, "compare with the base model")
    gguf: bool = option(True, "evaluate the exported GGUF(s) with llama.cpp")


def _section_options() -> dict[str, type]:
    """Each config section's options dataclass: the keys a section may hold are that dataclass's fields."""
    from medtune.data.options import PrepareOptions
    from medtune.fuse.options import FuseOptions
    from medtune.train.options import TrainOptions

    return {
        "prepare": PrepareOptions,
        "train": TrainOptions,
        "fuse": FuseOptions,
        "export": ExportStageOptions,
        "ollama": OllamaStageOptions,
        "eval": EvalStageOptions,
    }


SECTION_EXTRA = {"prepare": {"dataset"}, "train": {"backend", "steps"}}  # what the stage takes beside its options
STEP_EXTRA = {"name", "dataset", "prepare"}  # what a train step takes beside TrainOptions' fields
TOP_KEYS = {"name", "model", "runs_dir", "outputs_dir", "trust_remote_code", "allow_pickle", *STAGES}


def default_config() -> dict:
    import yaml

    return yaml.safe_load(DEFAULT_CONFIG_TEXT)


def load_config(config: str | Path | dict | None) -> dict:
    """The default config, updated section by section with `config` (a YAML path or a dict); keys checked."""
    where = "config"
    if config is None:
        given = {}
    elif isinstance(config, dict):
        given = copy.deepcopy(config)
    else:
        where = str(config)
        given = read_yaml_mapping(
            config,
            missing_hint="write one with `medtune run --print-config`",
            mapping_hint="see `medtune run --print-config`",
        )
    given = normalise_keys(given)
    check_keys(given, TOP_KEYS, where, "top level")
    cfg = default_config()
    sections = _section_options()
    for key, value in given.items():
        if key not in sections:
            cfg[key] = value
            continue
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise BadInput(f"section {key!r} must be a mapping", where=where, hint=f"{key}:\n  option: value")
        value = normalise_keys(value, options.aliases(sections[key]))  # old spellings (format, map, quants…)
        check_keys(value, options.config_keys(sections[key]) | SECTION_EXTRA.get(key, set()), where, key)
        cfg[key].update(value)
    if "steps" in cfg["train"]:
        cfg["train"]["steps"] = _check_steps(cfg["train"]["steps"], where, sections)
    e = cfg["export"]
    if isinstance(e.get("quant"), str):
        e["quant"] = [e["quant"]]
    from medtune.core import safety

    safety.safe_name(
        cfg.get("name"), "run name", where=where, hint="name: a folder name under runs/, e.g. medtune-smollm2"
    )
    safety.config_flags(cfg, where)  # trust_remote_code / allow_pickle: booleans
    return cfg


def _check_steps(steps, where: str, sections: dict) -> list[dict] | None:
    """train.steps: a list of mappings, each with TrainOptions' keys and name/dataset/prepare; names unique."""
    from medtune.core import safety
    from medtune.train.options import METHODS

    if steps is None:
        return None
    example = "steps:\n  - method: sft\n  - method: dpo\n    dataset: pairs.jsonl"
    if not isinstance(steps, list) or not steps or not all(isinstance(x, dict) for x in steps):
        raise BadInput("train.steps must be a list of mappings", where=where, hint=example)
    out, names = [], set()
    for i, raw in enumerate(steps, 1):
        step = normalise_keys(raw, options.aliases(sections["train"]))
        here = f"train.steps[{i}]"
        check_keys(step, options.config_keys(sections["train"]) | STEP_EXTRA, where, here)
        method = step.get("method", "sft")
        if method not in METHODS:
            raise BadInput(f"{here}: method {method!r} is not one of {', '.join(METHODS)}", where=where, hint=example)
        if i > 1 and step.get("adapter"):
            raise BadInput(
                f"{here}: adapter is set; a later step starts from the adapter of the one before it",
                where=where,
                hint="set adapter on the first step only (an adapter trained elsewhere)",
            )
        name = safety.safe_name(str(step.get("name") or method), f"{here} name", where=where)
        if "." in name or name in names:
            raise BadInput(
                f"{here}: step name {name!r} is {'taken' if name in names else 'not allowed (a dot)'}",
                where=where,
                hint="give each step its own name: e.g. name: sft2",
            )
        names.add(name)
        prep = normalise_keys(step.get("prepare") or {}, options.aliases(sections["prepare"]))
        check_keys(prep, options.config_keys(sections["prepare"]), where, f"{here}.prepare")
        out.append({**step, "name": name, **({"prepare": prep} if prep else {})})
    return out


@dataclass(frozen=True)
class TrainStep:
    """One training step of a run (stage `stage`): its TrainOptions keywords (the train section's, updated with
    the step's; `adapter` is the step before's folder), where it writes (adapter) and reads (data), and its own
    dataset (prepared by stage prepare.<name> with the prepare section's options updated by `prepare`)."""

    name: str
    stage: str
    options: dict
    adapter: Path
    data: Path
    dataset: str | None = None
    prepare: dict | None = None
    start: Path | None = None  # the adapter it starts from (the step before's, or an adapter trained elsewhere)


# ---- hashing and fingerprints ---------------------------------------------------------------------
class Hasher:
    """sha256 of files, cached by (path, size, mtime) in runs/<name>/stages/hashes.json, so that a run with
    nothing to do does not re-read gigabytes."""

    def __init__(self, cache_file: Path | None = None):
        self.cache_file = cache_file
        self.cache = {}
        if cache_file and cache_file.is_file():
            try:
                self.cache = json.loads(cache_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                self.cache = {}

    def file(self, path: Path) -> str:
        from medtune.core.fsutil import sha256_file

        st = path.stat()
        key = str(path.resolve())
        stamp = [st.st_size, st.st_mtime_ns]
        hit = self.cache.get(key)
        if hit and hit[0] == stamp:
            return hit[1]
        digest = sha256_file(path)
        self.cache[key] = [stamp, digest]
        return digest

    def path(self, path: Path, names: tuple[str, ...] | None = None, skip: Callable[[Path], bool] | None = None) -> str:
        """A file's hash, or a folder's: every visible file (or only `names`) by relative path, checkpoints and the
        files `skip` names excluded."""
        path = Path(path)
        if path.is_file():
            return self.file(path)
        if not path.is_dir():
            raise BadInput(f"not found: {path}", hint="check the path in the config")
        h = hashlib.sha256()
        if names is not None:
            files = [path / n for n in names if (path / n).is_file()]
        else:
            files = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and not (skip and skip(p))
                and not any(part.startswith(".") or part == "checkpoints" for part in p.relative_to(path).parts)
            )
        for f in files:
            h.update(f"{f.relative_to(path)}\0{self.file(f)}\n".encode())
        return h.hexdigest()

    def spec(self, spec: str) -> str:
        """A model or dataset spec: a local path is hashed by content, anything else (hub, builtin) by name."""
        p = Path(spec).expanduser()
        return self.path(p) if p.exists() else f"spec:{spec}"

    def save(self) -> None:
        if self.cache_file:
            from medtune.core import redact

            redact.write_json(self.cache_file, self.cache)


def fingerprint(stage: str, inputs: dict, options: dict, vers: dict) -> str:
    """vers: the stage's versions (Run.versions(stage)), not every installed package's."""
    blob = json.dumps(
        {"stage": stage, "inputs": inputs, "options": options, "versions": vers}, sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()


# ---- the run --------------------------------------------------------------------------------------
class Run:
    def __init__(self, cfg: dict, log: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.name = cfg["name"]
        from medtune.core.safety import inside

        runs = Path(cfg.get("runs_dir") or DEFAULT_RUNS)
        self.root = inside(runs, self.name, "run folder")
        # the results where the project keeps them: adapters/<name>/, models/<name>/ (the fused model and its
        # GGUFs), Modelfiles/<name>.Modelfile, under outputs_dir (default: the folder that holds runs_dir)
        top = Path(cfg.get("outputs_dir") or runs.parent)
        adapters = inside(top / "adapters", self.name, "adapter folder")
        self.fused = self.gguf_dir = inside(top / "models", self.name, "model folder")
        self.modelfile = inside(top / "Modelfiles", f"{self.name}.Modelfile", "Modelfile")
        self.lora_modelfile = inside(top / "Modelfiles", f"{self.name}-lora.Modelfile", "Modelfile")
        self.data, self.eval_dir = self.root / "data", self.root / "eval"
        self.steps = self._steps(adapters)
        self.adapter = self.steps[-1].adapter  # what fuse reads: the last step's adapter
        self.stages_dir = self.root / "stages"
        self.hasher = Hasher(self.stages_dir / "hashes.json")
        self._log = log

    def _steps(self, adapters: Path) -> list[TrainStep]:
        """The train section as steps: one (stage train, adapters/<name>/) or train.steps, chained."""
        section = {k: v for k, v in self.cfg["train"].items() if k not in ("backend", "steps")}
        given = self.cfg["train"].get("steps")
        if not given:
            return [TrainStep("", "train", section, adapters, self.data, start=_path(section.get("adapter")))]
        steps: list[TrainStep] = []
        for raw in given:
            name = raw["name"]
            opts = {**section, **{k: v for k, v in raw.items() if k not in STEP_EXTRA}}
            start = steps[-1].adapter if steps else _path(opts.get("adapter"))
            opts["adapter"] = str(start) if start else None
            data = self.root / f"data-{name}" if raw.get("dataset") else self.data
            steps.append(
                TrainStep(
                    name, f"train.{name}", opts, adapters / name, data, raw.get("dataset"), raw.get("prepare"), start
                )
            )
        return steps

    def stages(self) -> list[str]:
        """This run's stages in order: prepare, each train step (after its own prepare.<step>), fuse, …"""
        names = ["prepare"]
        for step in self.steps:
            names += ([f"prepare.{step.name}"] if step.dataset else []) + [step.stage]
        return names + list(STAGES[STAGES.index("fuse") :])

    def step(self, stage: str) -> TrainStep:
        """The train step of stage train[.<name>] or prepare.<name>."""
        name = stage.partition(".")[2]
        return next(s for s in self.steps if s.name == name)

    def versions(self, stage: str) -> dict:
        """The versions that go into `stage`'s fingerprint: medtune's and its packages' (REGISTRY)."""
        return versions(REGISTRY[base_stage(stage)].packages(self))

    def train_backend(self) -> str:
        """The backend the train stages use on this machine ('auto' resolved; the last step's options)."""
        from medtune.train import TrainOptions, resolve_backend

        return resolve_backend(str(self.cfg["train"].get("backend", "auto")), TrainOptions(**self.steps[-1].options))

    def adapter_kind(self) -> str:
        """mlx | peft | torch-full: what the adapter folder holds (else what the train backend writes)."""
        from medtune.fuse import adapter_kind

        try:
            return adapter_kind(json.loads((self.adapter / "adapter_config.json").read_text(encoding="utf-8")))
        except (OSError, ValueError):
            return "mlx" if self.train_backend() == "mlx" else "peft"

    def log(self, line: str) -> None:
        from medtune.core import redact

        line = redact.redact_text(line)  # appended without following a symlink at run.log
        redact.append_line(self.root / "run.log", f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {line}")
        if self._log:
            self._log(line)

    def record_path(self, stage: str) -> Path:
        return self.stages_dir / f"{stage}.json"

    def record(self, stage: str) -> dict | None:
        p = self.record_path(stage)
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return None

    # -- what each stage reads, and how it is fingerprinted
    def needs(self, stage: str) -> tuple[Path, str] | None:
        """(the folder or file `stage` reads, the stage that writes it) for the stages that read an earlier one's."""
        base = base_stage(stage)
        if base == "train":
            step = self.step(stage)
            if step.start is not None and step is not self.steps[0]:
                return step.start, self.steps[self.steps.index(step) - 1].stage
            return step.data, f"prepare.{step.name}" if step.dataset else "prepare"
        return {
            "fuse": (self.adapter, self.steps[-1].stage),
            "export": (self.fused, "fuse"),
            "ollama": (self.modelfile, "export"),
            "eval": (self.fused, "fuse"),
        }.get(base)

    def inputs(self, stage: str) -> tuple[dict, dict]:
        need = self.needs(stage)
        if need and not need[0].exists():
            raise BadInput(
                f"stage {stage} needs {need[0]}, which is not there",
                hint=f"run the earlier stages first (`medtune run` without --only, or --from {need[1]})",
            )
        base = base_stage(stage)
        if base not in REGISTRY:
            raise BadInput(f"unknown stage {stage!r}", hint=f"stages: {', '.join(self.stages())}")
        return getattr(self, f"_inputs_{base}")(stage)

    def _inputs_prepare(self, stage: str) -> tuple[dict, dict]:
        opts, h = self.prepare_options(stage), self.hasher
        given = opts["dataset"]
        if isinstance(given, list):  # several sources: each one's content (a mapping's path)
            found = [h.spec(str(d.get("path") or d.get("dataset")) if isinstance(d, dict) else str(d)) for d in given]
        else:
            found = h.spec(str(given))
        return {"dataset": found, "model": h.spec(str(self.cfg["model"]))}, opts

    def _inputs_train(self, stage: str) -> tuple[dict, dict]:
        h, step = self.hasher, self.step(stage)
        ins = {"model": h.spec(str(self.cfg["model"])), "data": h.path(step.data, PREPARED)}
        if step.start is not None:  # the adapter it continues: its content, not its path
            ins["adapter"] = h.path(step.start, ADAPTER_FILES)
        return ins, {**step.options, "backend": self.cfg["train"].get("backend", "auto")}

    def _inputs_fuse(self, stage: str) -> tuple[dict, dict]:
        h = self.hasher
        return {"model": h.spec(str(self.cfg["model"])), "adapter": h.path(self.adapter, ADAPTER_FILES)}, dict(
            self.cfg["fuse"]
        )

    def _inputs_export(self, stage: str) -> tuple[dict, dict]:
        ins = {"fused": self.fused_hash()}
        if self.cfg["export"].get("lora"):  # the adapter GGUF is written from the adapter and the base
            ins |= {
                "adapter": self.hasher.path(self.adapter, ADAPTER_FILES),
                "base": self.hasher.spec(self.cfg["model"]),
            }
        return ins, {**self.cfg["export"], "name": self.name}

    def _inputs_ollama(self, stage: str) -> tuple[dict, dict]:
        ggufs = sorted(self.gguf_dir.glob("*.gguf")) if self.gguf_dir.is_dir() else []
        return (
            {"modelfile": self.hasher.path(self.modelfile), "gguf": {g.name: self.hasher.path(g) for g in ggufs}},
            {**self.cfg["ollama"], "name": self.name},
        )

    def _inputs_eval(self, stage: str) -> tuple[dict, dict]:
        h, e = self.hasher, self.eval_options()
        ins = {"fused": self.fused_hash(), "data": h.path(self.data, ("valid.jsonl", "test.jsonl"))}
        if e.get("base"):
            ins["base"] = h.spec(str(self.cfg["model"]))
        if e.get("gguf"):
            ins["gguf"] = {g.name: h.path(g) for g in self._ggufs()}
            ins["lora"] = {Path(p).name: h.path(Path(p)) for stack in self._stacks() for p in stack}
        for key in ("probes", "choices"):
            if e.get(key):
                ins[key] = h.spec(str(e[key]))
        if e.get("pairs"):
            ins["pairs"] = h.path(Path(e["pairs"]), ("valid.jsonl", "test.jsonl"))
        if e.get("bench_file"):
            from medtune.eval.exam import bench_names, parse_files

            files = parse_files(e["bench_file"], bench_names(e.get("bench")))
            ins["bench_file"] = {k: h.path(p) for k, p in files.items()}
        return ins, e

    def prepare_options(self, stage: str) -> dict:
        """PrepareOptions keywords and the dataset of stage prepare or prepare.<step>."""
        opts = dict(self.cfg["prepare"])
        if stage != "prepare":
            step = self.step(stage)
            opts.update(step.prepare or {}, dataset=step.dataset)
        return opts

    def eval_options(self) -> dict:
        """The eval section; unless it names pairs, the held-out pairs of the last preference step's own data."""
        e = dict(self.cfg["eval"])
        if not e.get("pairs"):
            own = [s for s in self.steps if s.dataset and s.options.get("method", "sft") != "sft"]
            if own:
                e["pairs"] = str(own[-1].data)
        return e

    def fused_hash(self) -> str:
        """The fused model's content: its folder without the GGUFs and manifest export writes beside it."""
        return self.hasher.path(
            self.fused, skip=lambda p: p.suffix == ".gguf" or p.name in ("export_manifest.json", "README.md")
        )

    def outputs(self, stage: str) -> list[Path]:
        base = base_stage(stage)
        if base == "export":  # fuse replaces models/<name>/ whole, GGUFs included: then export is redone
            return [self.modelfile, *self._ggufs(existing=False), *self._lora_outputs()]
        if base == "prepare":
            data = self.data if stage == "prepare" else self.step(stage).data
            return [data / "train.jsonl", data / "valid.jsonl"]
        if base == "train":
            return [self.step(stage).adapter / "adapter_config.json"]
        return {
            "fuse": [self.fused / "config.json"],
            "ollama": [],
            "eval": [self.eval_dir / "report.html"],
        }[stage]

    def where(self) -> dict:
        """Where this run's results are (runs/<name>/outputs.json)."""
        steps = {s.stage: {"adapter": str(s.adapter), "data": str(s.data)} for s in self.steps if s.name}
        return {
            "data": str(self.data),
            "adapter": str(self.adapter),
            **({"steps": steps} if steps else {}),
            "model": str(self.fused),
            "gguf": [str(g) for g in self._ggufs()],
            "modelfile": str(self.modelfile),
            **({"lora": [str(p) for p in self._lora_outputs()]} if self.cfg["export"].get("lora") else {}),
            "report": str(self.eval_dir / "report.html"),
        }

    def _stacks(self) -> list[tuple[Path, Path]]:
        """(base GGUF, LoRA GGUF) that export.lora wrote, for the eval stage's columns."""
        lora = ((self.record("export") or {}).get("result") or {}).get("lora") or {}
        pair = (Path(lora.get("base_gguf", "")), Path(lora.get("adapter_gguf", "")))
        return [pair] if lora and all(p.is_file() for p in pair) else []

    def _ggufs(self, existing: bool = True) -> list[Path]:
        rec = self.record("export") or {}
        paths = [Path(p) for p in (rec.get("result") or {}).get("gguf_paths", {}).values()]
        return [p for p in paths if p.is_file() or not existing]

    # -- the stages themselves
    def do_prepare(self, stage: str, progress=None, **_) -> dict:
        from medtune.data.prepare import prepare

        opts = self.prepare_options(stage)
        dataset = opts.pop("dataset")
        out = self.data if stage == "prepare" else self.step(stage).data
        res = prepare(dataset, str(self.cfg["model"]), out, progress=progress, **opts)
        return {"counts": res.counts, "out": str(res.out)}

    def do_train(self, stage: str, progress=None, on_step=None, fp: str = "", forced: bool = False, **_) -> dict:
        from medtune.train import TrainOptions, train

        step = self.step(stage)
        started = self.stages_dir / f"{stage}.started.json"
        resume = False
        if step.adapter.exists():
            # resume only a training that started with this fingerprint and did not finish, unless told to redo it
            same = started.is_file() and json.loads(started.read_text(encoding="utf-8")).get("fingerprint") == fp
            finished = (self.record(stage) or {}).get("fingerprint") == fp
            ckpts = step.adapter / "checkpoints"
            if same and not finished and not forced and ckpts.is_dir() and any(ckpts.glob("step-*")):
                resume = True
                self.log(f"{stage}: resuming from the last checkpoint in {ckpts}")
            else:
                shutil.rmtree(step.adapter)  # another fingerprint (or no checkpoint): start afresh
        from medtune.core import fsutil

        fsutil.write_json(started, {"fingerprint": fp})
        res = train(
            str(self.cfg["model"]),
            step.data,
            step.adapter,
            TrainOptions(**step.options),
            backend=str(self.cfg["train"].get("backend", "auto")),
            progress=progress,
            resume=resume,
            on_step=on_step,
        )
        return {k: v for k, v in res.to_dict().items() if k != "preflight"}

    def do_fuse(self, stage: str, progress=None, **_) -> dict:
        from medtune.fuse import fuse

        res = fuse(str(self.cfg["model"]), self.adapter, self.fused, progress=progress, force=True, **self.cfg["fuse"])
        return res.to_dict()

    def do_export(self, stage: str, progress=None, **_) -> dict:
        from medtune.export import export

        opts = {k: v for k, v in self.cfg["export"].items() if k != "lora"}
        res = export(self.fused, self.gguf_dir, self.name, modelfile_path=self.modelfile, progress=progress, **opts)
        d = res.to_dict()
        d.pop("modelfile_text", None)
        if self.cfg["export"].get("lora"):
            d["lora"] = self._export_lora(progress)
        return d

    def _lora_base(self) -> tuple[str, Path, str]:
        """(the base GGUF's type, its folder, its stem) for export.lora: the first type asked for (F16 when that is a
        K-quant, which only llama.cpp's quantizer makes), in models/base-<base>/, shared by the runs on that base."""
        from medtune.export.adapter import base_stem
        from medtune.export.quantize import WRITER_TYPES, parse_quants

        first = parse_quants(list(self.cfg["export"].get("quant") or ["f16"]))[0]
        quant = first if first in WRITER_TYPES else "f16"
        stem = base_stem(str(self.cfg["model"]))
        return quant, self.gguf_dir.parent / f"base-{stem}", stem

    def _lora_outputs(self) -> list[Path]:
        if not self.cfg["export"].get("lora"):
            return []
        from medtune.export.adapter import lora_type

        quant, folder, stem = self._lora_base()
        lora = self.gguf_dir / f"{self.name}-lora-{lora_type(quant)}.gguf"
        return [folder / f"{stem}-{quant}.gguf", lora, self.lora_modelfile]

    def _export_lora(self, progress) -> dict:
        """The adapter as a LoRA GGUF beside the fused GGUFs, on the shared base GGUF (medtune.export.adapter)."""
        from medtune.export.adapter import export_adapter

        quant, folder, _ = self._lora_base()
        e = self.cfg["export"]
        res = export_adapter(
            self.adapter, str(self.cfg["model"]), self.gguf_dir, self.name, quant=quant, base_out=folder,
            modelfile_path=self.lora_modelfile, system=e.get("system"), family=e.get("family"), progress=progress,
        )  # fmt: skip
        d = res.to_dict()
        d.pop("modelfile_text", None)
        return d

    def do_ollama(self, stage: str, progress=None, **_) -> dict:
        from medtune import ollama

        o = self.cfg["ollama"]
        mode = o.get("create", "auto")
        if mode is False or str(mode).lower() in ("false", "no", "off"):
            return {"skipped": "ollama.create is false"}
        try:
            version = ollama.server_version(o.get("host"))
        except MissingDependency as exc:
            if mode is True or str(mode).lower() in ("true", "yes", "on"):
                raise
            return {"skipped": f"no Ollama server answers ({str(exc).splitlines()[0]})"}
        created = ollama.create_from_modelfile(self.name, self.modelfile, host=o.get("host"), progress=progress)
        return {"server_version": version, **{k: v for k, v in created.items() if k != "request"}}

    def do_eval(self, stage: str, progress=None, **_) -> dict:
        import importlib.util

        from medtune.eval.evaluate import evaluate

        e = self.eval_options()
        if not e.get("enabled", True):
            return {"skipped": "eval.enabled is false"}
        ggufs, missing = [*self._ggufs(), *self._stacks()] if e.get("gguf") else [], None
        if ggufs:
            if importlib.util.find_spec("llama_cpp") is None:
                ggufs, missing = (
                    [],
                    (
                        "no GGUF column: llama-cpp-python, the GGUF runtime, is not installed "
                        "(bash scripts/build_llama_cpp.sh .venv/bin/python, or make test)"
                    ),
                )
                self.log(missing)
        fields = {k: v for k, v in e.items() if k in options.config_keys(EvalOptions)}  # not the run's switches
        report = evaluate(
            str(self.fused),
            self.data,
            base=str(self.cfg["model"]) if e.get("base") else None,
            ggufs=ggufs,
            out=self.eval_dir,
            notes=[missing] if missing else [],
            metrics=self.adapter / "metrics.jsonl",
            progress=progress,
            **fields,
        )
        benchmarks = {
            name: {label: r["overall"]["accuracy"] for label, r in cols.items()}
            for name, cols in (report.get("benchmarks") or {}).items()
        }
        return {
            "files": report["files"],
            "metrics": {m["label"]: m["metrics"] for m in report["models"]},
            **({"benchmarks": benchmarks} if benchmarks else {}),
        }


def run_pipeline(
    config: str | Path | dict | None = None,
    *,
    from_stage: str | None = None,
    only: str | None = None,
    force: bool = False,
    progress=None,
    on_step=None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Run the stages in order; skip those whose fingerprint matches their record (unless forced).

    from_stage: redo this stage and every later one (the earlier ones must be done); only: redo just this stage;
    force: redo every stage; on_step(step, metrics): passed to training (notebooks, tests)."""
    if from_stage and only:
        raise BadInput("--from and --only together", hint="use one of them")
    cfg = load_config(config)
    r = Run(cfg, log=log)
    for flag, value in (("--from", from_stage), ("--only", only)):
        if value is not None and not _matching(r.stages(), value):
            raise BadInput(f"{flag} {value!r} is not a stage of this run", hint=f"stages: {', '.join(r.stages())}")
    from medtune.core import lock

    with lock.locked(r.root):  # one `medtune run` per run folder at a time
        return _run_stages(r, cfg, from_stage, only, force, progress, on_step)


def _matching(stages: list[str], name: str) -> list[str]:
    """The stages `name` picks: itself, or every stage of its kind (train: every train step)."""
    return [name] if name in stages else [s for s in stages if base_stage(s) == name]


def _run_stages(r: Run, cfg: dict, from_stage, only, force, progress, on_step) -> dict:
    from medtune.core import fsutil, redact, safety

    r.root.mkdir(parents=True, exist_ok=True)
    import yaml

    fsutil.write_text(
        r.root / "config.yaml",
        "# resolved config of this run: `medtune run "
        + str(r.root / "config.yaml")
        + "` reproduces it\n"
        + yaml.safe_dump(redact.redact(cfg), sort_keys=False, allow_unicode=True),
    )
    every = r.stages()
    if only:
        todo = _matching(every, only)
    elif from_stage:
        todo = every[every.index(_matching(every, from_stage)[0]) :]
    else:
        todo = every
    forced = set(todo) if (force or only or from_stage) else set()
    status: dict[str, str] = {}
    t_run = time.time()
    r.log(f"run {r.name}: stages {', '.join(todo)}" + (" (forced)" if forced else ""))
    try:
        for stage in todo:
            if "llama-cpp-python" in REGISTRY[base_stage(stage)].packages(r):
                from medtune.runtimes import tools

                # make all builds llama.cpp in the background on a fresh machine: its version belongs in the fingerprint
                tools.wait_for_build(note=r.log)
            inputs, options = r.inputs(stage)
            vers = r.versions(stage)
            fp = fingerprint(stage, inputs, options, vers)
            rec = r.record(stage)
            if (
                stage not in forced
                and rec
                and rec.get("fingerprint") == fp
                and all(p.exists() for p in r.outputs(stage))
            ):
                status[stage] = "skipped"
                r.log(f"{stage}: up to date (fingerprint {fp[:12]}), skipped")
                continue
            r.log(f"{stage}: running (fingerprint {fp[:12]})")
            t0 = time.time()
            try:
                with safety.policy(**safety.config_flags(cfg)):  # the config's trust_remote_code / allow_pickle
                    result = getattr(r, f"do_{base_stage(stage)}")(
                        stage, progress=progress, on_step=on_step, fp=fp, forced=stage in forced
                    )
            except MedtuneError as exc:
                if exc.exit_code != 130:  # training's Interrupted (Ctrl-C): say how to go on
                    raise
                r.log(f"{stage}: interrupted: {exc.message}")
                raise type(exc)(
                    exc.message,
                    hint="run the same `medtune run` again: training resumes from this "
                    "checkpoint and the stages already done are skipped",
                ) from exc
            seconds = round(time.time() - t0, 2)
            if isinstance(result, dict) and "skipped" in result and stage == "ollama":
                status[stage] = "not run"  # no fingerprint recorded: tried again next time
                r.log(f"{stage}: not run: {result['skipped']}")
                r.record_path(stage).unlink(missing_ok=True)
                continue
            redact.write_json(
                r.record_path(stage),
                {
                    "stage": stage,
                    "fingerprint": fp,
                    "inputs": inputs,
                    "options": options,
                    "versions": vers,
                    "seconds": seconds,
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "outputs": [str(p) for p in r.outputs(stage)],
                    "result": result,
                },
            )
            status[stage] = "done"
            r.log(f"{stage}: done in {seconds:.1f}s")
    finally:
        r.hasher.save()
    report = r.eval_dir / "report.html"
    r.log(f"run {r.name}: {', '.join(f'{k} {v}' for k, v in status.items())} in {time.time() - t_run:.1f}s")
    fsutil.write_json(r.root / "outputs.json", r.where())  # the run folder points to its results
    return {
        "name": r.name,
        "root": str(r.root),
        "stages": status,
        "outputs": r.where(),
        "report": str(report) if report.is_file() else None,
        "modelfile": str(r.modelfile) if r.modelfile.is_file() else None,
    }
