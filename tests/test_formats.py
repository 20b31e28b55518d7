"""`medtune prepare` on every format and source kind, with files these tests write."""

import csv
import json
import shutil
from pathlib import Path

import pytest

from medtune.core.errors import BadInput
from medtune.data import encode
from medtune.data.prepare import prepare

from conftest import ROOT, SAMPLE, run_cli

SAMPLES = ROOT / "data" / "sample"
O1 = [json.loads(x) for x in SAMPLE.read_text(encoding="utf-8").splitlines() if x.strip()]


def rows(out: Path, side: str = "train") -> list[dict]:
    p = out / f"{side}.jsonl"
    return [json.loads(x) for x in p.read_text(encoding="utf-8").splitlines()] if p.exists() else []


def all_rows(out: Path) -> list[dict]:
    return rows(out, "train") + rows(out, "valid") + rows(out, "test")


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def assert_trainable(tok, out: Path):
    """Every written record encodes as training will see it: prompt masked, answer ends on the end token."""
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for rec in all_rows(out):
        ids, offset = encode.encode(tok, rec)
        assert 0 < offset < len(ids)
        assert ids[offset:].count(end) == 1


# ---- formats ---------------------------------------------------------------------------------------
def test_medical_o1_json_array_and_jsonl_agree(tmp_path, smollm2_dir):
    arr = tmp_path / "o1.json"
    arr.write_text(json.dumps(O1[:20], ensure_ascii=False), encoding="utf-8")
    a = prepare(arr, str(smollm2_dir), tmp_path / "a")
    b = prepare(SAMPLE, str(smollm2_dir), tmp_path / "b", limit=20)
    assert a.format == b.format == "medical-o1" and a.style == "completions"
    assert sorted(map(json.dumps, all_rows(tmp_path / "a"))) == sorted(map(json.dumps, all_rows(tmp_path / "b")))


def test_alpaca_sample_with_system_and_history_becomes_chat(tmp_path, smollm2_dir, tok):
    res = prepare(SAMPLES / "alpaca_sample.json", str(smollm2_dir), tmp_path / "out")
    assert res.format == "alpaca" and res.style == "chat"
    recs = all_rows(tmp_path / "out")
    assert len(recs) == res.counts["kept"] and res.counts["kept"] >= 60
    assert any(r["messages"][0]["role"] == "system" for r in recs)
    assert any(sum(m["role"] == "assistant" for m in r["messages"]) >= 2 for r in recs)  # history kept
    src = json.loads((SAMPLES / "alpaca_sample.json").read_text(encoding="utf-8"))
    with_input = next(r for r in src if r["input"])
    assert any(
        m["content"] == f"{with_input['instruction']}\n\n{with_input['input']}" for r in recs for m in r["messages"]
    )
    assert_trainable(tok, tmp_path / "out")


def test_sharegpt_multi_turn(tmp_path, smollm2_dir, tok):
    res = prepare(SAMPLES / "sharegpt_sample.jsonl", str(smollm2_dir), tmp_path / "out")
    assert res.format == "sharegpt" and res.style == "chat"
    recs = all_rows(tmp_path / "out")
    multi = [r for r in recs if sum(m["role"] == "user" for m in r["messages"]) >= 2]
    assert multi
    ids, offset = encode.encode(tok, multi[0])
    first_answer = multi[0]["messages"][1]["content"]
    assert first_answer in tok.decode(ids[:offset])  # earlier turns are context, masked
    assert_trainable(tok, tmp_path / "out")


def test_chat_completions_and_text_formats(tmp_path, smollm2_dir, tok):
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        "\n".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": r["Question"]},
                        {"role": "assistant", "content": r["Response"], "reasoning_content": r["Complex_CoT"]},
                    ]
                },
                ensure_ascii=False,
            )
            for r in O1[:12]
        ),
        encoding="utf-8",
    )
    res = prepare(chat, str(smollm2_dir), tmp_path / "c")
    assert res.format == "chat"
    assert all("<think>" in r["completion"] for r in all_rows(tmp_path / "c"))  # reasoning_content kept

    comp = tmp_path / "comp.jsonl"
    comp.write_text(
        "\n".join(
            json.dumps({"prompt": r["Question"], "completion": r["Response"]}, ensure_ascii=False) for r in O1[:12]
        ),
        encoding="utf-8",
    )
    res = prepare(comp, str(smollm2_dir), tmp_path / "p")
    assert res.format == "completions" and res.style == "completions"
    assert_trainable(tok, tmp_path / "p")

    text = tmp_path / "text.jsonl"
    text.write_text(
        "\n".join(json.dumps({"text": r["Response"]}, ensure_ascii=False) for r in O1[:12]), encoding="utf-8"
    )
    res = prepare(text, str(smollm2_dir), tmp_path / "t")
    assert res.format == "text" and res.style == "text"
    rec = all_rows(tmp_path / "t")[0]
    ids, offset = encode.encode(tok, rec, mask_prompt=False)
    assert ids[-1] == tok.eos_token_id and offset == 0


