"""Medical multiple-choice benchmarks: a registry (one entry per benchmark, each parsing its public record shape),
loading from a local copy or a download (Hugging Face Hub, then ModelScope), a seeded per-subject draw, few-shot
examples, the chat conversation for one question, the letter a model chose, and accuracy per subject.

`load(name)` gives Items (question, lettered options, the index of the answer, subject). Records that cannot be
asked as a single-answer question (no published answer, several correct letters) are left out and counted by
reason; a record whose *shape* is wrong (a missing field) is a BadInput naming file:line and the field.
"""

from __future__ import annotations

import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from fnmatch import fnmatch
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

from medtune.core.errors import BadInput

LETTERS = "ABCDEFGHIJ"
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
FILE_HINT = "pass a local copy with --bench-file PATH (a .jsonl/.json/.csv/.parquet file, or a folder of split files)"


@dataclass(frozen=True)
class Item:
    id: str
    subject: str
    question: str
    options: tuple[tuple[str, str], ...]  # (letter, text)
    answer: int  # index into options
    explanation: str | None = None

    @property
    def letters(self) -> str:
        return "".join(letter for letter, _ in self.options)


class Skip(Exception):
    """Raised by a parser: the record cannot be asked as a single-answer question. It is left out and counted
    under its reason (the exception's text)."""


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    lang: str  # "en" | "zh"
    sources: tuple[str, ...]  # tried in order: "hf:<dataset repo id>" or "ms:<ModelScope dataset id>"
    test_split: str  # the public split scored as "test"
    dev_split: str | None  # the public split few-shot examples come from
    subjects: tuple[str, ...] | None  # the medical subset; None = every subject
    parse: Callable[[dict, str], Item | None]  # one raw record and its "file:line" -> Item (or raises Skip)
    files: dict[str, tuple[str, ...]] = field(default_factory=dict, compare=False, hash=False)  # split -> globs
    archives: tuple[str, ...] = ()  # zip files in the public repo holding the split files (extracted once)
    subject_from_file: bool = False  # per-subject files: the subject is the file's name (clinical_medicine_val.csv)
    subject_names: dict[str, str] = field(default_factory=dict, compare=False, hash=False)  # for the instruction

    def subject_label(self, subject: str) -> str:
        return self.subject_names.get(subject) or subject.replace("_", " ")


# ---- reading one record's fields -----------------------------------------------------------------------------------
def _require(raw: dict, where: str, title: str, keys: tuple[str, ...]) -> list:
    """The values of `keys`, or a BadInput naming the first missing field (a file of some other shape)."""
    for key in keys:
        if key not in raw:
            raise BadInput(
                f"{title} record has no field {key!r}",
                where=where,
                hint=f"a {title} record has the fields {', '.join(keys)}: check that --bench matches the file",
            )
    return [raw[k] for k in keys]


def _text(value) -> str:
    """A cell as stripped text: None and NaN (pandas' empty cell) are empty."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value).strip()


def _rid(where: str) -> str:
    """A record's id from its place: "file.jsonl:12" (the folder left out)."""
    return Path(where).name


def _item(rid: str, subject: str, question, options, answer: int, explanation=None) -> Item:
    question = _text(question)
    if not question:
        raise Skip("empty question")
    opts = tuple((letter, _text(text)) for letter, text in options)
    if any(not text for _, text in opts):
        raise Skip("empty option")
    if not 0 <= answer < len(opts):
        raise Skip("answer not among the options")
    return Item(str(rid), subject, question, opts, answer, _text(explanation) or None)


def _letter_answer(value, options) -> int:
    """The index of a one-letter answer among (letter, text) options; Skip when none or several letters."""
    letters = _text(value).upper().replace(" ", "")
    if not letters:
        raise Skip("no answer")
    if len(letters) > 1:
        raise Skip("multiple answers")
    keys = [k for k, _ in options]
    if letters not in keys:
        raise Skip("answer not among the options")
    return keys.index(letters)


def _abcd(raw: dict, keys: tuple[str, ...] = ("A", "B", "C", "D")) -> list[tuple[str, str]]:
    return [(LETTERS[i], raw[k]) for i, k in enumerate(keys)]


