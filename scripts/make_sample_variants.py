#!/usr/bin/env python3
"""Write the medtune sample data in three more public dataset shapes.

Reads ``data/sample/medical_o1_sample.jsonl`` (medical-o1 schema:
Question, Complex_CoT, Response) and writes, next to it:

* ``alpaca_sample.json``        alpaca schema (instruction/input/output,
                                 optional system and history)
* ``sharegpt_sample.jsonl``     ShareGPT conversations (from/value turns)
* ``cmedqa2/question.csv``      cMedQA2 layout: question_id,content
* ``cmedqa2/answer.csv``        cMedQA2 layout: ans_id,question_id,content

All extra text (case/question splits, system prompts, earlier turns,
follow-up turns, extra cMedQA2 answers) is written by the medtune team and
kept below as plain Python data; nothing is copied from any dataset or
website. The script uses no randomness, so running it again gives
byte-identical files.

Usage::

    python scripts/make_sample_variants.py           # (re)write the files
    python scripts/make_sample_variants.py --check   # exit 1 if out of date

Standard library only.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DIR = ROOT / "data" / "sample"
SOURCE = SAMPLE_DIR / "medical_o1_sample.jsonl"

EXPECTED_RECORDS = 66

# ---------------------------------------------------------------------------
# System prompts (short clinician-assistant prompts, one per language)
# ---------------------------------------------------------------------------

SYSTEM_EN = (
    "You are a careful medical assistant supporting clinicians. Give concise, "
    "evidence-based answers and say clearly when something needs urgent care."
)
SYSTEM_ZH = "你是一名为临床医生提供支持的医学助手。请简明、准确地回答，并明确指出需要紧急处理的情况。"

# ---------------------------------------------------------------------------
# Alpaca variant
# ---------------------------------------------------------------------------

# Source index -> the final question sentence(s) of the vignette. In the
# alpaca file that sentence becomes `instruction` and the case text before
# it becomes `input`. The suffix must match the source Question exactly.
ALPACA_SPLITS: dict[int, str] = {
    0: "What is the diagnosis and the priority in management?",
    1: "Should she be anticoagulated?",
    3: "What is the most likely organism, and what should be done first?",
    9: "What is the diagnosis and treatment?",
    10: "What is the diagnosis and immediate management?",
    12: "What is the most likely diagnosis and the first investigation?",
    16: "What should be done immediately?",
    22: "What is the diagnosis?",
    27: "What is the most likely cause?",
    57: "What is the most likely diagnosis?",
}

# Source indices whose alpaca record carries a `system` field.
ALPACA_SYSTEM: dict[int, str] = {
    0: SYSTEM_EN,
    15: SYSTEM_EN,
    20: SYSTEM_ZH,
    36: SYSTEM_EN,
    49: SYSTEM_EN,
}

# Source index -> earlier turns, as [previous_instruction, previous_output]
# pairs (the common alpaca-with-history form), oldest first.
ALPACA_HISTORY: dict[int, list[list[str]]] = {
    18: [
        [
            "Which ECG changes are typical of hyperkalaemia?",
            "Changes usually progress from peaked T waves to PR prolongation "
            "and flattened or absent P waves, then QRS widening, and finally "
            "a sine-wave pattern before ventricular fibrillation or asystole. "
            "The ECG is insensitive, so a normal trace does not rule out "
            "dangerous hyperkalaemia.",
        ],
    ],
    30: [
        [
            "What is usually the first-line drug for type 2 diabetes?",
            "Metformin, together with diet and physical activity, unless it "
            "is contraindicated or not tolerated. In people with established "
            "cardiovascular disease, heart failure or chronic kidney disease, "
            "an SGLT2 inhibitor or GLP-1 receptor agonist with proven benefit "
            "is added early, whatever the HbA1c.",
        ],
        [
            "What are its most common side effects?",
            "Gastrointestinal effects such as nausea, abdominal discomfort and "
            "diarrhoea are the most common; starting low, taking it with meals "
            "or using a modified-release form helps. Long-term use can lower "
            "vitamin B12 levels, and lactic acidosis is rare.",
        ],
    ],
    55: [
        [
            "What does a positive HBsAg result mean?",
            "A positive hepatitis B surface antigen means current hepatitis B "
            "infection, acute or chronic. If it persists for more than 6 "
            "months the infection is chronic, and HBeAg, HBV DNA and liver "
            "tests then guide management.",
        ],
    ],
    65: [
        [
            "如何检测幽门螺杆菌感染？",
            "首选尿素呼气试验（13C或14C），准确、无创，适用于初次诊断和根除后复查；"
            "也可用粪便抗原检测，或在胃镜检查时做快速尿素酶试验和组织学检查。"
            "检测前应停用质子泵抑制剂至少2周、停用抗生素和铋剂至少4周，以免出现假阴性。",
        ],
    ],
}

# ---------------------------------------------------------------------------
# ShareGPT variant
# ---------------------------------------------------------------------------

# Source indices whose conversation starts with a system turn.
SHAREGPT_SYSTEM: dict[int, str] = {
    1: SYSTEM_EN,
    7: SYSTEM_EN,
    15: SYSTEM_EN,
    24: SYSTEM_EN,
    38: SYSTEM_ZH,
    56: SYSTEM_ZH,
}

# Source index -> (follow-up human question, gpt answer), appended after the
# first answer to make a two-round conversation.
SHAREGPT_FOLLOWUPS: dict[int, tuple[str, str]] = {
    0: (
        "What if primary PCI cannot be done within 120 minutes of diagnosis?",
        "Then give fibrinolysis, for example tenecteplase, if there are no "
        "contraindications and symptoms began less than 12 hours ago, ideally "
        "within 10 minutes of diagnosis. Transfer to a PCI-capable centre "
        "afterwards: immediately for rescue PCI if reperfusion fails, "
        "otherwise for angiography within 2-24 hours.",
    ),
    2: (
        "秋水仙碱需要服用多长时间？",
        "急性心包炎首次发作时，秋水仙碱一般服用3个月，可明显降低复发风险；体重低于70公斤者剂量减半。"
        "常见不良反应是腹泻等胃肠道反应，肾功能不全时需减量，并避免与克拉霉素等强效CYP3A4抑制剂合用。",
    ),
    4: (
        "Why does potassium have to be checked before insulin is started?",
        "Insulin drives potassium into cells, so the serum level falls once "
        "treatment begins, even though total body potassium is usually "
        "depleted in DKA. If potassium is below 3.3 mmol/L, insulin is held "
        "while potassium is replaced, to avoid dangerous hypokalaemia and "
        "arrhythmias.",
    ),
    14: (
        "服用左甲状腺素需要注意什么？",
        "应每天固定时间空腹服用，通常在早餐前30～60分钟，与钙剂、铁剂等至少间隔4小时，以免影响吸收。"
        "多数患者需要长期服药，每次调整剂量后6～8周复查促甲状腺激素；计划怀孕或已怀孕时应及时就诊，通常需要加量。",
    ),
    15: (
        "How long should the patient be observed after recovering?",
        "It depends on severity. Observe for at least 6 hours in most cases, "
        "and for 12 hours or longer after a severe reaction, when two or more "
        "doses of adrenaline were needed, or in patients with severe asthma, "
        "because biphasic reactions can occur. Before discharge, provide "
        "adrenaline auto-injectors with training, a written emergency plan "
        "and referral to an allergy service.",
    ),
    23: (
        "孩子以后还会再发作吗？",
        "大约三分之一的孩子以后会再次出现热性惊厥，首次发作年龄小于18个月、有家族史或发作时体温不太高者复发风险更高。"
        "多数孩子到5～6岁后不再发作，日后发展为癫痫的风险仅略高于一般儿童。退热药能让孩子更舒适，但不能预防热性惊厥。",
    ),
    29: (
        "确诊妊娠期糖尿病后首先应如何处理？",
        "首先进行医学营养治疗和适量运动，并教会孕妇自我监测血糖；若1～2周后血糖仍不达标"
        "（如空腹≥5.3 mmol/L或餐后2小时≥6.7 mmol/L），应加用胰岛素。"
        "产后4～12周应复查75克口服葡萄糖耐量试验，以后定期筛查2型糖尿病。",
    ),
    58: (
        "How long should anticoagulation be continued?",
        "For a pulmonary embolism provoked by a major transient risk factor "
        "such as surgery, treat for 3 months and then stop once the risk "
        "factor has resolved. Longer or indefinite treatment is considered "
        "after unprovoked events or with persistent risk factors such as "
        "active cancer, weighed against the bleeding risk.",
    ),
}

# ---------------------------------------------------------------------------
# cMedQA2 variant (Chinese records only)
# ---------------------------------------------------------------------------

QUESTION_ID_START = 10001
ANSWER_ID_START = 20001

# Source index -> extra answers, written after the source Response. Each is
# shorter and worded differently but medically consistent with it. Some use
# ASCII commas and double quotes on purpose, so that CSV quoting is exercised.
CMEDQA_EXTRA_ANSWERS: dict[int, list[str]] = {
    8: [
        "这是带状疱疹，由潜伏在神经节内的水痘-带状疱疹病毒再次激活引起。建议尽快就医，"
        "起疹3天内开始抗病毒治疗效果最好，同时要充分止痛，以减少带状疱疹后神经痛。",
        '俗称"缠腰龙"的就是带状疱疹。抗病毒药越早用越好，疼痛明显时配合止痛药，老年人尤其要警惕后遗神经痛。',
    ],
    11: [
        "这是低血糖发作。能吞咽就马上吃糖，例如葡萄糖片或含糖饮料，15分钟后再测血糖；"
        "已经意识不清的不要喂食，以免误吸，应立即送医静脉补充葡萄糖。",
    ],
    14: [
        "符合甲状腺功能减退，病因是桥本甲状腺炎。需要长期口服左甲状腺素，定期复查甲状腺功能以调整剂量。",
        "化验结果（TSH 18 mIU/L, FT4降低, TPOAb阳性）提示桥本甲状腺炎引起的原发性甲减。"
        "用左甲状腺素替代治疗，一般需长期服用，老年人应从小剂量开始逐渐加量。",
    ],
    26: [
        "考虑手足口病，多由肠道病毒引起，一般7～10天可自愈。注意多喝水、吃温凉的流质食物并居家隔离；"
        "如出现嗜睡、抽搐、呼吸急促等情况要立即去医院。",
    ],
    35: [
        "考虑面神经炎（贝尔麻痹）。尽早口服激素，注意保护眼睛防止角膜损伤，多数人可以恢复；"
        "如果伴有肢体无力或说话不清，要先排除脑卒中。",
    ],
    44: [
        "即使现在症状轻微也不能大意，肝损伤往往在1～3天后才表现出来。应立即去急诊，"
        "查血药浓度和肝功能，并尽早使用解毒剂N-乙酰半胱氨酸。",
    ],
    56: [
        "这是疥疮，由疥螨引起，传染性强。颈部以下全身涂抗疥药物，1周后再涂一次；同宿舍的人要一起治疗，"
        "衣物床单用热水洗烫。治疗后瘙痒可能还会持续几周，不代表治疗失败。",
    ],
    65: [
        "目前推荐含铋剂的四联疗法，疗程14天。抗生素的选择要考虑当地耐药情况和个人用药史（如青霉素过敏），"
        "疗程结束后至少停药4周再做呼气试验，确认是否根除。",
        '经验性治疗首选"质子泵抑制剂＋铋剂＋两种抗生素"的四联方案，疗程14天。',
    ],
}


# ---------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------


def is_chinese(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def load_source(path: Path = SOURCE) -> list[dict[str, str]]:
    records = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            for key in ("Question", "Complex_CoT", "Response"):
                if not isinstance(rec.get(key), str) or not rec[key].strip():
                    raise ValueError(f"{path}:{line_no}: missing or empty {key!r}")
            records.append(rec)
    if len(records) != EXPECTED_RECORDS:
        raise ValueError(f"{path}: expected {EXPECTED_RECORDS} records, found {len(records)}")
    return records


def _check_indices(name: str, indices, records, *, chinese: bool | None = None) -> None:
    for i in indices:
        if not 0 <= i < len(records):
            raise ValueError(f"{name}: index {i} out of range")
        if chinese is not None and is_chinese(records[i]["Question"]) != chinese:
            lang = "Chinese" if chinese else "English"
            raise ValueError(f"{name}: record {i} is not {lang}")


def build_alpaca(records: list[dict[str, str]]) -> list[dict]:
    _check_indices("ALPACA_SPLITS", ALPACA_SPLITS, records, chinese=False)
    _check_indices("ALPACA_SYSTEM", ALPACA_SYSTEM, records)
    _check_indices("ALPACA_HISTORY", ALPACA_HISTORY, records)
    out = []
    for i, rec in enumerate(records):
        question = rec["Question"]
        instruction, case = question, ""
        if i in ALPACA_SPLITS:
            suffix = ALPACA_SPLITS[i]
            if not question.endswith(" " + suffix):
                raise ValueError(f"record {i}: Question does not end with {suffix!r}")
            instruction = suffix
            case = question[: -len(suffix)].rstrip()
        item: dict = {"instruction": instruction, "input": case, "output": rec["Response"]}
        if i in ALPACA_SYSTEM:
            item["system"] = ALPACA_SYSTEM[i]
        if i in ALPACA_HISTORY:
            item["history"] = [list(pair) for pair in ALPACA_HISTORY[i]]
        out.append(item)
    return out


def build_sharegpt(records: list[dict[str, str]]) -> list[dict]:
    _check_indices("SHAREGPT_SYSTEM", SHAREGPT_SYSTEM, records)
    _check_indices("SHAREGPT_FOLLOWUPS", SHAREGPT_FOLLOWUPS, records)
    for i, (q, a) in SHAREGPT_FOLLOWUPS.items():
        if is_chinese(q) != is_chinese(records[i]["Question"]) or is_chinese(a) != is_chinese(q):
            raise ValueError(f"SHAREGPT_FOLLOWUPS: record {i} follow-up is in the wrong language")
    out = []
    for i, rec in enumerate(records):
        turns = []
        if i in SHAREGPT_SYSTEM:
            turns.append({"from": "system", "value": SHAREGPT_SYSTEM[i]})
        turns.append({"from": "human", "value": rec["Question"]})
        turns.append({"from": "gpt", "value": rec["Response"]})
        if i in SHAREGPT_FOLLOWUPS:
            q, a = SHAREGPT_FOLLOWUPS[i]
            turns.append({"from": "human", "value": q})
            turns.append({"from": "gpt", "value": a})
        out.append({"conversations": turns})
    return out


def build_cmedqa2(records: list[dict[str, str]]) -> tuple[list[list], list[list]]:
    _check_indices("CMEDQA_EXTRA_ANSWERS", CMEDQA_EXTRA_ANSWERS, records, chinese=True)
    questions: list[list] = [["question_id", "content"]]
    answers: list[list] = [["ans_id", "question_id", "content"]]
    qid, aid = QUESTION_ID_START, ANSWER_ID_START
    for i, rec in enumerate(records):
        if not is_chinese(rec["Question"]):
            continue
        questions.append([qid, rec["Question"]])
        for content in [rec["Response"], *CMEDQA_EXTRA_ANSWERS.get(i, [])]:
            answers.append([aid, qid, content])
            aid += 1
        qid += 1
    return questions, answers


# ---------------------------------------------------------------------------
# Serialisation (all outputs are UTF-8 with "\n" line endings)
# ---------------------------------------------------------------------------


def dump_json_array(items: list[dict]) -> str:
    return json.dumps(items, ensure_ascii=False, indent=2) + "\n"


def dump_jsonl(items: list[dict]) -> str:
    return "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)


def dump_csv(rows: list[list]) -> str:
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    writer.writerows(rows)
    return buf.getvalue()


def render_all(out_dir: Path = SAMPLE_DIR, source: Path = SOURCE) -> dict[Path, bytes]:
    records = load_source(source)
    questions, answers = build_cmedqa2(records)
    texts = {
        out_dir / "alpaca_sample.json": dump_json_array(build_alpaca(records)),
        out_dir / "sharegpt_sample.jsonl": dump_jsonl(build_sharegpt(records)),
        out_dir / "cmedqa2" / "question.csv": dump_csv(questions),
        out_dir / "cmedqa2" / "answer.csv": dump_csv(answers),
    }
    return {path: text.encode("utf-8") for path, text in texts.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if any output file is missing or out of date",
    )
    args = parser.parse_args(argv)

    outputs = render_all()
    stale = []
    for path, data in outputs.items():
        current = path.read_bytes() if path.exists() else None
        if current == data:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

    for path in outputs:
        rel = path.relative_to(ROOT)
        if args.check:
            print(f"{'STALE' if path in stale else 'ok   '} {rel}")
        else:
            print(f"{'wrote    ' if path in stale else 'unchanged'} {rel}")
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