def test_cmedqa2_pair_joins_answers_and_keeps_questions_on_one_side(tmp_path, smollm2_dir):
    folder = SAMPLES / "cmedqa2"
    questions = list(csv.DictReader(open(folder / "question.csv", encoding="utf-8")))
    answers = list(csv.DictReader(open(folder / "answer.csv", encoding="utf-8")))
    res = prepare(folder, str(smollm2_dir), tmp_path / "all", valid_ratio=0.3, seed=3)
    assert res.format == "cmedqa2" and res.counts["kept"] == len(answers)
    train_q = {r["prompt"] for r in rows(tmp_path / "all")}
    valid_q = {r["prompt"] for r in rows(tmp_path / "all", "valid")}
    assert train_q and valid_q and not train_q & valid_q
    first = prepare(folder / "question.csv", str(smollm2_dir), tmp_path / "first", answers="first")
    assert first.counts["kept"] == len(questions)


# ---- sources -------------------------------------------------------------------------------------
def test_csv_with_field_map_quotes_and_newlines(tmp_path, smollm2_dir):
    path = tmp_path / "odd.csv"
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Q", "CoT", "A"])
        for r in O1[:10]:
            w.writerow([r["Question"], r["Complex_CoT"] + '\nSecond line, with "quotes".', r["Response"]])
    with pytest.raises(BadInput, match="cannot tell the dataset format"):
        prepare(path, str(smollm2_dir), tmp_path / "x")
    res = prepare(path, str(smollm2_dir), tmp_path / "out", mapping="question=Q,complex_cot=CoT,response=A")
    assert res.format == "medical-o1" and res.counts["kept"] == 10
    assert any('with "quotes"' in r["completion"] for r in all_rows(tmp_path / "out"))


def test_parquet_and_folder_sources(tmp_path, smollm2_dir):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    folder = tmp_path / "folder"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(O1[:10]), folder / "part-0.parquet")
    (folder / "part-1.jsonl").write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in O1[10:20]), encoding="utf-8"
    )
    res = prepare(folder, str(smollm2_dir), tmp_path / "out")
    assert res.counts["read"] == 20 and res.counts["kept"] == 20
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert len(manifest["inputs"]["sha256"]) == 2


def _fake_dataset_repo(root: Path) -> Path:
    (root / "data").mkdir(parents=True)
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: en\n  data_files:\n  - split: train\n    path: data/en_train.jsonl\n"
        "- config_name: zh\n  data_files:\n  - split: train\n    path: data/zh_*.jsonl\n---\n# card\n",
        encoding="utf-8",
    )
    zh = [r for r in O1 if any("\u4e00" <= c <= "\u9fff" for c in r["Question"])]
    en = [r for r in O1 if r not in zh]
    (root / "data" / "en_train.jsonl").write_text("\n".join(json.dumps(r) for r in en[:8]), encoding="utf-8")
    (root / "data" / "zh_train.jsonl").write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in zh[:6]), encoding="utf-8"
    )
    return root


def test_hub_dataset_spec_follows_the_card_configs(tmp_path, smollm2_dir, monkeypatch):
    """The Hub cannot be reached here: snapshot_download is replaced by a folder shaped like a dataset repo;
    what is tested is our spec parsing and config/split selection on it."""
    import huggingface_hub

    repo = _fake_dataset_repo(tmp_path / "repo")
    calls = []

    def fake_snapshot_download(repo_id, repo_type=None, allow_patterns=None, **kw):
        calls.append((repo_id, repo_type))
        return str(repo)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    res = prepare("hf:FreedomIntelligence/medical-o1-reasoning-SFT:zh", str(smollm2_dir), tmp_path / "zh")
    assert calls == [("FreedomIntelligence/medical-o1-reasoning-SFT", "dataset")]
    assert res.counts["read"] == 6
    assert prepare("hf:org/name:en@train", str(smollm2_dir), tmp_path / "en").counts["read"] == 8
    with pytest.raises(BadInput, match="several configs"):
        prepare("hf:org/name", str(smollm2_dir), tmp_path / "x")
    with pytest.raises(BadInput, match="no split 'test'"):
        prepare("hf:org/name:en@test", str(smollm2_dir), tmp_path / "x")


