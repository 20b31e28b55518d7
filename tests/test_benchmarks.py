"""medtune.eval.bench: every benchmark's public record shape parsed from a local copy (nothing is downloaded), the
split and subject selection, skipped and bad records, the seeded draw, few-shot examples, prompts, the letter a
model chose and the scores."""

from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path

import pytest

from medtune.core.errors import BadInput
from medtune.eval import bench
from medtune.eval.bench import Item

from conftest import ROOT

SAMPLES = ROOT / "data" / "sample" / "bench"


# ---- writers of each public shape ------------------------------------------------------------------------------------
def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def medqa_row(question: str, answer: str, meta: str = "step1") -> dict:
    options = {"A": "Aspirin", "B": "Heparin", "C": "Warfarin", "D": "Alteplase"}
    return {
        "question": question,
        "answer": options[answer],
        "options": options,
        "meta_info": meta,
        "answer_idx": answer,
        "metamap_phrases": ["phrase"],
    }


def medmcqa_row(rid: str, cop: int, subject: str = "Pharmacology") -> dict:
    return {
        "id": rid,
        "question": f"Question {rid}?",
        "opa": "Atropine",
        "opb": "Naloxone",
        "opc": "Flumazenil",
        "opd": "Physostigmine",
        "cop": cop,
        "choice_type": "single",
        "exp": f"Because {rid}.",
        "subject_name": subject,
        "topic_name": "Antidotes",
    }


CEVAL_HEADER = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
CMMLU_HEADER = ["", "Question", "A", "B", "C", "D", "Answer"]


# ---- the registry ----------------------------------------------------------------------------------------------------
def test_registry_has_one_entry_per_benchmark():
    names = {"medqa", "medmcqa", "pubmedqa", "mmlu-medical", "cmexam", "ceval-medical", "cmmlu-medical"}
    assert set(bench.BENCHMARKS) == names
    for name, b in bench.BENCHMARKS.items():
        assert b.name == name and b.lang in ("en", "zh") and callable(b.parse)
        assert b.sources and all(s.split(":", 1)[0] in bench.DOWNLOADERS for s in b.sources)
        assert b.test_split in b.files, name
        assert b.dev_split is None or b.dev_split in b.files, name
    assert bench.get("medmcqa").test_split == "validation"  # MedMCQA's test answers are not published
    assert bench.get("ceval-medical").test_split == "val"
    assert "veterinary_medicine" not in bench.get("ceval-medical").subjects
    assert "traditional_chinese_medicine" in bench.get("cmmlu-medical").subjects
    assert len(bench.get("mmlu-medical").subjects) == 6


def test_unknown_benchmark_lists_the_registry():
    with pytest.raises(BadInput) as err:
        bench.load("medqb", SAMPLES / "medqa.jsonl")
    assert "medqb" in err.value.message and "medqa, medmcqa" in err.value.hint


def test_unknown_split_is_refused():
    with pytest.raises(BadInput, match="no split 'holdout'"):
        bench.load("medqa", SAMPLES / "medqa.jsonl", split="holdout")


# ---- MedQA -----------------------------------------------------------------------------------------------------------
def test_medqa_sample_loads_in_its_public_shape():
    items, info = bench.load("medqa", SAMPLES / "medqa.jsonl")
    assert len(items) == 8 and info["questions"] == 8 and info["skipped"] == {}
    first = items[0]
    assert first.id == "medqa.jsonl:1" and first.subject == "step2&3"
    assert first.question.startswith("A 58-year-old man") and first.letters == "ABCD"
    assert first.options[first.answer] == ("C", "Right coronary artery")
    assert {it.subject for it in items} == {"step1", "step2&3"}
    assert sorted(it.options[it.answer][0] for it in items) == list("AABBCCDD")