# ---- one parser per public record shape ----------------------------------------------------------------------------
def parse_medqa(raw: dict, where: str) -> Item:
    """GBaker/MedQA-USMLE-4-options, phrases_no_exclude_{train,test}.jsonl, one object per line:
    {"question": str, "answer": str (the option text), "options": {"A": str, "B": str, "C": str, "D": str},
    "meta_info": "step1" | "step2&3", "answer_idx": "A".."D", "metamap_phrases": [str]}. No id: file:line."""
    question, options = _require(raw, where, "MedQA", ("question", "options", "answer_idx"))[:2]
    if not isinstance(options, dict):
        raise BadInput("MedQA field 'options' is not an object", where=where, hint='"options": {"A": "…", "B": "…"}')
    opts = sorted((str(k).strip().upper(), v) for k, v in options.items())
    answer = _letter_answer(raw["answer_idx"], opts)
    return _item(_rid(where), _text(raw.get("meta_info")) or "medqa", question, opts, answer)


def parse_medmcqa(raw: dict, where: str) -> Item:
    """openlifescienceai/medmcqa, data/{train,validation,test}-*.parquet: {"id": str, "question": str, "opa".."opd":
    str, "cop": int 0-3 (-1 in test: no published answer), "choice_type": "single"|"multi", "exp": str,
    "subject_name": str, "topic_name": str}. cop counts from 0 in the Hub copy (the original release counts from 1)."""
    keys = ("id", "question", "opa", "opb", "opc", "opd", "cop")
    rid, question, *_ = _require(raw, where, "MedMCQA", keys)
    cop = _text(raw["cop"])
    if cop in ("", "-1"):
        raise Skip("no answer")
    if not re.fullmatch(r"[0-3](\.0)?", cop):
        raise BadInput(f"MedMCQA field 'cop' is {cop!r}, not 0-3", where=where, hint="cop: the correct option, 0 = opa")
    opts = _abcd(raw, ("opa", "opb", "opc", "opd"))
    subject = _text(raw.get("subject_name")) or "medmcqa"
    return _item(rid, subject, question, opts, int(float(cop)), raw.get("exp"))


PUBMEDQA_OPTIONS = (("A", "yes"), ("B", "no"), ("C", "maybe"))


def parse_pubmedqa(raw: dict, where: str) -> Item:
    """qiaojin/PubMedQA, config pqa_labeled (pqa_labeled/train-*.parquet, 1000 expert-labelled records): {"pubid": int,
    "question": str, "context": {"contexts": [str], "labels": [str], "meshes": [str], "reasoning_required_pred": [str],
    "reasoning_free_pred": [str]}, "long_answer": str, "final_decision": "yes"|"no"|"maybe"}. The question asked is
    the abstract's paragraphs (labelled BACKGROUND:, METHODS: …) then the question; options A yes, B no, C maybe."""
    pubid, question, context, decision = _require(
        raw, where, "PubMedQA", ("pubid", "question", "context", "final_decision")
    )
    paragraphs = _paragraphs(context, where)
    decision = _text(decision).lower()
    if not decision:
        raise Skip("no answer")
    answers = [t for _, t in PUBMEDQA_OPTIONS]
    if decision not in answers:
        raise Skip("final_decision not yes/no/maybe")
    text = "\n".join(paragraphs + ["", f"Question: {_text(question)}"]) if paragraphs else question
    return _item(pubid, "pubmedqa", text, PUBMEDQA_OPTIONS, answers.index(decision), raw.get("long_answer"))


def _paragraphs(context, where: str) -> list[str]:
    if isinstance(context, dict):
        texts, labels = context.get("contexts") or [], context.get("labels") or []
    elif isinstance(context, list):
        texts, labels = context, []
    else:
        raise BadInput("PubMedQA field 'context' is not an object", where=where, hint='"context": {"contexts": [...]}')
    labels = list(labels) + [""] * (len(texts) - len(labels))
    return [f"{_text(lab)}: {_text(t)}" if _text(lab) else _text(t) for t, lab in zip(texts, labels) if _text(t)]


def parse_mmlu(raw: dict, where: str) -> Item:
    """cais/mmlu, <subject>/{test,validation,dev}-*.parquet: {"question": str, "subject": str, "choices": [str x4],
    "answer": int 0-3 (a class label A-D)}."""
    question, choices, answer = _require(raw, where, "MMLU", ("question", "choices", "answer"))
    if not isinstance(choices, (list, tuple)) or len(choices) < 2:
        raise BadInput("MMLU field 'choices' is not a list of options", where=where, hint='"choices": ["…", "…"]')
    opts = [(LETTERS[i], c) for i, c in enumerate(choices)]
    ans = _text(answer).upper()
    index = int(ans) if ans.isdigit() else _letter_answer(ans, opts)
    subject = _text(raw.get("subject")) or raw.get("__subject__") or "mmlu"
    return _item(f"{subject}/{_rid(where)}", subject, question, opts, index)