def test_modelscope_dataset_spec(tmp_path, smollm2_dir, monkeypatch):
    modelscope = pytest.importorskip("modelscope")
    folder = tmp_path / "ms"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in O1[:7]), encoding="utf-8")
    monkeypatch.setattr(modelscope, "dataset_snapshot_download", lambda repo, **kw: str(folder), raising=False)
    res = prepare("modelscope:org/name", str(smollm2_dir), tmp_path / "out")
    assert res.counts["read"] == 7


def test_limit_and_seeded_sample(tmp_path, smollm2_dir):
    assert prepare(SAMPLE, str(smollm2_dir), None, limit=5, dry_run=True).counts["kept"] == 5
    a = prepare(SAMPLE, str(smollm2_dir), tmp_path / "a", sample=10, seed=7)
    b = prepare(SAMPLE, str(smollm2_dir), tmp_path / "b", sample=10, seed=7)
    c = prepare(SAMPLE, str(smollm2_dir), tmp_path / "c", sample=10, seed=8)
    assert a.counts == b.counts and c.counts["kept"] == 10
    assert a.counts["kept"] == 10 and a.counts["dropped"]["not sampled"] == len(O1) - 10
    key = lambda p: sorted(r["prompt"] for r in all_rows(p))  # noqa: E731
    assert key(tmp_path / "a") == key(tmp_path / "b") != key(tmp_path / "c")