def test_medqa_folder_in_repo_layout_gives_test_and_dev_splits(tmp_path):
    write_jsonl(tmp_path / "phrases_no_exclude_test.jsonl", [medqa_row("Test question?", "D")])
    write_jsonl(
        tmp_path / "phrases_no_exclude_train.jsonl", [medqa_row(f"Train {i}?", "B", "step2&3") for i in range(3)]
    )
    test, info = bench.load("medqa", tmp_path)
    dev, dev_info = bench.load("medqa", tmp_path, split="dev")
    assert [it.question for it in test] == ["Test question?"] and test[0].answer == 3
    assert info["split"] == "test" and info["files"] == [str(tmp_path / "phrases_no_exclude_test.jsonl")]
    assert [it.question for it in dev] == ["Train 0?", "Train 1?", "Train 2?"] and dev_info["split"] == "train"
    assert {it.answer for it in dev} == {1}


def test_medqa_missing_field_names_file_line_and_field(tmp_path):
    row = medqa_row("Second?", "A")
    del row["answer_idx"]
    path = write_jsonl(tmp_path / "medqa.jsonl", [medqa_row("First?", "B"), row])
    with pytest.raises(BadInput) as err:
        bench.load("medqa", path)
    assert err.value.where == f"{path}:2"
    assert "'answer_idx'" in err.value.message and "answer_idx" in err.value.hint


def test_a_single_file_has_no_dev_split(tmp_path):
    with pytest.raises(BadInput, match="one split"):
        bench.load("medqa", SAMPLES / "medqa.jsonl", split="dev")
    with pytest.raises(BadInput, match="not found"):
        bench.load("medqa", tmp_path / "absent.jsonl")


# ---- MedMCQA ---------------------------------------------------------------------------------------------------------
def test_medmcqa_scores_validation_and_takes_shots_from_train(tmp_path):
    data = tmp_path / "data"
    write_parquet(data / "train-00000-of-00001.parquet", [medmcqa_row("t1", 0, "Anatomy")])
    write_parquet(data / "validation-00000-of-00001.parquet", [medmcqa_row("v1", 2), medmcqa_row("v2", -1)])
    write_parquet(data / "test-00000-of-00001.parquet", [medmcqa_row("x1", -1)])
    items, info = bench.load("medmcqa", tmp_path)
    assert [it.id for it in items] == ["v1"] and info["split"] == "validation"
    assert info["skipped"] == {"no answer": 1} and info["records"] == 2
    v1 = items[0]
    assert v1.options == (("A", "Atropine"), ("B", "Naloxone"), ("C", "Flumazenil"), ("D", "Physostigmine"))
    assert v1.answer == 2 and v1.subject == "Pharmacology" and v1.explanation == "Because v1."
    dev, _ = bench.load("medmcqa", tmp_path, split="dev")
    assert [(it.id, it.subject, it.answer) for it in dev] == [("t1", "Anatomy", 0)]


def test_medmcqa_public_test_split_has_no_answers(tmp_path):
    path = write_parquet(tmp_path / "test-00000-of-00001.parquet", [medmcqa_row("x1", -1), medmcqa_row("x2", -1)])
    with pytest.raises(BadInput, match=r"no usable MedMCQA questions .*2 no answer"):
        bench.load("medmcqa", path)


def test_medmcqa_cop_out_of_range_is_bad_input(tmp_path):
    path = write_jsonl(tmp_path / "dev.jsonl", [medmcqa_row("a", 1), medmcqa_row("b", 4)])
    with pytest.raises(BadInput) as err:
        bench.load("medmcqa", path)
    assert err.value.where == f"{path}:2" and "'cop'" in err.value.message


# ---- PubMedQA --------------------------------------------------------------------------------------------------------
def pubmedqa_row(pubid: int, decision: str) -> dict:
    return {
        "pubid": pubid,
        "question": f"Does treatment {pubid} reduce mortality?",
        "context": {
            "contexts": ["We studied 200 patients.", "Mortality fell by a third."],
            "labels": ["METHODS", "RESULTS"],
            "meshes": ["Humans"],
            "reasoning_required_pred": ["yes"],
            "reasoning_free_pred": ["yes"],
        },
        "long_answer": "Treatment reduced mortality.",
        "final_decision": decision,
    }