CMEXAM_OPTION = re.compile(r"^\s*([A-J])(?:\s*[.．、:：)）]\s*|\s+)(.*)$")


def parse_cmexam(raw: dict, where: str) -> Item:
    """CMExam. williamliujl/CMExam data/{train,val,test_with_annotations}.csv: columns Question, Options (one string,
    a line per option: "A 文本\\nB 文本…"), Answer (letters; several for multiple-answer questions), Explanation, and
    in the test file Disease Group, Clinical Department, Medical Discipline, Area of Competency, Difficulty level.
    The Hub copy fzkuji/CMExam ({train,valid,test}.json, JSON Lines) has the same keys with Options as
    [{"key": "A", "value": str}] and no annotations. Subject: Medical Discipline, else "cmexam"."""
    question, options, answer = _require(raw, where, "CMExam", ("Question", "Options", "Answer"))
    opts = _cmexam_options(options, where)
    index = _letter_answer(answer, opts)
    subject = _text(raw.get("Medical Discipline")) or "cmexam"
    return _item(_rid(where), subject, question, opts, index, raw.get("Explanation"))


def _cmexam_options(options, where: str) -> list[tuple[str, str]]:
    if isinstance(options, list):
        try:
            return [(str(o["key"]).strip().upper(), o["value"]) for o in options]
        except (KeyError, TypeError) as exc:
            raise BadInput(
                "CMExam field 'Options' is a list but not of {key, value}",
                where=where,
                hint='[{"key": "A", "value": "…"}]',
            ) from exc
    out: list[list[str]] = []
    for line in _text(options).splitlines():
        m = CMEXAM_OPTION.match(line)
        if m:
            out.append([m.group(1), m.group(2)])
        elif out and line.strip():  # an option's text that goes on over a line break
            out[-1][1] += "\n" + line.strip()
    return [(k, v) for k, v in out]


def parse_ceval(raw: dict, where: str) -> Item:
    """ceval/ceval-exam, one file per subject and split: <subject>/{dev,val,test}-*.parquet, or in ceval-exam.zip
    {dev,val,test}/<subject>_{dev,val,test}.csv: id, question, A, B, C, D, answer (a letter; empty or absent in test:
    not published), explanation (dev). Subject: the file's name."""
    rid, question = _require(raw, where, "C-Eval", ("id", "question", "A", "B", "C", "D"))[:2]
    opts = _abcd(raw)
    subject = raw.get("__subject__") or "ceval"
    return _item(
        f"{subject}-{_text(rid)}",
        subject,
        question,
        opts,
        _letter_answer(raw.get("answer"), opts),
        raw.get("explanation"),
    )


def parse_cmmlu(raw: dict, where: str) -> Item:
    """haonan-li/cmmlu, cmmlu_v1_0_1.zip: {dev,test}/<subject>.csv with the header ",Question,A,B,C,D,Answer" (the
    first, unnamed column is the row index). Subject: the file's name."""
    question = _require(raw, where, "CMMLU", ("Question", "A", "B", "C", "D", "Answer"))[0]
    opts = _abcd(raw)
    subject = raw.get("__subject__") or "cmmlu"
    return _item(f"{subject}/{_rid(where)}", subject, question, opts, _letter_answer(raw["Answer"], opts))


# ---- the registry --------------------------------------------------------------------------------------------------
# MMLU: the six subjects of the usual "MMLU medical" set (MultiMedQA, the Open Medical-LLM Leaderboard), so that scores
# compare with published ones; nutrition and virology are left out for that reason.
MMLU_MEDICAL = (
    "anatomy",
    "clinical_knowledge",
    "college_biology",
    "college_medicine",
    "medical_genetics",
    "professional_medicine",
)
# C-Eval: the three subjects about human medicine. veterinary_medicine (兽医学) is left out: animal medicine, which a
# model tuned for clinicians is not meant to know.
CEVAL_MEDICAL = {"basic_medicine": "基础医学", "clinical_medicine": "临床医学", "physician": "医师资格"}
# CMMLU: every subject about medicine or its basic sciences. college_medical_statistics (statistics) and
# human_sexuality are left out.
CMMLU_MEDICAL = {
    "anatomy": "解剖学",
    "clinical_knowledge": "临床知识",
    "college_medicine": "大学医学",
    "genetics": "遗传学",
    "nutrition": "营养学",
    "professional_medicine": "专业医学",
    "traditional_chinese_medicine": "中医中药",
    "virology": "病毒学",
}


