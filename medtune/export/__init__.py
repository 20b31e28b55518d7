"""Export stage: HF safetensors folder -> GGUF file(s) + Ollama Modelfile + manifest.

    result = export("models/run1", "models/run1", "medtune-run1", quants=("f16",))
    print(result.ollama_commands)

Everything that can be refused (architecture, tensors, tokenizer, chat template, Modelfile values,
disk space) is checked before the first file is written. Each file is written under a temporary
name and renamed into place.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from medtune.core.errors import BadInput
from medtune.core.lock import holds as _holds_lock
from medtune.core.options import from_kwargs
from medtune.export.gguf_reader import file_type_name, read_gguf_header
from medtune.export.options import ExportOptions

__all__ = ["ExportResult", "export", "inspect_gguf", "modelfile_from", "ollama_commands", "read_gguf_header"]


@dataclass
class ExportResult:
    name: str
    gguf_paths: dict[str, Path]  # quant -> file
    modelfile_path: Path
    modelfile_text: str
    family: str
    stops: list[str]
    system: str | None
    manifest_path: Path
    ollama_commands: list[str]
    summaries: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    converter: str = "medtune"  # "medtune" or "llama.cpp"
    quantizer: str | None = None  # what made the K-quants, if any

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "gguf_paths": {q: str(p) for q, p in self.gguf_paths.items()},
            "modelfile_path": str(self.modelfile_path),
            "modelfile_text": self.modelfile_text,
            "family": self.family,
            "stops": self.stops,
            "system": self.system,
            "manifest_path": str(self.manifest_path),
            "ollama_commands": self.ollama_commands,
            "summaries": self.summaries,
            "warnings": self.warnings,
            "converter": self.converter,
            "quantizer": self.quantizer,
        }


def ollama_commands(name: str, modelfile_path: str | Path) -> list[str]:
    import shlex

    return [
        f"ollama create {shlex.quote(name)} -f {shlex.quote(str(modelfile_path))}",
        f"ollama run {shlex.quote(name)}",
    ]


def modelfile_from(gguf_path: str | Path, modelfile_path: str | Path) -> str:
    """The FROM value that names `gguf_path` from a Modelfile at `modelfile_path`: relative to the Modelfile's
    folder, which is how Ollama resolves a relative FROM (so the two can move together, to another folder or
    another machine). `./NAME.gguf` beside the Modelfile, `./sub/NAME.gguf` below it, `../models/run/NAME.gguf`
    elsewhere; forward slashes, which Ollama reads on every OS. Absolute only where no relative path exists
    (another drive on Windows)."""
    import os

    gguf_path, folder = Path(gguf_path).absolute(), Path(modelfile_path).absolute().parent
    try:
        rel = Path(os.path.relpath(gguf_path, folder)).as_posix()
    except ValueError:
        return str(gguf_path)
    return rel if rel.startswith("../") else f"./{rel}"


@_holds_lock("out_dir")  # one writer per output folder (medtune.core.lock)
def export(
    model_dir: str | Path,
    out_dir: str | Path,
    name: str,
    opts: ExportOptions | None = None,
    progress=None,
    *,
    modelfile_path: str | Path | None = None,
    params: dict | None = None,
    **fields,
) -> ExportResult:
    """Write `<out_dir>/<name>-<quant>.gguf` for each quant, a Modelfile (FROM the first quant, by a path
    relative to the Modelfile's folder, as Ollama resolves it: `./NAME.gguf`, `../models/run/NAME.gguf`)
    and `<out_dir>/export_manifest.json`.

    The options are ExportOptions: `opts`, or keywords (quants=, system=, family=, converter=, llama_cpp_dir=):
    quants: types, as a list and/or comma-separated ("f16,q4_k_m"): f16 f32 bf16 q8_0 q4_0 (medtune's writer),
        q4_k_m q4_k_s q5_k_m q5_k_s q6_k q3_k_m q2_k (llama.cpp's quantizer, from an F16 GGUF: the f16 file
        when it is asked for too, otherwise a temporary one).
    system: None keeps the chat template's default system prompt (if any); a string replaces it.
    converter: "auto" (medtune's writer for the architectures in medtune.archs.REGISTRY, llama.cpp's
        convert_hf_to_gguf.py for the others), "medtune" or "llama.cpp".
    llama_cpp_dir: a llama.cpp checkout (default: $LLAMA_CPP_DIR), for its converter and llama-quantize.

    All GGUF files are written under temporary names and renamed together once every one is complete: a
    failure leaves no new GGUF (and the previous ones untouched).
    """
    o = from_kwargs(ExportOptions, opts, **fields)
    family = o.family
    model_dir, out_dir, quants = _check_arguments(model_dir, out_dir, name, o.quant)
    system, system_note = training_system(model_dir, o.system)
    # Everything is decided before anything is written: converter, quantizer, tensors, tokenizer, Modelfile.
    job = _decide(model_dir, out_dir, name, quants, modelfile_path, o.converter, o.llama_cpp)
    wrap, wording_note = served_wording(job, model_dir, family)
    mf = _Modelfile(modelfile_from(job.ggufs[quants[0]], job.mf_path), model_dir, system, params, family, wrap)
    mf.render_from(job.vocab)
    _check_resources(job, model_dir)
    summaries, hashes = _write_ggufs(job, model_dir, name, progress)
    if mf.text is None:  # llama.cpp path with a tokenizer medtune does not read: use what llama.cpp wrote
        from medtune.export import llamacpp

        mf.render(llamacpp.vocab_from_gguf(job.ggufs[quants[0]], model_dir))
    from medtune.core import fsutil

    fsutil.write_text(job.mf_path, mf.text)
    options = {"name": name, "quants": quants, "system": system, "params": params, "family": family}
    info = {**mf.info, "warnings": [*mf.info["warnings"], *_arch_notices(job), *system_note, *wording_note]}
    manifest_path = _write_manifest(job, model_dir, options, info, summaries, hashes)
    from medtune.models.card import write_card

    write_card(job.out_dir)  # README.md: what the files are, where they came from, the Ollama lines
    return ExportResult(
        name=name,
        gguf_paths=job.ggufs,
        modelfile_path=job.mf_path,
        modelfile_text=mf.text,
        family=info["family"],
        stops=info["stops"],
        system=info["system"],
        manifest_path=manifest_path,
        ollama_commands=ollama_commands(name, job.mf_path),
        summaries=summaries,
        warnings=info["warnings"],
        converter=job.route.converter,
        quantizer=job.quantizer.describe() if job.quantizer else None,
    )


def training_system(model_dir: Path, given: str | None) -> tuple[str | None, list[str]]:
    """(the Modelfile's SYSTEM, a warning): the one training saw (the fused folder's manifest, from the prepared data)
    unless --system says otherwise, which is allowed but warned about (and recorded in the manifest)."""
    from medtune.data.wording import training_wording, unescape

    trained = training_wording(model_dir).get("system")
    if given is None:
        return trained, []
    given = unescape(given)
    if trained is not None and given != trained:
        return given, [
            f"--system differs from the system prompt training saw ({trained[:60]!r}): the model was tuned to answer "
            "under that one"
        ]
    return given, []


def served_wording(job, model_dir: Path, family: str | None) -> tuple[tuple[str, str] | None, list[str]]:
    """(the text before and after every question, a warning): training's prompt wording (prepare --prompt-template),
    put into the GGUF's chat template and the Modelfile's TEMPLATE so that Ollama and llama-server are sent the plain
    question, as chat and eval are. Only where both templates take it (checked on the probe conversations) and the
    template has one field; otherwise the served model adds only the system prompt, and the warning says so."""
    from medtune.data.wording import training_wording, user_wrap
    from medtune.export.chat_templates import with_user_wording, words_user_turns
    from medtune.export.modelfile import check_user_wording

    template = training_wording(model_dir).get("prompt_template")
    if not template:
        return None, []
    wrap = user_wrap(template)
    why = None
    if wrap is None:
        why = "it needs several fields of a record"
    elif not job.plans or not job.vocab.chat_template:
        why = "llama.cpp's converter writes this GGUF's chat template" if not job.plans else "there is no chat template"
    else:
        why = check_user_wording(model_dir, job.vocab.chat_template, wrap, family)
    if why:
        return None, [f"training's prompt wording {template!r} is not served ({why}): send each question in it"]
    for plan in job.plans.values():
        if not words_user_turns(plan.vocab.chat_template):  # plans may share one vocabulary
            plan.vocab.chat_template = with_user_wording(plan.vocab.chat_template, *wrap)
    return wrap, []


def _arch_notices(job) -> list[str]:
    """What the architecture class says the GGUF leaves out or runs differently (a multimodal model's vision
    tower, a sliding window llama.cpp does not apply)."""
    plan = next(iter(job.plans.values()), None)
    notice = plan.arch.notice() if plan is not None else None
    return [notice] if notice else []


def _check_arguments(model_dir, out_dir, name: str, quants) -> tuple[Path, Path, list[str]]:
    """The model folder (checked for loading), the output folder and the parsed quant list."""
    from medtune.core import safety
    from medtune.export import quantize as qz
    from medtune.ollama import check_name

    model_dir = Path(model_dir)
    out_dir = Path(out_dir).absolute()
    check_name(name, file_stem=True)  # Ollama's rule, without a namespace: the files are named after it
    quants = qz.parse_quants(quants)
    if not model_dir.is_dir():
        raise BadInput(f"model folder {model_dir} does not exist", hint="run `medtune fuse` first")
    model_dir = safety.model_dir_for_loading(model_dir)  # symlinks out, remote code, pickle-only weights
    return model_dir, out_dir, quants


@dataclass
class _Job:
    """What an export will do, decided before anything is written."""

    route: object  # llamacpp.Route
    quants: list[str]  # asked for, in order
    written: list[str]  # written directly (by our writer or llama.cpp's converter), the K-quants' source first
    derived: list[str]  # made by llama.cpp's quantizer from the F16 source
    quantizer: object | None  # quantize.Quantizer
    out_dir: Path
    stem: str
    ggufs: dict[str, Path]  # quant -> final path
    mf_path: Path
    plans: dict  # quant -> gguf_writer.Plan (our writer only)
    vocab: object | None  # tokenizer.Vocab, when medtune reads this tokenizer


def _decide(
    model_dir: Path, out_dir: Path, name: str, quants: list[str], modelfile_path, converter, llama_cpp_dir
) -> _Job:
    """Converter, quantizer, the files and their order, our writer's plans and the vocabulary."""
    from medtune.export import llamacpp
    from medtune.export import quantize as qz

    route = llamacpp.choose(converter, model_dir, llama_cpp_dir)
    direct_types = qz.WRITER_TYPES if route.converter == "medtune" else llamacpp.CONVERTER_TYPES
    derived = [q for q in quants if q not in direct_types]  # made by llama.cpp's quantizer from an F16 GGUF
    quantizer = None
    if derived:
        quantizer = qz.find_quantizer(llama_cpp_dir)
        if quantizer is None:
            raise qz.missing_quantizer(derived, llama_cpp_dir)
    written = [q for q in quants if q in direct_types]
    if derived and qz.SOURCE_TYPE not in written:
        written.insert(0, qz.SOURCE_TYPE)  # a temporary intermediate
    # The source first, so that the K-quants can be made from it.
    written.sort(key=lambda q: q != qz.SOURCE_TYPE if derived else 0)

    stem = name.replace(":", "-")
    ggufs = {q: out_dir / f"{stem}-{q}.gguf" for q in quants}
    mf_path = Path(modelfile_path).absolute() if modelfile_path else out_dir / "Modelfile"
    _check_chat_template(model_dir)
    plans, vocab = _plans_and_vocab(route, model_dir, written)
    return _Job(route, quants, written, derived, quantizer, out_dir, stem, ggufs, mf_path, plans, vocab)


def _check_chat_template(model_dir: Path) -> None:
    """Refuse a chat template llama.cpp's Jinja engine cannot parse: the GGUF carries it, and llama-server --jinja
    (which Ollama >= 0.30 runs) would fail on every chat request."""
    from medtune.export.chat_templates import llama_cpp_refusal
    from medtune.export.tokenizer import chat_template

    refusal = llama_cpp_refusal(chat_template(model_dir) or "")
    if refusal:
        raise BadInput(
            refusal,
            where=str(model_dir),
            hint="rewrite those parts of tokenizer_config.json's chat_template without them (llama.cpp's engine "
            "parses set, if, for, macro, call, filter, break, continue)",
        )


def _plans_and_vocab(route, model_dir: Path, written: list[str]) -> tuple[dict, object | None]:
    """Our writer's plan per type (which reads the vocabulary); on the llama.cpp route, medtune's own reading of
    the tokenizer when it knows it (the same stops as our writer's), else None (read back from its GGUF)."""
    from medtune.export.chat_templates import with_fixed_vars
    from medtune.export.gguf_writer import plan_gguf
    from medtune.export.tokenizer import read_vocab

    if route.converter == "medtune":
        plans = {q: plan_gguf(model_dir, q) for q in written}
        for plan in plans.values():  # the GGUF's template renders with medtune's fixed date, as training did
            if plan.vocab.chat_template:
                plan.vocab.chat_template = with_fixed_vars(plan.vocab.chat_template)
        return plans, plans[written[0]].vocab
    try:
        return {}, read_vocab(model_dir)
    except BadInput:
        return {}, None


class _Modelfile:
    """The Modelfile's text and facts, rendered as soon as the vocabulary is known."""

    def __init__(self, from_path: str, model_dir: Path, system, params, family, wording=None):
        self.from_path, self.model_dir = from_path, model_dir
        self.system, self.params, self.family, self.wording = system, params, family, wording
        self.text: str | None = None
        self.info: dict | None = None

    def render_from(self, vocab) -> None:
        """Render now when the vocabulary is known; otherwise refuse an unknown chat template now, not after
        converting."""
        if vocab is not None:
            self.render(vocab)
        elif self.family is None:
            from medtune.export.modelfile import detect_family

            detect_family(self.model_dir)

    def render(self, vocab) -> None:
        from medtune.export.modelfile import render_modelfile

        self.text, self.info = render_modelfile(
            self.from_path,
            self.model_dir,
            system=self.system,
            params=self.params,
            family=self.family,
            vocab=vocab,
            wording=self.wording,
        )


def _check_resources(job: _Job, model_dir: Path) -> None:
    """Disk for every file, and memory for our writer (one tensor and its quantized copy, plus the vocabulary)."""
    from medtune.export import quantize as qz
    from medtune.export.gguf_writer import check_disk, estimate_bytes

    n_params = _n_params(model_dir)
    need = sum(
        estimate_bytes(job.plans[q]) if q in job.plans else int(n_params * qz.BITS[q] / 8) + (8 << 20)
        for q in dict.fromkeys([*job.written, *job.quants])
    )
    check_disk(job.ggufs[job.quants[0]], need)
    if job.plans:
        from medtune.core.resources import check_memory

        biggest = max((math.prod(s) for s in job.plans[job.written[0]].ckpt.shape.values()), default=0)
        check_memory(
            biggest * 4 * 3 + (256 << 20),
            "writing the GGUF",
            hint="close other programs, or export on a bigger machine",
        )


def _input_files(job: _Job, model_dir: Path) -> list[Path]:
    """The files the manifest hashes: config, tokenizer, template, index and the weights."""
    from medtune.export.gguf_writer import Checkpoint

    weight_files = job.plans[job.written[0]].ckpt.files if job.plans else _weight_files(model_dir, Checkpoint)
    return [
        model_dir / f
        for f in (
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
            "chat_template.jinja",
            "model.safetensors.index.json",
        )
        if (model_dir / f).is_file()
    ] + weight_files


def _write_ggufs(job: _Job, model_dir: Path, name: str, progress) -> tuple[list[dict], dict[Path, str]]:
    """Every GGUF under a temporary name, renamed together once all are complete; (summaries in the order asked
    for, input hashes). The manifest's input hashes are computed in a background thread meanwhile (hashlib
    releases the GIL): on a 2-core machine this hides the ~1-2 s of hashing a 0.5 GB checkpoint."""
    import contextlib
    import os

    from medtune.core import fsutil
    from medtune.export import quantize as qz

    source = qz.SOURCE_TYPE
    summaries: dict[str, dict] = {}
    fsutil.sweep(job.out_dir / f"{job.stem}-{source}.gguf")  # an intermediate a killed export left behind
    with contextlib.ExitStack() as stack:
        hashing = stack.enter_context(_Hasher(_input_files(job, model_dir)))
        tmp = {q: stack.enter_context(fsutil.atomic_path(job.ggufs[q])) for q in job.quants}
        if source in job.written and source not in tmp:
            tmp[source] = stack.enter_context(
                _scratch(job.out_dir / f".{job.stem}-{source}.intermediate-{os.getpid()}.gguf")
            )
        for q in job.written:
            s = _write_one(job, model_dir, name, q, tmp[q], progress)
            if q in job.ggufs:
                summaries[q] = s
        for q in job.derived:
            summaries[q] = qz.quantize_gguf(
                tmp[source], tmp[q], q, job.quantizer, progress, label=f"quantizing {job.stem}-{q}.gguf"
            )
            summaries[q]["quantized_from"] = source
    for q, s in summaries.items():  # the summaries speak of the files under their final names
        s.update(path=str(job.ggufs[q]), bytes=job.ggufs[q].stat().st_size)
        s.setdefault("converter", "medtune" if job.route.converter == "medtune" else "llama.cpp")
    return [summaries[q] for q in job.quants], hashing.result()


def _write_one(job: _Job, model_dir: Path, name: str, q: str, tmp: Path, progress) -> dict:
    """One directly written GGUF: our writer's, or llama.cpp's converter's."""
    from medtune.export import llamacpp
    from medtune.export.gguf_writer import write_gguf

    label = f"writing {job.stem}-{q}.gguf" if q in job.ggufs else f"writing the {q} intermediate"
    if job.route.converter == "medtune":
        return write_gguf(model_dir, tmp, q, progress, name=name, plan=job.plans[q], label=label)
    return llamacpp.convert(
        job.route, model_dir, tmp, q, progress, name=name, label=label.replace("writing", "converting (llama.cpp)")
    )


def _write_manifest(
    job: _Job, model_dir: Path, options: dict, info: dict, summaries: list[dict], hashes: dict[Path, str]
) -> Path:
    from medtune import __version__
    from medtune.core import fsutil, redact

    route, quantizer = job.route, job.quantizer
    inputs = {"model_dir": str(model_dir.absolute()), "files": {f.name: h for f, h in hashes.items()}}
    outputs = {
        str(p): {"sha256": fsutil.sha256_file(p), "bytes": p.stat().st_size} for p in [*job.ggufs.values(), job.mf_path]
    }
    manifest = {
        "stage": "export",
        "inputs": inputs,
        "options": {
            **options,
            "modelfile_path": str(job.mf_path),
            "converter": route.converter,
            "llama_cpp_dir": str(route.checkout) if route.checkout else None,
        },
        "result": {
            "family": info["family"],
            "stops": info["stops"],
            "system": info["system"],
            "default_system": info["default_system"],
            "prompt_wording": info.get("wording"),  # [before, after] the plain question, in both templates
            "parameters": info["params"],
            "warnings": info["warnings"],
            "gguf": summaries,
            "quantizer": quantizer.describe() if quantizer else None,
        },
        "outputs": outputs,
        "versions": _versions(__version__),
    }
    return redact.write_json(job.out_dir / "export_manifest.json", manifest)


class _Hasher:
    """sha256 of files in a background thread. Leaving the `with` block on an error stops it promptly;
    on success the thread goes on and result() waits for it."""

    def __init__(self, files: list[Path]):
        import threading

        self.files, self.hashes, self.error = files, {}, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="medtune-hash", daemon=True)

    def _run(self) -> None:
        import hashlib

        try:
            for f in self.files:
                h = hashlib.sha256()
                with open(f, "rb") as fh:
                    while block := fh.read(1 << 22):
                        if self._stop.is_set():
                            return
                        h.update(block)
                self.hashes[f] = h.hexdigest()
        except OSError as exc:
            self.error = exc

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self._stop.set()
            self._thread.join()
        return False

    def result(self) -> dict[Path, str]:
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.hashes


def _scratch(path: Path):
    """A temporary file that is removed whatever happens (the F16 intermediate of K-quants)."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)

    return cm()


def _n_params(model_dir: Path) -> int:
    """Parameters in the checkpoint, from the safetensors headers (0 when there are none to read)."""
    from medtune.export.gguf_writer import Checkpoint

    try:
        ckpt = Checkpoint(model_dir)
    except BadInput:
        return 0
    return sum(math.prod(s) for s in ckpt.shape.values())


def _weight_files(model_dir: Path, checkpoint_cls) -> list[Path]:
    try:
        return checkpoint_cls(model_dir).files
    except BadInput:  # llama.cpp's converter also reads PyTorch .bin checkpoints
        return sorted(model_dir.glob("pytorch_model*.bin"))


def _versions(medtune_version: str) -> dict:
    from medtune.core.versions import versions

    return {
        "medtune": medtune_version,
        "python": sys.version.split()[0],
        **versions(("gguf", "transformers", "safetensors", "numpy"), missing=True, own=False),
    }


# ---- reading GGUF files back ---------------------------------------------------------------------------
def inspect_gguf(path: str | Path, *, head: int = 5) -> dict:
    """What a GGUF file holds: the facts that decide how it runs (architecture, context, tokenizer, chat
    template, file type), its metadata (long arrays summarised) and its tensors (shapes in GGUF order,
    innermost dimension first, as llama.cpp prints them)."""
    header = read_gguf_header(path, head=head, full_arrays=("tokenizer.ggml.tokens",))
    meta, tensors = header["metadata"], header["tensors"]
    tokens = meta.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and len(tokens) > head:  # read whole for the bos/eos texts, shown summarised
        meta["tokenizer.ggml.tokens"] = {"len": len(tokens), "head": tokens[:head]}
    arch = meta.get("general.architecture")

    def arch_key(key):
        return meta.get(f"{arch}.{key}") if arch else None

    n_tokens = len(tokens) if isinstance(tokens, list) else None
    template = meta.get("tokenizer.chat_template")
    types: dict[str, int] = {}
    type_bytes: dict[str, int] = {}
    for t in tensors:
        types[t["type"]] = types.get(t["type"], 0) + 1
        type_bytes[t["type"]] = type_bytes.get(t["type"], 0) + t["bytes"]

    def token(key):
        idx = meta.get(key)
        if idx is None:
            return None
        text = None
        if isinstance(tokens, list) and 0 <= idx < len(tokens):
            text = tokens[idx]
        return {"id": idx, "text": text}

    path = Path(path)
    return {
        "path": str(path),
        "bytes": path.stat().st_size,
        "version": header["version"],
        "architecture": arch,
        "name": meta.get("general.name"),
        "file_type": meta.get("general.file_type"),
        "file_type_name": _file_type_name(meta.get("general.file_type")),
        "context_length": arch_key("context_length"),
        "embedding_length": arch_key("embedding_length"),
        "block_count": arch_key("block_count"),
        "vocab_size": arch_key("vocab_size") or n_tokens,
        "tokenizer_model": meta.get("tokenizer.ggml.model"),
        "pre_tokenizer": meta.get("tokenizer.ggml.pre"),
        "bos": token("tokenizer.ggml.bos_token_id"),
        "eos": token("tokenizer.ggml.eos_token_id"),
        "eot": token("tokenizer.ggml.eot_token_id"),
        "add_bos": meta.get("tokenizer.ggml.add_bos_token"),
        "chat_template": bool(template),
        "chat_template_first_line": template.strip().splitlines()[0]
        if isinstance(template, str) and template.strip()
        else None,
        "metadata": meta,
        "n_tensors": len(tensors),
        "n_params": sum(math.prod(t["shape"]) for t in tensors),
        "tensor_types": types,
        "tensor_bytes": type_bytes,
        "tensors": tensors,
    }


def _file_type_name(value) -> str | None:
    if value is None:
        return None
    try:
        return file_type_name(value)
    except (ValueError, TypeError):
        return f"unknown ({value})"