def test_pubmedqa_labeled_parquet_with_its_nested_context(tmp_path):
    rows = [pubmedqa_row(1, "yes"), pubmedqa_row(2, "maybe"), pubmedqa_row(3, "")]
    write_parquet(tmp_path / "pqa_labeled" / "train-00000-of-00001.parquet", rows)
    write_parquet(tmp_path / "pqa_artificial" / "train-00000-of-00001.parquet", [pubmedqa_row(9, "no")])
    items, info = bench.load("pubmedqa", tmp_path)
    assert [it.id for it in items] == ["1", "2"] and info["skipped"] == {"no answer": 1}
    first = items[0]
    assert first.question == (
        "METHODS: We studied 200 patients.\nRESULTS: Mortality fell by a third.\n\n"
        "Question: Does treatment 1 reduce mortality?"
    )
    assert first.options == (("A", "yes"), ("B", "no"), ("C", "maybe")) and first.answer == 0
    assert items[1].answer == 2 and first.explanation == "Treatment reduced mortality."
    dev, dev_info = bench.load("pubmedqa", tmp_path, split="dev")
    assert dev == [] and "no dev split" in dev_info["notes"][0]


# ---- MMLU ------------------------------------------------------------------------------------------------------------
def mmlu_row(subject: str, n: int, answer: int) -> dict:
    return {
        "question": f"{subject} question {n}?",
        "subject": subject,
        "choices": ["w", "x", "y", "z"],
        "answer": answer,
    }


def test_mmlu_medical_subjects_only_in_repo_layout(tmp_path):
    write_parquet(
        tmp_path / "anatomy" / "test-00000-of-00001.parquet", [mmlu_row("anatomy", i, i % 4) for i in range(3)]
    )
    write_parquet(tmp_path / "anatomy" / "dev-00000-of-00001.parquet", [mmlu_row("anatomy", 9, 1)])
    write_parquet(tmp_path / "astronomy" / "test-00000-of-00001.parquet", [mmlu_row("astronomy", 0, 0)])
    write_parquet(tmp_path / "all" / "test-00000-of-00001.parquet", [mmlu_row("astronomy", 1, 0)])
    items, info = bench.load("mmlu-medical", tmp_path)
    assert [it.question for it in items] == ["anatomy question 0?", "anatomy question 1?", "anatomy question 2?"]
    assert [it.answer for it in items] == [0, 1, 2] and {it.subject for it in items} == {"anatomy"}
    assert len({it.id for it in items}) == 3
    dev, _ = bench.load("mmlu-medical", tmp_path, split="dev")
    assert [(it.question, it.answer) for it in dev] == [("anatomy question 9?", 1)]


def test_mmlu_flat_file_filters_subjects_by_record(tmp_path):
    rows = [mmlu_row("virology", 0, 1), mmlu_row("college_medicine", 1, 3), mmlu_row("marketing", 2, 0)]
    items, info = bench.load("mmlu-medical", write_jsonl(tmp_path / "mmlu_test.jsonl", rows))
    assert [(it.subject, it.answer) for it in items] == [("college_medicine", 3)]
    assert info["other_subjects"] == 2


# ---- CMExam ----------------------------------------------------------------------------------------------------------
CMEXAM_HEADER = ["Question", "Options", "Answer", "Explanation", "Medical Discipline"]
CMEXAM_OPTIONS = "A 阿托品\nB 纳洛酮\nC 氟马西尼\nD 亚甲蓝\nE 维生素K1"


def test_cmexam_sample_csv_loads():
    items, info = bench.load("cmexam", SAMPLES / "cmexam.csv")
    assert len(items) == 8 and info["skipped"] == {}
    first = items[0]
    assert first.id == "cmexam.csv:2" and first.subject == "临床医学" and first.letters == "ABCDE"
    assert first.options[first.answer] == ("A", "急性前壁心肌梗死") and first.explanation
    assert {"临床医学", "中医学", "药学"} <= {it.subject for it in items}