def _layout(subjects, splits: tuple[str, ...], *layouts: str) -> dict[str, tuple[str, ...]]:
    """Split -> the glob of every subject's file in each layout ("{subject}/{split}-*.parquet")."""
    return {sp: tuple(lay.format(subject=su, split=sp) for lay in layouts for su in subjects) for sp in splits}


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            "medqa",
            "MedQA (USMLE, 4 options)",
            "en",
            ("hf:GBaker/MedQA-USMLE-4-options",),
            "test",
            "train",
            None,
            parse_medqa,
            files={"test": ("phrases_no_exclude_test.jsonl",), "train": ("phrases_no_exclude_train.jsonl",)},
            subject_names={"step1": "medicine (USMLE Step 1)", "step2&3": "medicine (USMLE Step 2 and 3)"},
        ),
        Benchmark(
            "medmcqa",
            "MedMCQA",
            "en",
            ("hf:openlifescienceai/medmcqa",),
            "validation",  # the test split's answers are not published
            "train",
            None,
            parse_medmcqa,
            files={split: (f"data/{split}-*.parquet",) for split in ("train", "validation", "test")},
        ),
        Benchmark(
            "pubmedqa",
            "PubMedQA (PQA-L)",
            "en",
            ("hf:qiaojin/PubMedQA",),
            "train",  # pqa_labeled has one split: the 1000 expert-labelled questions
            None,
            None,
            parse_pubmedqa,
            files={"train": ("pqa_labeled/train-*.parquet",)},
            subject_names={"pubmedqa": "biomedical research"},
        ),
        Benchmark(
            "mmlu-medical",
            "MMLU (medical subjects)",
            "en",
            ("hf:cais/mmlu",),
            "test",
            "dev",
            MMLU_MEDICAL,
            parse_mmlu,
            files=_layout(MMLU_MEDICAL, ("test", "validation", "dev"), "{subject}/{split}-*.parquet"),
        ),
        Benchmark(
            "cmexam",
            "CMExam",
            "zh",
            ("hf:fzkuji/CMExam",),
            "test",
            "val",
            None,
            parse_cmexam,
            files={
                "test": ("test.json", "data/test_with_annotations.csv", "test_with_annotations.csv"),
                "val": ("valid.json", "data/val.csv", "val.csv"),
                "train": ("train.json", "data/train.csv", "train.csv"),
            },
            subject_names={"cmexam": "医学"},
        ),
        Benchmark(
            "ceval-medical",
            "C-Eval (medical subjects)",
            "zh",
            ("hf:ceval/ceval-exam", "ms:modelscope/ceval-exam"),
            "val",  # the test split's answers are not published
            "dev",
            tuple(CEVAL_MEDICAL),
            parse_ceval,
            files=_layout(
                CEVAL_MEDICAL, ("val", "dev", "test"), "{subject}/{split}-*.parquet", "{split}/{subject}_{split}.csv"
            ),
            archives=("ceval-exam.zip",),
            subject_from_file=True,
            subject_names=CEVAL_MEDICAL,
        ),
        Benchmark(
            "cmmlu-medical",
            "CMMLU (medical subjects)",
            "zh",
            ("hf:haonan-li/cmmlu", "ms:modelscope/cmmlu"),
            "test",
            "dev",
            tuple(CMMLU_MEDICAL),
            parse_cmmlu,
            files=_layout(CMMLU_MEDICAL, ("test", "dev"), "{split}/{subject}.csv"),
            archives=("cmmlu_v1_0_1.zip",),
            subject_from_file=True,
            subject_names=CMMLU_MEDICAL,
        ),
    )
}


def get(name: str) -> Benchmark:
    bench = BENCHMARKS.get(str(name).strip().lower())
    if bench is None:
        raise BadInput(f"unknown benchmark {name!r}", hint=f"benchmarks: {', '.join(BENCHMARKS)}")
    return bench


def _public_split(bench: Benchmark, split: str) -> str | None:
    """ "test" and "dev" name the benchmark's scored and few-shot splits; a public split name is taken as is."""
    if split == "test":
        return bench.test_split
    if split == "dev":
        return bench.dev_split
    if split in bench.files:
        return split
    raise BadInput(
        f"{bench.name} has no split {split!r}", hint=f"test, dev, or one of its public splits: {', '.join(bench.files)}"
    )


# ---- reading split files -------------------------------------------------------------------------------------------
SPLIT_ALIASES = {  # names a split goes by in file names, for folders not in the public repo's layout
    "validation": ("validation", "valid", "val", "dev"),
    "val": ("val", "valid", "validation"),
}