# ---- rendering ----------------------------------------------------------------------------------
STRIP_THINK = (
    "{% for message in messages %}{% set content = message['content'] %}"
    "{% if message['role'] == 'assistant' and '</think>' in content %}"
    "{% set content = content.split('</think>')[-1].lstrip() %}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def strip_think_dir(tmp_path_factory, smollm2_dir):
    """SmolLM2's tokenizer with a DeepSeek-R1-distill-like template that deletes <think> blocks."""
    d = tmp_path_factory.mktemp("stripthink") / "model"
    shutil.copytree(smollm2_dir, d, ignore=shutil.ignore_patterns("*.safetensors"))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = STRIP_THINK
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").write_bytes((smollm2_dir / "model.safetensors").read_bytes()[:0])
    return d


def test_think_stripping_template_keeps_the_reasoning(tmp_path, strip_think_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(strip_think_dir)
    res = prepare(SAMPLE, str(strip_think_dir), tmp_path / "out", limit=12)
    assert res.template["strips_think"] is True and res.style == "text"
    assert any("deletes <think> blocks" in n for n in res.notes)
    rec = all_rows(tmp_path / "out")[0]
    src = O1[0]
    assert src["Complex_CoT"][:40] in rec["text"] and rec["text"].endswith("<|im_end|>")
    ids, offset = encode.encode(tok, rec)
    assert tok.decode(ids[offset:]).startswith("<think>")  # loss starts at the reasoning, prompt masked
    assert ids[offset:].count(tok.convert_tokens_to_ids("<|im_end|>")) == 1
    with pytest.raises(BadInput, match="deletes <think> blocks"):
        prepare(SAMPLE, str(strip_think_dir), tmp_path / "c", limit=4, style="completions")
    inline = prepare(SAMPLE, str(strip_think_dir), tmp_path / "i", limit=4, reasoning="inline")
    assert inline.style == "completions"


def test_reasoning_modes(tmp_path, smollm2_dir):
    drop = prepare(SAMPLE, str(smollm2_dir), tmp_path / "d", limit=6, reasoning="drop")
    assert all("<think>" not in r["completion"] and r["completion"] for r in all_rows(tmp_path / "d"))
    assert drop.counts["kept"] == 6
    prepare(SAMPLE, str(smollm2_dir), tmp_path / "i", limit=6, reasoning="inline")
    r = all_rows(tmp_path / "i")[0]
    assert "<think>" not in r["completion"] and "\n\n" in r["completion"]


def test_cleaning_bom_crlf_nfc_controls_empty_and_duplicates(tmp_path, smollm2_dir):
    recs = [dict(r) for r in O1[:6]]
    recs[0]["Question"] = "Cafe\u0301 worker\x07 with fever?\r\nDetails"  # decomposed é, a BEL, CRLF
    recs.append(dict(recs[1]))  # exact duplicate
    recs.append({"Question": "   ", "Complex_CoT": "x", "Response": "y"})  # whitespace-only question
    recs.append({"Question": "Q?", "Complex_CoT": "x", "Response": "\t"})  # empty response
    path = tmp_path / "messy.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(json.dumps(r, ensure_ascii=False) for r in recs).encode("utf-8"))
    res = prepare(path, str(smollm2_dir), tmp_path / "out")
    assert res.counts["dropped"] == {"duplicate": 1, "empty prompt": 1, "empty response": 1}
    prompts = [r["prompt"] for r in all_rows(tmp_path / "out")]
    assert "Caf\u00e9 worker with fever?\nDetails" in prompts


def test_end_token_in_the_data_is_refused_or_skipped(tmp_path, smollm2_dir):
    recs = [dict(r) for r in O1[:5]]
    recs[2]["Response"] += "<|im_end|>"
    path = tmp_path / "eot.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in recs), encoding="utf-8")
    with pytest.raises(BadInput, match="end-of-turn token") as exc:
        prepare(path, str(smollm2_dir), tmp_path / "out")
    assert f"{path}:3" in exc.value.line()
    res = prepare(path, str(smollm2_dir), tmp_path / "out", skip_invalid=True)
    assert res.counts["kept"] == 4


def test_completions_style_refuses_multi_turn(tmp_path, smollm2_dir):
    with pytest.raises(BadInput, match="--style completions"):
        prepare(SAMPLES / "sharegpt_sample.jsonl", str(smollm2_dir), tmp_path / "o", style="completions")


def test_no_token_stats_checks_a_sample_and_says_so(tmp_path, smollm2_dir):
    res = prepare(SAMPLE, str(smollm2_dir), tmp_path / "out", token_stats=False)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["checked"] == {"records": min(64, res.counts["kept"]), "all": False} and res.tokens == {}


# ---- bad input -----------------------------------------------------------------------------------
BAD = [
    ("trunc.json", b'[{"Question": "a", "Complex_CoT": "b", "Response": "c"},\n{"Question": ', ":2", "invalid JSON"),
    (
        "midline.jsonl",
        b'{"Question": "a", "Complex_CoT": "b", "Response": "c"}\n{broken\n'
        b'{"Question": "d", "Complex_CoT": "e", "Response": "f"}\n',
        ":2",
        "invalid JSON",
    ),
    (
        "missing.jsonl",
        b'{"Question": "a", "Complex_CoT": "b", "Response": "c"}\n{"Question": "a2", "Complex_CoT": "b"}\n',
        ":2",
        "missing field 'response'",
    ),
    ("type.jsonl", b'{"Question": "a", "Complex_CoT": "b", "Response": ["c"]}\n', ":1", "expected text"),
    ("empty.jsonl", b"", "", "empty"),
    ("blank.jsonl", b"  \n\n ", "", "empty"),
    ("binary.jsonl", b"\x00\x01\x02GGUF\x00" * 20, "", "binary"),
    (
        "latin1.jsonl",
        '{"Question": "caf\u00e9", "Complex_CoT": "b", "Response": "c"}\n'.encode("latin-1"),
        ":1",
        "UTF-8",
    ),
    ("quotes.csv", b'Question,Complex_CoT,Response\n"a","b","c"\n"unbalanced,"b","c"\n', ":3", "malformed CSV"),
    ("cols.csv", b"Question,Complex_CoT,Response\na,b,c\nd,e\n", ":3", "columns"),
    ("scalar.json", b"42", "", "not a list"),
    ("unknown.jsonl", b'{"foo": "bar"}\n', ":1", "cannot tell the dataset format"),
    ("roles.jsonl", b'{"conversations": [{"from": "martian", "value": "hi"}]}\n', ":1", "unknown role"),
]


@pytest.mark.parametrize("name, content, where, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path, smollm2_dir, name, content, where, message):
    path = tmp_path / name
    path.write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(BadInput) as exc:
        prepare(path, str(smollm2_dir), out)
    assert message in exc.value.line(), exc.value.line()
    assert f"{path}{where}" in exc.value.line()
    assert exc.value.hint
    assert not out.exists()


def test_skip_invalid_counts_bad_records(tmp_path, smollm2_dir):
    path = tmp_path / "mixed.jsonl"
    good = [json.dumps(r, ensure_ascii=False) for r in O1[:5]]
    path.write_text(
        "\n".join(good[:2] + ["{not json", '{"Question": "x", "Complex_CoT": "y"}'] + good[2:]), encoding="utf-8"
    )
    res = prepare(path, str(smollm2_dir), tmp_path / "out", skip_invalid=True)
    assert res.counts["kept"] == 5 and sum(v for k, v in res.counts["dropped"].items() if k.startswith("invalid")) == 2


def test_cli_summary_and_dry_run(tmp_path, smollm2_dir):
    res = run_cli("prepare", SAMPLES / "sharegpt_sample.jsonl", "--model", smollm2_dir, "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "sharegpt → chat" in res.stderr and "<|im_start|>assistant" in res.stderr
    res = run_cli("prepare", SAMPLE, "--model", smollm2_dir, "--out", tmp_path / "o", "--json")
    assert json.loads(res.stdout)["counts"]["kept"] == len(O1)