def test_cmexam_multiple_answers_and_missing_answers_are_skipped_and_counted(tmp_path):
    rows = [
        ["吗啡中毒的解毒剂是（　　）。", CMEXAM_OPTIONS, "B", "阿片受体拮抗剂。", "药学"],
        ["可用于有机磷中毒的是（　　）。", CMEXAM_OPTIONS, "AD", "", "药学"],
        ["苯二氮䓬类中毒的解毒剂是（　　）。", CMEXAM_OPTIONS, "", "", "药学"],
        ["亚硝酸盐中毒可用（　　）。", CMEXAM_OPTIONS, "D", "", "临床医学"],
    ]
    items, info = bench.load("cmexam", write_csv(tmp_path / "val.csv", CMEXAM_HEADER, rows))
    assert [(it.id, it.answer, it.subject) for it in items] == [("val.csv:2", 1, "药学"), ("val.csv:17", 3, "临床医学")]
    assert info["skipped"] == {"multiple answers": 1, "no answer": 1} and info["records"] == 4
    assert items[0].options[4] == ("E", "维生素K1")


def test_cmexam_hub_copy_is_json_lines_with_key_value_options(tmp_path):
    options = [{"key": k, "value": v} for k, v in zip("ABCDE", ["甲", "乙", "丙", "丁", "戊"])]
    row = {"Question": "哪一项正确？", "Options": options, "Answer": "C", "Explanation": "解析。"}
    write_jsonl(tmp_path / "test.json", [row, {**row, "Answer": "E"}])
    write_jsonl(tmp_path / "valid.json", [{**row, "Question": "验证集题目？"}])
    write_jsonl(tmp_path / "train.json", [{**row, "Question": "训练集题目？"}])
    items, info = bench.load("cmexam", tmp_path)
    assert [(it.question, it.answer, it.subject) for it in items] == [
        ("哪一项正确？", 2, "cmexam"),
        ("哪一项正确？", 4, "cmexam"),
    ]
    dev, dev_info = bench.load("cmexam", tmp_path, split="dev")
    assert [it.question for it in dev] == ["验证集题目？"] and dev_info["split"] == "val"


def test_cmexam_missing_column_names_file_line_and_field(tmp_path):
    path = write_csv(tmp_path / "test.csv", ["Question", "Options", "Explanation"], [["题？", CMEXAM_OPTIONS, ""]])
    with pytest.raises(BadInput) as err:
        bench.load("cmexam", path)
    assert err.value.where == f"{path}:2" and "'Answer'" in err.value.message


# ---- C-Eval ----------------------------------------------------------------------------------------------------------
def ceval_folder(root: Path) -> Path:
    """The layout of ceval-exam.zip: {dev,val,test}/<subject>_<split>.csv (test without answers)."""
    write_csv(
        root / "val" / "clinical_medicine_val.csv",
        CEVAL_HEADER,
        [
            [0, "高血压急症首选哪种降压方式？", "口服", "静脉", "舌下", "肌注", "B", ""],
            [1, "题二？", "a", "b", "c", "d", "D", ""],
        ],
    )
    write_csv(root / "val" / "basic_medicine_val.csv", CEVAL_HEADER, [[0, "基础题？", "a", "b", "c", "d", "A", ""]])
    write_csv(
        root / "val" / "veterinary_medicine_val.csv", CEVAL_HEADER, [[0, "兽医题？", "a", "b", "c", "d", "C", ""]]
    )
    write_csv(
        root / "dev" / "clinical_medicine_dev.csv", CEVAL_HEADER, [[0, "示例？", "a", "b", "c", "d", "C", "因为。"]]
    )
    write_csv(root / "test" / "clinical_medicine_test.csv", CEVAL_HEADER[:6], [[0, "测试题？", "a", "b", "c", "d"]])
    return root