def _aliases(split: str) -> tuple[str, ...]:
    return SPLIT_ALIASES.get(split, (split,))


def _jsonl_records(path: Path) -> Iterator[tuple[str, dict]]:
    from medtune.core.jsonl import iter_jsonl

    for n, row in iter_jsonl(path, hint="one JSON object per line, in the benchmark's own shape"):
        yield f"{path}:{n}", row


def _json_records(path: Path) -> Iterator[tuple[str, dict]]:
    """A JSON array of records (or an object holding one), or JSON Lines under a .json name (fzkuji/CMExam)."""
    import json

    from medtune.data.sources import decode

    try:
        obj = json.loads(decode(path.read_bytes(), path))
    except json.JSONDecodeError:
        yield from _jsonl_records(path)
        return
    if isinstance(obj, dict):  # {"data": [records]}, or one record (JSON Lines of one line)
        only = next(iter(obj.values())) if len(obj) == 1 else None
        obj = only if isinstance(only, list) else [obj]
    for i, row in enumerate(obj if isinstance(obj, list) else [obj]):
        if not isinstance(row, dict):
            raise BadInput(
                f"record is a JSON {type(row).__name__}, not an object", where=f"{path}[{i}]", hint=FILE_HINT
            )
        yield f"{path}[{i}]", row


def _csv_records(path: Path) -> Iterator[tuple[str, dict]]:
    """Rows as {column: cell} with the line each starts on (medtune.data.sources' CSV reader). An unnamed column
    (CMMLU's index) is named columnN."""
    from medtune.data.sources import RecordError, csv_records, decode

    for rec in csv_records(decode(path.read_bytes(), path), path, unnamed=True):
        if isinstance(rec, RecordError):
            raise rec
        yield rec.where, rec.data


def _parquet_records(path: Path) -> Iterator[tuple[str, dict]]:
    from medtune.data.sources import read_file

    for record in read_file(path):
        yield record.where, record.data


READERS = {".jsonl": _jsonl_records, ".json": _json_records, ".csv": _csv_records, ".parquet": _parquet_records}


def _data_files(root: Path) -> list[Path]:
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def _matches(rel: str, patterns: tuple[str, ...]) -> bool:
    """Whether a relative path, or its tail under any folder, matches a layout glob (a copy may sit one folder down)."""
    parts = rel.split("/")
    return any(fnmatch("/".join(parts[i:]), pat) for i in range(len(parts)) for pat in patterns)


def _split_files(root: Path, bench: Benchmark, split: str) -> list[Path]:
    """A split's files in a folder: by the public repo's layout, else by the split's name in the path."""
    files = _data_files(root)
    rel = {p: p.relative_to(root).as_posix() for p in files}
    found = [p for p in files if _matches(rel[p], bench.files.get(split, ()))]
    if not found:
        names = set(_aliases(split))
        found = [p for p in files if names & set(re.split(r"[-_./]", rel[p].lower()))]
    if not found and split == bench.test_split and len(files) == 1:
        found = files  # one file, nothing else: the scored split
    return found


KNOWN_SPLITS = ("validation", "valid", "val", "dev", "test", "train")


def _file_subject(path: Path) -> str:
    """The subject of a per-subject file: clinical_medicine_val.csv, clinical_medicine/val-0000.parquet, dev/anatomy.csv."""
    stem = path.stem
    for name in KNOWN_SPLITS:
        if stem.lower().endswith("_" + name):
            return stem[: -len(name) - 1]
        if stem.lower() == name or stem.lower().startswith(name + "-"):
            return path.parent.name
    return stem


# ---- downloads -----------------------------------------------------------------------------------------------------
def _cache_root(cache) -> Path:
    if cache:
        return Path(cache).expanduser()
    if os.environ.get("MEDTUNE_BENCH_CACHE"):
        return Path(os.environ["MEDTUNE_BENCH_CACHE"]).expanduser()
    from medtune.core.paths import cache_dir

    return cache_dir() / "bench"


def _hf_snapshot(repo: str, patterns: list[str], root: Path) -> Path:
    from huggingface_hub import snapshot_download

    from medtune.core.safety import check_hub_id

    check_hub_id(repo, "dataset")
    return Path(snapshot_download(repo, repo_type="dataset", allow_patterns=patterns, cache_dir=str(root / "hub")))