def test_ceval_scores_val_with_subjects_from_file_names(tmp_path):
    items, info = bench.load("ceval-medical", ceval_folder(tmp_path))
    assert [(it.id, it.subject, it.answer) for it in items] == [
        ("basic_medicine-0", "basic_medicine", 0),
        ("clinical_medicine-0", "clinical_medicine", 1),
        ("clinical_medicine-1", "clinical_medicine", 3),
    ]
    assert info["split"] == "val" and all("veterinary" not in f for f in info["files"])
    assert items[1].options[1] == ("B", "静脉")
    dev, _ = bench.load("ceval-medical", tmp_path, split="dev")
    assert [(it.subject, it.answer, it.explanation) for it in dev] == [("clinical_medicine", 2, "因为。")]


def test_ceval_public_test_split_is_skipped_for_want_of_answers(tmp_path):
    path = ceval_folder(tmp_path) / "test" / "clinical_medicine_test.csv"
    with pytest.raises(BadInput, match="1 no answer"):
        bench.load("ceval-medical", path)


def test_ceval_flat_folder_and_parquet_layout(tmp_path):
    flat = tmp_path / "flat"
    write_csv(flat / "physician_val.csv", CEVAL_HEADER, [[5, "医师题？", "a", "b", "c", "d", "C", ""]])
    write_csv(flat / "physician_dev.csv", CEVAL_HEADER, [[0, "示例？", "a", "b", "c", "d", "A", ""]])
    items, _ = bench.load("ceval-medical", flat)
    assert [(it.id, it.subject, it.answer) for it in items] == [("physician-5", "physician", 2)]
    hub = tmp_path / "hub"
    row = {"id": 3, "question": "题？", "A": "a", "B": "b", "C": "c", "D": "d", "answer": "D", "explanation": ""}
    write_parquet(hub / "basic_medicine" / "val-00000-of-00001.parquet", [row])
    write_parquet(hub / "computer_network" / "val-00000-of-00001.parquet", [row])
    items, _ = bench.load("ceval-medical", hub)
    assert [(it.id, it.subject, it.answer) for it in items] == [("basic_medicine-3", "basic_medicine", 3)]


# ---- CMMLU -----------------------------------------------------------------------------------------------------------
def cmmlu_folder(root: Path) -> Path:
    """The layout inside cmmlu_v1_0_1.zip: {dev,test}/<subject>.csv, an unnamed index column first."""
    write_csv(root / "test" / "anatomy.csv", CMMLU_HEADER, [[0, "人体最大的器官是？", "肝", "皮肤", "肺", "心", "B"]])
    write_csv(root / "test" / "agronomy.csv", CMMLU_HEADER, [[0, "农学题？", "a", "b", "c", "d", "A"]])
    write_csv(root / "test" / "virology.csv", CMMLU_HEADER, [[0, "病毒题？", "a", "b", "c", "d", "D"]])
    write_csv(root / "dev" / "anatomy.csv", CMMLU_HEADER, [[0, "示例？", "a", "b", "c", "d", "C"]])
    return root


def test_cmmlu_medical_subjects_from_file_names(tmp_path):
    items, info = bench.load("cmmlu-medical", cmmlu_folder(tmp_path))
    assert [(it.subject, it.question, it.answer) for it in items] == [
        ("anatomy", "人体最大的器官是？", 1),
        ("virology", "病毒题？", 3),
    ]
    assert info["files"] == [str(tmp_path / "test" / "anatomy.csv"), str(tmp_path / "test" / "virology.csv")]
    dev, _ = bench.load("cmmlu-medical", tmp_path, split="dev")
    assert [(it.subject, it.answer) for it in dev] == [("anatomy", 2)]


def test_cmmlu_missing_column_names_file_line_and_field(tmp_path):
    path = write_csv(tmp_path / "test" / "anatomy.csv", CMMLU_HEADER[:-1], [[0, "题？", "a", "b", "c", "d"]])
    with pytest.raises(BadInput) as err:
        bench.load("cmmlu-medical", path)
    assert err.value.where == f"{path}:2" and "'Answer'" in err.value.message