def _ms_snapshot(repo: str, patterns: list[str], root: Path) -> Path:
    """The whole ModelScope repo (its layout is not checked here; the C-Eval and CMMLU repos are a few MB)."""
    try:
        from modelscope.hub.snapshot_download import dataset_snapshot_download
    except ImportError as exc:
        raise RuntimeError("the modelscope package is not installed (pip install modelscope)") from exc
    from medtune.core.safety import check_hub_id

    check_hub_id(repo, "dataset")
    return Path(dataset_snapshot_download(repo, cache_dir=str(root / "modelscope")))


DOWNLOADERS = {"hf": _hf_snapshot, "ms": _ms_snapshot}


def _unzip(archive: Path, dest: Path) -> Path:
    """The CSV files of a downloaded zip, extracted once (safely: no absolute paths, no '..')."""
    import shutil
    import zipfile

    from medtune.core.fsutil import atomic_dir

    if dest.is_dir():
        return dest
    with zipfile.ZipFile(archive) as zf, atomic_dir(dest) as tmp:
        for member in zf.infolist():
            rel = Path(member.filename)
            if member.is_dir() or rel.suffix.lower() != ".csv" or rel.is_absolute() or ".." in rel.parts:
                continue
            if rel.parts[0] == "__MACOSX":
                continue
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, open(tmp / rel, "wb") as out:
                shutil.copyfileobj(src, out)
    return dest


def _archive_files(snapshot: Path, root: Path, bench: Benchmark, split: str) -> list[Path]:
    for archive in sorted(snapshot.rglob("*.zip")):
        if archive.name in bench.archives:
            files = _split_files(_unzip(archive, root / "unzipped" / archive.stem), bench, split)
            if files:
                return files
    return []


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _download(bench: Benchmark, split: str, cache, progress, info: dict) -> list[Path]:
    root = _cache_root(cache) / bench.name
    patterns = [*bench.files.get(split, ()), *bench.archives]
    for source in bench.sources:
        kind, repo = source.split(":", 1)
        if progress:
            progress(f"{bench.title}: {split} split from {source}")
        try:
            snapshot = DOWNLOADERS[kind](repo, patterns, root)
        except Exception as exc:  # network, a missing or gated repo, an absent client: try the next source
            info["notes"].append(f"{source}: {_first_line(exc)}")
            continue
        files = _split_files(snapshot, bench, split) or _archive_files(snapshot, root, bench, split)
        if files:
            info["source"] = source
            return files
        info["notes"].append(f"{source}: no {split} split files in the download")
    raise BadInput(
        f"could not get {bench.title} ({', '.join(bench.sources)}): {'; '.join(info['notes'])}",
        hint=f"check the network (HF_ENDPOINT, HF_HUB_OFFLINE=1 for the cache), or {FILE_HINT}",
    )


def _local_files(bench: Benchmark, path: Path, split: str, info: dict) -> list[Path]:
    if not path.exists():
        raise BadInput(f"benchmark file not found: {path}", hint=FILE_HINT)
    info["source"] = f"file:{path}"
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise BadInput(
                f"unsupported benchmark file type {path.suffix or '(none)'}", where=str(path), hint=FILE_HINT
            )
        if split != bench.test_split:
            raise BadInput(
                f"{path.name} is one file, so one split: there is no {split} split beside it",
                where=str(path),
                hint="few-shot examples need the dev split: pass a folder holding both splits, or use no shots",
            )
        return [path]
    files = _split_files(path, bench, split)
    if not files:
        layout = ", ".join(bench.files.get(split, ())[:3]) or split
        raise BadInput(
            f"no {split} split file in {path}",
            where=str(path),
            hint=f"name the files as {bench.sources[0]} does ({layout}), or put the split's name in the file name",
        )
    return files


# ---- load ----------------------------------------------------------------------------------------------------------
def _parse_one(bench: Benchmark, raw: dict, where: str, skipped: Counter) -> Item | None:
    try:
        item = bench.parse(raw, where)
    except Skip as exc:
        skipped[str(exc)] += 1
        return None
    if item is None:
        skipped["not a question"] += 1
    return item


def _parse_file(bench: Benchmark, path: Path, split: str, info: dict, skipped: Counter) -> Iterator[Item]:
    subject = _file_subject(path) if bench.subject_from_file else None
    if subject is not None and bench.subjects and subject not in bench.subjects:
        info["other_subject_files"] += 1
        return
    for where, raw in READERS[path.suffix.lower()](path):
        info["records"] += 1
        item = _parse_one(bench, raw if subject is None else {**raw, "__subject__": subject}, where, skipped)
        if item is not None and bench.subjects and item.subject not in bench.subjects:
            info["other_subjects"] += 1
        elif item is not None:
            yield item


def _parse_files(bench: Benchmark, files: list[Path], split: str, info: dict) -> list[Item]:
    items, seen, skipped = [], set(), Counter()
    for path in files:
        for item in _parse_file(bench, path, split, info, skipped):
            if item.id in seen:  # ids must tell questions apart (reports list them)
                item = replace(item, id=f"{item.id}#{len(items)}")
            seen.add(item.id)
            items.append(item)
    info.update(files=[str(p) for p in files], questions=len(items), skipped=dict(sorted(skipped.items())))
    if not items:
        why = ", ".join(f"{n} {reason}" for reason, n in skipped.items()) or "no records"
        raise BadInput(
            f"no usable {bench.title} questions in the {split} split ({why})",
            where=str(files[0]) if len(files) == 1 else None,
            hint=f"{bench.title} is scored on its {bench.test_split} split; check the file holds that split",
        )
    return items


def load(
    name: str, file=None, split: str = "test", cache=None, progress: Callable[[str], None] | None = None
) -> tuple[list[Item], dict]:
    """A benchmark's questions and what was read. split: "test" (the scored split), "dev" (few-shot examples) or a
    public split name. file: a local copy (a .jsonl/.json/.csv/.parquet file, or a folder of split files in the
    public repo's layout or named after their split); without it, the sources are downloaded in order and cached
    under `cache` (default $MEDTUNE_BENCH_CACHE, else ~/.cache/medtune/bench/<name>). info: benchmark, split, source,
    files, records read, questions, skipped {reason: count}, other_subjects (records outside the medical subset),
    notes."""
    bench = get(name)
    public = _public_split(bench, split)
    info = {"benchmark": bench.name, "split": public, "source": None, "files": [], "records": 0, "questions": 0}
    info.update(skipped={}, other_subjects=0, other_subject_files=0, notes=[])
    if public is None:
        info["notes"].append(f"{bench.title} has no dev split: no few-shot examples")
        return [], info
    if file is not None:
        files = _local_files(bench, Path(file).expanduser(), public, info)
    else:
        files = _download(bench, public, cache, progress, info)
    return _parse_files(bench, files, public, info), info


# ---- sampling and few-shot examples ---------------------------------------------------------------------------------
def select(items: list[Item], limit: int | None = None, seed: int = 0) -> list[Item]:
    """At most `limit` questions per subject, a seeded draw; ordered by subject, then as in `items`."""
    if limit is not None and limit < 0:
        raise BadInput(f"limit must be 0 or more, not {limit}", hint="at most N questions per subject")
    by_subject: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        by_subject.setdefault(item.subject, []).append(i)
    out = []
    for subject in sorted(by_subject):
        picked = by_subject[subject]
        if limit is not None and len(picked) > limit:
            picked = sorted(random.Random(f"{seed}:{subject}").sample(picked, limit))
        out.extend(items[i] for i in picked)
    return out


def shots(dev_items: list[Item], subject: str, k: int, exclude_id: str | None = None) -> list[Item]:
    """The first k dev questions of `subject` (C-Eval's protocol), then other subjects' when it has fewer."""
    if k <= 0:
        return []
    pool = [it for it in dev_items if it.id != exclude_id]
    same = [it for it in pool if it.subject == subject]
    return (same + [it for it in pool if it.subject != subject])[:k]


# ---- prompts -------------------------------------------------------------------------------------------------------
INSTRUCTIONS = {
    "en": "The following are multiple choice questions about {subject}. Answer with the letter of the correct option.",
    "zh": "以下是关于{subject}的单项选择题，请直接给出正确答案的选项字母。",
}
ANSWER_CUES = {"en": "Answer:", "zh": "答案："}


def question_text(item: Item, lang: str = "en") -> str:
    """The question, one "A. text" line per option, and the answer cue ("Answer:" / "答案：")."""
    options = [f"{letter}. {text}" for letter, text in item.options]
    return "\n".join([item.question, *options, ANSWER_CUES.get(lang, ANSWER_CUES["en"])])


def mc_messages(item: Item, shot_items: list[Item], bench: Benchmark) -> list[dict]:
    """A chat: the instruction and each few-shot question as user turns answered by their letter, then `item`."""
    head = INSTRUCTIONS[bench.lang].format(subject=bench.subject_label(item.subject))
    turns: list[dict] = []
    for shot in shot_items:
        turns.append({"role": "user", "content": question_text(shot, bench.lang)})
        turns.append({"role": "assistant", "content": shot.options[shot.answer][0]})
    turns.append({"role": "user", "content": question_text(item, bench.lang)})
    turns[0]["content"] = f"{head}\n\n{turns[0]['content']}"
    return turns