# ---- downloads (stubbed: tests never reach a hub) ----------------------------------------------------------------------
def test_download_tries_sources_in_order_and_unzips_the_archive(tmp_path, monkeypatch):
    snapshot = tmp_path / "snapshot"
    src = cmmlu_folder(tmp_path / "src")
    snapshot.mkdir()
    with zipfile.ZipFile(snapshot / "cmmlu_v1_0_1.zip", "w") as zf:
        for f in sorted(src.rglob("*.csv")):
            zf.write(f, f.relative_to(src).as_posix())
        zf.writestr("../escape.csv", "x")
    calls = []

    def offline(repo, patterns, root):
        calls.append(("hf", repo))
        raise OSError("network unreachable")

    def mirror(repo, patterns, root):
        calls.append(("ms", repo))
        assert root == tmp_path / "cache" / "cmmlu-medical"
        return snapshot

    monkeypatch.setitem(bench.DOWNLOADERS, "hf", offline)
    monkeypatch.setitem(bench.DOWNLOADERS, "ms", mirror)
    seen = []
    items, info = bench.load("cmmlu-medical", cache=tmp_path / "cache", progress=seen.append)
    assert calls == [("hf", "haonan-li/cmmlu"), ("ms", "modelscope/cmmlu")] and len(seen) == 2
    assert [it.subject for it in items] == ["anatomy", "virology"] and info["source"] == "ms:modelscope/cmmlu"
    assert "network unreachable" in info["notes"][0]
    assert not (tmp_path / "cache" / "cmmlu-medical" / "unzipped" / "escape.csv").exists()
    assert not (tmp_path / "cache" / "cmmlu-medical" / "escape.csv").exists()


def test_download_failure_names_the_ids_and_hints_bench_file(tmp_path, monkeypatch):
    def offline(repo, patterns, root):
        raise OSError("no route to host")

    monkeypatch.setitem(bench.DOWNLOADERS, "hf", offline)
    with pytest.raises(BadInput) as err:
        bench.load("medqa", cache=tmp_path)
    assert "hf:GBaker/MedQA-USMLE-4-options" in err.value.message and "no route to host" in err.value.message
    assert "--bench-file" in err.value.hint


# ---- select and shots ------------------------------------------------------------------------------------------------
def make_items(per_subject: dict[str, int]) -> list[Item]:
    items = []
    for subject, n in per_subject.items():
        for i in range(n):
            options = (("A", "yes"), ("B", "no"), ("C", "maybe"), ("D", "never"))
            items.append(Item(f"{subject}-{i}", subject, f"{subject} q{i}?", options, i % 4))
    return items


def test_select_is_a_seeded_draw_per_subject_in_stable_order():
    items = make_items({"zoology": 3, "anatomy": 20, "cardiology": 2})
    first = bench.select(items, limit=5, seed=1)
    assert first == bench.select(items, limit=5, seed=1)
    assert [it.subject for it in first] == ["anatomy"] * 5 + ["cardiology"] * 2 + ["zoology"] * 3
    anatomy = [int(it.id.split("-")[1]) for it in first if it.subject == "anatomy"]
    assert anatomy == sorted(anatomy) and len(set(anatomy)) == 5
    other = [it.id for it in bench.select(items, limit=5, seed=2) if it.subject == "anatomy"]
    assert other != [it.id for it in first if it.subject == "anatomy"]
    everything = bench.select(items)
    assert len(everything) == 25 and [it.subject for it in everything][:20] == ["anatomy"] * 20
    assert bench.select(items, limit=0) == []


def test_shots_take_the_subject_first_then_others():
    dev = make_items({"anatomy": 2, "cardiology": 3})
    assert [it.id for it in bench.shots(dev, "cardiology", 2)] == ["cardiology-0", "cardiology-1"]
    assert [it.id for it in bench.shots(dev, "anatomy", 4)] == [
        "anatomy-0",
        "anatomy-1",
        "cardiology-0",
        "cardiology-1",
    ]
    assert [it.id for it in bench.shots(dev, "anatomy", 2, exclude_id="anatomy-0")] == ["anatomy-1", "cardiology-0"]
    assert bench.shots(dev, "anatomy", 0) == []