# ---- the model's choice --------------------------------------------------------------------------------------------
# After an "A" or "I", a lowercase word or a number makes it the English article or pronoun ("A patient …",
# "A 45-year-old …"), unless the word is one that follows a named choice ("A is correct", "A because …").
_AFTER_CHOICE = {"is", "was", "because", "since", "as", "and", "or", "seems", "appears", "here", "only"}


def _is_word(text: str, end: int, letter: str) -> bool:
    if letter not in ("A", "I"):
        return False
    m = re.match(r"\s+([a-z][a-z'-]*|\d)", text[end:])
    return bool(m) and m.group(1) not in _AFTER_CHOICE


@lru_cache(maxsize=32)
def _letter_patterns(letters: str) -> tuple[re.Pattern, re.Pattern]:
    choice = f"([{re.escape(letters)}])"
    opening = r"[(\[（【]?\s*(?:\*\*)?\s*"
    stated = re.compile(
        r"(?:(?i:\banswer\s*(?:is|would\s+be|should\s+be|will\s+be)?|\b(?:option|choice)\s+(?:is|would\s+be|should\s+be))"
        r"\s*[:：=]?\s*(?i:option\s+|choice\s+)?"
        r"|(?:答案|选择|选)\s*(?:应该|应|就)?\s*(?:是|为)?\s*[:：]?\s*"
        r"|\\boxed\{\s*(?:\\text\{\s*)?)" + opening + choice + r"(?![A-Za-z0-9])"
    )
    leading = re.compile(r"^\s*(?:[-*>#]+\s*)?" + opening + choice + r"\s*(?:\*\*)?\s*(?=[.．)\]）】:：、,，]|\s|$)")
    return stated, leading


def _stated(text: str, pattern: re.Pattern) -> set[str]:
    return {m.group(1) for m in pattern.finditer(text) if not _is_word(text, m.end(1), m.group(1))}


def _leading(line: str, pattern: re.Pattern) -> str | None:
    m = pattern.match(line)
    return m.group(1) if m and not _is_word(line, m.end(1), m.group(1)) else None


def parse_letter(text: str | None, letters: str = "ABCD", close: str = "</think>") -> str | None:
    """The option letter a generated answer chose, or None (none, or several different ones).

    Only the text after the last `close` counts; reasoning that never closed chose nothing. First the letters named
    as the answer ("The answer is (B)", "Answer: B", "答案：B", "答案是B", "\\boxed{B}"); else a letter opening the
    answer or its last line ("B", "**B**", "B. text", "(B) text")."""
    if not text:
        return None
    if close and close in text:
        text = text.rsplit(close, 1)[1]
    elif close and close.startswith("</") and "<" + close[2:] in text:
        return None
    stated_pattern, leading_pattern = _letter_patterns(letters)
    named = _stated(text, stated_pattern)
    if named:
        return named.pop() if len(named) == 1 else None
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return None
    found = {_leading(lines[0], leading_pattern), _leading(lines[-1], leading_pattern)} - {None}
    return found.pop() if len(found) == 1 else None


def choose(item: Item, text: str | None, close: str = "</think>") -> int | None:
    """The index of the option a generated answer chose (parse_letter over the item's letters), or None."""
    letter = parse_letter(text, item.letters, close)
    return None if letter is None else item.letters.index(letter)


# ---- scores --------------------------------------------------------------------------------------------------------
def _accuracy(correct: int, questions: int) -> dict:
    return {"accuracy": correct / questions if questions else 0.0, "correct": correct, "questions": questions}


def aggregate(items: list[Item], picks: list[int | None]) -> dict:
    """Accuracy overall, per subject, and the macro average (the mean of the subjects' accuracies). A pick is an
    option index, or None when no answer could be read: wrong, and its item's id is listed under "unparsed"."""
    if len(items) != len(picks):
        raise ValueError(f"{len(items)} items but {len(picks)} picks")
    counts: dict[str, list[int]] = {}
    unparsed = []
    for item, pick in zip(items, picks):
        tally = counts.setdefault(item.subject, [0, 0])
        tally[0] += pick == item.answer
        tally[1] += 1
        if pick is None:
            unparsed.append(item.id)
    subjects = {s: _accuracy(*counts[s]) for s in sorted(counts)}
    macro = sum(s["accuracy"] for s in subjects.values()) / len(subjects) if subjects else 0.0
    overall = _accuracy(sum(c for c, _ in counts.values()), len(items))
    return {"overall": overall, "macro": macro, "subjects": subjects, "unparsed": unparsed}