# ---- prompts ---------------------------------------------------------------------------------------------------------
def test_question_text_letters_the_options():
    item = make_items({"anatomy": 1})[0]
    assert bench.question_text(item, "en") == "anatomy q0?\nA. yes\nB. no\nC. maybe\nD. never\nAnswer:"
    assert bench.question_text(item, "zh").endswith("D. never\n答案：")


def test_mc_messages_zero_shot_english():
    item = Item("x", "clinical_knowledge", "Which?", (("A", "a"), ("B", "b")), 1)
    messages = bench.mc_messages(item, [], bench.get("mmlu-medical"))
    assert messages == [
        {
            "role": "user",
            "content": "The following are multiple choice questions about clinical knowledge. Answer with the letter "
            "of the correct option.\n\nWhich?\nA. a\nB. b\nAnswer:",
        }
    ]


def test_mc_messages_few_shot_chinese():
    dev = make_items({"clinical_medicine": 3})
    item = Item("t", "clinical_medicine", "测试题？", (("A", "甲"), ("B", "乙"), ("C", "丙"), ("D", "丁")), 2)
    messages = bench.mc_messages(item, dev, bench.get("ceval-medical"))
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3 + ["user"]
    assert [m["content"] for m in messages[1::2]] == ["A", "B", "C"]
    assert messages[0]["content"].startswith(
        "以下是关于临床医学的单项选择题，请直接给出正确答案的选项字母。\n\nclinical_medicine q0?"
    )
    assert sum("以下是关于" in m["content"] for m in messages) == 1
    assert messages[-1]["content"] == "测试题？\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案："


# ---- the model's choice ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, letter",
    [
        ("The answer is (B).", "B"),
        ("Answer: C", "C"),
        ("答案：D", "D"),
        ("答案是B", "B"),
        ("**B**", "B"),
        ("B. Metformin lowers hepatic glucose output.", "B"),
        ("C) Insulin", "C"),
        ("A", "A"),
        ("**Answer:** D", "D"),
        ("\\boxed{C}", "C"),
        ("The stem describes an inferior MI.\n\nC", "C"),
        ("故选A。", "A"),
        ("选项B是错误的，答案为C。", "C"),
        ("The answer is A because it blocks the receptor.", "A"),
        ("<think>It could be A or B.</think>The answer is C.", "C"),
        ("<think>It could be A or B.</think>\nD", "D"),
        ("<think>Still weighing A against B", None),
        ("A patient with these findings needs an ECG.", None),
        ("Answer: A 45-year-old man would need an ECG first.", None),
        ("The answer is A. No, the answer is B.", None),
        ("A. Aspirin would help, but the best is\nC", None),
        ("Digoxin toxicity", None),
        ("答案：AB", None),
        ("Option A is wrong.", None),
        ("", None),
    ],
)
def test_parse_letter(text, letter):
    assert bench.parse_letter(text, "ABCDE") == letter


def test_parse_letter_only_knows_the_given_letters():
    assert bench.parse_letter("The answer is E.", "ABCD") is None
    assert bench.parse_letter("The answer is E.", "ABCDE") == "E"
    item = Item("x", "s", "q?", tuple((k, k.lower()) for k in "ABCDE"), 4)
    assert bench.choose(item, "Answer: E") == 4 and bench.choose(item, "no idea") is None


# ---- scores ----------------------------------------------------------------------------------------------------------
def test_aggregate_overall_macro_and_unparsed():
    items = make_items({"anatomy": 4, "cardiology": 1})  # answers: anatomy 0,1,2,3; cardiology 0
    picks = [0, 1, None, 0, 2]
    scores = bench.aggregate(items, picks)
    assert scores["overall"] == {"accuracy": 0.4, "correct": 2, "questions": 5}
    assert scores["subjects"] == {
        "anatomy": {"accuracy": 0.5, "correct": 2, "questions": 4},
        "cardiology": {"accuracy": 0.0, "correct": 0, "questions": 1},
    }
    assert scores["macro"] == pytest.approx(0.25) and scores["unparsed"] == ["anatomy-2"]
    with pytest.raises(ValueError):
        bench.aggregate(items, picks[:-1])
