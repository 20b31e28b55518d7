"""`medtune prepare` on preference data (DPO/ORPO pairs): every shape end to end on the embedded SmolLM2 tokenizer.

Shapes (medtune.data.formats, kind "preference"): prompt/chosen/rejected strings (TRL's standard records), chat-style
chosen/rejected message lists (UltraFeedback binarized; TRL's conversational records), LLaMA-Factory's alpaca and
sharegpt preference records. Each written record is {"prompt", "chosen", "rejected"}: the prompt rendered through the
chat template with its generation prompt, each completion ending in the end-of-turn token once.
"""

import csv
import json
import shutil
from pathlib import Path

import pytest

from medtune.core.errors import BadInput
from medtune.data import encode, formats
from medtune.data.prepare import prepare

from conftest import SAMPLE, run_cli

O1 = [json.loads(x) for x in SAMPLE.read_text(encoding="utf-8").splitlines() if x.strip()]
END = "<|im_end|>"


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    return path


def all_rows(out: Path) -> list[dict]:
    rows = []
    for side in ("train", "valid", "test"):
        p = out / f"{side}.jsonl"
        if p.exists():
            rows += [json.loads(x) for x in p.read_text(encoding="utf-8").splitlines()]
    return rows


def standard(n: int = 12, start: int = 0) -> list[dict]:
    """prompt/chosen/rejected strings from the medical sample: the real answer against a useless one."""
    return [
        {"prompt": r["Question"], "chosen": r["Response"], "rejected": f"I cannot say ({i})."}
        for i, r in enumerate(O1[start : start + n], start=start)
    ]


def assert_pairs(tok, out: Path, conversations: dict | None = None) -> list[dict]:
    """Every written pair: the three fields only; the prompt ends with the generation prompt; each completion ends in
    the end token, holds it once, and is what the chat template renders after the prompt; encode_pair splits the
    tokens of each whole side after the prompt's. conversations: {prompt text: (chosen messages, rejected messages)}
    to render independently through transformers."""
    end = tok.convert_tokens_to_ids(END)
    rows = all_rows(out)
    assert rows
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected"} and encode.is_pair(row)
        assert row["prompt"].endswith("<|im_start|>assistant\n")
        assert row["chosen"] != row["rejected"]
        prompt_ids, chosen_ids, rejected_ids = encode.encode_pair(tok, row)
        assert prompt_ids == tok(row["prompt"], add_special_tokens=False)["input_ids"]
        (chosen_item, rejected_item) = encode.encode_pair_items(tok, [row])[0]  # the trainer's items
        assert chosen_item == (prompt_ids + chosen_ids, len(prompt_ids))
        assert rejected_item == (prompt_ids + rejected_ids, len(prompt_ids))
        for side, ids in (("chosen", chosen_ids), ("rejected", rejected_ids)):
            assert row[side].endswith(END) and row[side].count(END) == 1
            assert ids and ids[-1] == end and ids.count(end) == 1
            assert prompt_ids + ids == tok(row["prompt"] + row[side], add_special_tokens=False)["input_ids"]
        if conversations is not None:
            chosen_msgs, rejected_msgs = conversations[row["prompt"]]
            for side, msgs in (("chosen", chosen_msgs), ("rejected", rejected_msgs)):
                full = tok.apply_chat_template(msgs, tokenize=False)
                head = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
                assert head == row["prompt"]  # the same prompt on both sides, as the template renders it
                assert full.startswith(row["prompt"] + row[side]) and not full[len(head + row[side]) :].strip()
    return rows


# ---- each shape end to end -------------------------------------------------------------------------------
def test_prompt_chosen_rejected_strings_with_system(tmp_path, smollm2_dir, tok):
    recs = standard(12)
    recs[1]["system"] = "You are a careful clinician."
    path = write_jsonl(tmp_path / "pairs.jsonl", recs)
    res = prepare(path, str(smollm2_dir), tmp_path / "out")
    assert (res.kind, res.format, res.style) == ("preference", "preference", "preference")
    assert res.counts["pairs"] == res.counts["kept"] == 12 and res.counts["dropped"] == {}

    def msgs(r, answer):
        system = [{"role": "system", "content": r["system"]}] if r.get("system") else []
        return system + [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": answer}]

    convs = {}
    for r in recs:
        chosen, rejected = msgs(r, r["chosen"]), msgs(r, r["rejected"])
        convs[tok.apply_chat_template(chosen[:-1], tokenize=False, add_generation_prompt=True)] = (chosen, rejected)
    rows = assert_pairs(tok, tmp_path / "out", convs)
    assert any("<|im_start|>system\nYou are a careful clinician.<|im_end|>" in r["prompt"] for r in rows)

    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["kind"] == "preference" and manifest["options"]["format"] == "preference"
    assert manifest["counts"]["pairs"] == 12
    assert manifest["end_token_added_by"].startswith("record")
    tokens = manifest["tokens"]  # the pair's length is its longer side's; each part has its statistics too
    assert set(tokens["sides"]) == {"prompt", "chosen", "rejected"}
    assert tokens["max"] == max(tokens["sides"]["chosen"]["max"], tokens["sides"]["rejected"]["max"]) <= 2048
    assert tokens["sides"]["prompt"]["max"] < tokens["sides"]["chosen"]["max"]
    first = manifest["first_example"]
    assert first["rendered"] == first["record"]["prompt"] + first["record"]["chosen"]
    assert first["rendered_rejected"] == first["record"]["prompt"] + first["record"]["rejected"]


def test_ultrafeedback_binarized_shape_and_trl_conversational(tmp_path, smollm2_dir, tok):
    """HuggingFaceH4/ultrafeedback_binarized's fields: prompt, prompt_id, chosen/rejected [user, assistant] lists,
    messages, score_chosen, score_rejected (scores and messages ignored). It has `messages`: SFT's chat format must
    not take it."""
    recs, convs = [], {}
    for i, r in enumerate(O1[:10]):
        user = {"role": "user", "content": r["Question"]}
        chosen = [user, {"role": "assistant", "content": r["Response"]}]
        rejected = [user, {"role": "assistant", "content": f"No idea, sorry ({i})."}]
        recs.append(
            {
                "prompt": r["Question"],
                "prompt_id": f"{i:064x}",
                "chosen": chosen,
                "rejected": rejected,
                "messages": chosen,
                "score_chosen": 9.0,
                "score_rejected": 2.5,
            }
        )
        convs[tok.apply_chat_template([user], tokenize=False, add_generation_prompt=True)] = (chosen, rejected)
    # a multi-turn pair: the conversation before the last assistant turn is the prompt, the same on both sides
    history = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is a fever?"},
        {"role": "assistant", "content": "A raised body temperature."},
        {"role": "user", "content": "When is it dangerous in adults?"},
    ]
    chosen = history + [{"role": "assistant", "content": "Above 39.4 C, or with confusion or a stiff neck."}]
    rejected = history + [{"role": "assistant", "content": "Never."}]
    recs.append({"prompt": "When is it dangerous in adults?", "chosen": chosen, "rejected": rejected})
    convs[tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)] = (chosen, rejected)
    path = write_jsonl(tmp_path / "uf.jsonl", recs)
    res = prepare(path, str(smollm2_dir), tmp_path / "out")
    assert (res.kind, res.format) == ("preference", "preference-chat") and res.counts["kept"] == 11
    rows = assert_pairs(tok, tmp_path / "out", convs)
    multi = next(r for r in rows if "When is it dangerous" in r["prompt"])
    assert "A raised body temperature.<|im_end|>" in multi["prompt"]  # the earlier turns are prompt

    # TRL's conversational preference records: the prompt as messages, each side only the answer; the reasoning
    # beside an answer goes into the think block as SFT puts it
    trl = [
        {
            "prompt": [{"role": "user", "content": r["Question"]}],
            "chosen": [{"role": "assistant", "content": r["Response"], "reasoning_content": r["Complex_CoT"]}],
            "rejected": [{"role": "assistant", "content": f"Rest and fluids ({i})."}],
        }
        for i, r in enumerate(O1[10:16])
    ]
    res = prepare(write_jsonl(tmp_path / "trl.jsonl", trl), str(smollm2_dir), tmp_path / "trl")
    assert res.format == "preference-chat" and res.counts["kept"] == 6
    rows = assert_pairs(tok, tmp_path / "trl")
    by_prompt = {r["prompt"]: r for r in rows}
    for r in O1[10:16]:
        head = tok.apply_chat_template(
            [{"role": "user", "content": r["Question"]}], tokenize=False, add_generation_prompt=True
        )
        row = by_prompt[head]
        assert row["chosen"] == f"<think>\n{r['Complex_CoT']}\n</think>\n\n{r['Response']}{END}"


def test_llama_factory_alpaca_preference_json_array(tmp_path, smollm2_dir, tok):
    """LLaMA-Factory's alpaca preference records (data/README.md): instruction, input (optional), chosen, rejected;
    its alpaca converter also reads system and history. A JSON array, as its demo files are."""
    recs = [
        {"instruction": r["Question"], "input": "", "chosen": r["Response"], "rejected": f"Unsure ({i})."}
        for i, r in enumerate(O1[:8])
    ]
    recs[0]["input"] = "Patient is 54 years old."
    recs[1]["system"] = "You are a triage nurse."
    recs[1]["history"] = [["Hello", "Hello, how can I help?"]]
    path = tmp_path / "alpaca_pref.json"
    path.write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    res = prepare(path, str(smollm2_dir), tmp_path / "out")
    assert (res.kind, res.format) == ("preference", "alpaca-preference") and res.counts["kept"] == 8
    rows = assert_pairs(tok, tmp_path / "out")
    prompts = [r["prompt"] for r in rows]
    assert any(f"{recs[0]['instruction']}\n\nPatient is 54 years old.<|im_end|>" in p for p in prompts)
    with_history = next(p for p in prompts if "You are a triage nurse." in p)
    assert "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHello, how can I help?<|im_end|>" in with_history


def test_llama_factory_sharegpt_preference(tmp_path, smollm2_dir, tok):
    """LLaMA-Factory's sharegpt preference records (data/README.md, dpo_en_demo.json): conversations up to a human
    turn (a system turn may come first), chosen and rejected one {from: gpt, value} turn each."""
    recs = []
    for i, r in enumerate(O1[:8]):
        conv = [{"from": "human", "value": r["Question"]}]
        if i == 0:
            conv = [
                {"from": "system", "value": "You are a physician."},
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello."},
            ] + conv
        recs.append(
            {
                "conversations": conv,
                "chosen": {"from": "gpt", "value": r["Response"]},
                "rejected": {"from": "gpt", "value": f"Ask someone else ({i})."},
            }
        )
    path = write_jsonl(tmp_path / "sharegpt_pref.jsonl", recs)
    res = prepare(path, str(smollm2_dir), tmp_path / "out")
    assert (res.kind, res.format) == ("preference", "sharegpt-preference") and res.counts["kept"] == 8
    rows = assert_pairs(tok, tmp_path / "out")
    first = next(r for r in rows if "You are a physician." in r["prompt"])
    assert "<|im_start|>assistant\nHello.<|im_end|>" in first["prompt"]
    assert first["prompt"].endswith(f"{O1[0]['Question']}<|im_end|>\n<|im_start|>assistant\n")


def test_csv_and_parquet_sources(tmp_path, smollm2_dir, tok):
    recs = standard(8)
    path = tmp_path / "pairs.csv"
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["prompt", "chosen", "rejected"])
        w.writeheader()
        w.writerows(recs)
    res = prepare(path, str(smollm2_dir), tmp_path / "csv")
    assert res.format == "preference" and res.counts["kept"] == 8
    assert_pairs(tok, tmp_path / "csv")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "pairs.parquet")
    res = prepare(tmp_path / "pairs.parquet", str(smollm2_dir), tmp_path / "pq")
    assert res.format == "preference" and res.counts["kept"] == 8
    assert sorted(map(json.dumps, all_rows(tmp_path / "pq"))) == sorted(map(json.dumps, all_rows(tmp_path / "csv")))


# ---- drops, length, detection ----------------------------------------------------------------------------
def test_identical_empty_and_mismatched_pairs_are_dropped_and_counted(tmp_path, smollm2_dir, tok):
    good = standard(6)
    user = {"role": "user", "content": "Is aspirin safe in pregnancy?"}
    other = {"role": "user", "content": "Is ibuprofen safe in pregnancy?"}
    bad = [
        {"prompt": "Same?", "chosen": "Yes.", "rejected": "Yes."},  # identical sides
        {"prompt": "Same after cleaning?", "chosen": "Yes.", "rejected": "  Yes.\r\n"},  # identical once cleaned
        {"prompt": "Empty?", "chosen": "Something.", "rejected": "   "},  # an empty side
        {"prompt": "Null?", "chosen": None, "rejected": "Something."},  # a null side is an empty side
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", good + bad)
    res = prepare(path, str(smollm2_dir), tmp_path / "out")
    assert res.counts["dropped"] == {"identical sides": 2, "empty rejected": 1, "empty chosen": 1}
    assert res.counts["kept"] == res.counts["pairs"] == 6
    assert_pairs(tok, tmp_path / "out")

    def uf(first, second):
        return {
            "chosen": [first, {"role": "assistant", "content": "Low dose only, ask your doctor."}],
            "rejected": [second, {"role": "assistant", "content": "Always."}],
        }

    chat = [uf(user, user), uf(user, other)]  # the second pair's two prompts differ
    res = prepare(write_jsonl(tmp_path / "uf.jsonl", chat), str(smollm2_dir), tmp_path / "uf")
    assert res.counts["dropped"] == {"prompts differ": 1} and res.counts["kept"] == 1
    manifest = json.loads((tmp_path / "uf" / "manifest.json").read_text())
    assert manifest["counts"]["dropped"] == {"prompts differ": 1}


def test_max_seq_length_applies_to_the_longer_side(tmp_path, smollm2_dir, tok):
    short = standard(6)
    long_ = [
        {"prompt": f"Long case {i}: what now?", "chosen": "Refer.", "rejected": " ".join(["rambling"] * 1500)}
        for i in range(3)
    ]

    def length(r, side):
        msgs = [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r[side]}]
        return len(tok.apply_chat_template(msgs, tokenize=True, return_dict=False))

    limit = max(max(length(r, "chosen"), length(r, "rejected")) for r in short)
    assert all(length(r, "chosen") <= limit < length(r, "rejected") for r in long_)  # only the longer side is over
    path = write_jsonl(tmp_path / "pairs.jsonl", short + long_)
    res = prepare(path, str(smollm2_dir), tmp_path / "out", max_seq_length=limit)
    assert res.counts["dropped"] == {"over max_seq_length": 3} and res.counts["kept"] == 6
    assert res.tokens["max"] <= limit
    for row in all_rows(tmp_path / "out"):
        p, c, r = encode.encode_pair(tok, row)
        assert len(p) + max(len(c), len(r)) <= limit
    with pytest.raises(BadInput, match="over --max-seq-length") as exc:
        prepare(path, str(smollm2_dir), tmp_path / "err", max_seq_length=limit, overlong="error")
    assert f"{path}:7" in exc.value.line()


UF = {
    "prompt": "q",
    "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
    "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
    "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
    "score_chosen": 8.0,
    "score_rejected": 2.0,
}
DETECT = [
    ({"prompt": "q", "chosen": "a", "rejected": "b"}, "preference"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "system": "s"}, "preference"),
    (UF, "preference-chat"),
    ({"chosen": UF["chosen"], "rejected": UF["rejected"]}, "preference-chat"),
    ({"instruction": "q", "input": "", "chosen": "a", "rejected": "b"}, "alpaca-preference"),
    (
        {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"}, "rejected": {}},
        "sharegpt-preference",
    ),
    # SFT records stay SFT: no preference format may take them
    ({"prompt": "q", "completion": "a"}, "completions"),
    ({"messages": UF["messages"]}, "chat"),
    ({"instruction": "q", "input": "", "output": "a"}, "alpaca"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "sharegpt"),
    ({"Question": "q", "Complex_CoT": "c", "Response": "a"}, "medical-o1"),
    ({"text": "t"}, "text"),
]


@pytest.mark.parametrize("record, name", DETECT, ids=[d[1] + str(i) for i, d in enumerate(DETECT)])
def test_detection_keeps_preference_and_sft_apart(record, name):
    fmt = formats.detect(record, "x.jsonl:1")
    assert fmt.name == name
    assert fmt.kind == ("preference" if "chosen" in record else "sft")


def test_style_and_format_flags(tmp_path, smollm2_dir, tok):
    path = write_jsonl(tmp_path / "pairs.jsonl", standard(4))
    with pytest.raises(BadInput, match="--style completions does not apply to preference data"):
        prepare(path, str(smollm2_dir), tmp_path / "s", style="completions")
    with pytest.raises(BadInput, match="missing field 'instruction'") as exc:  # --format names a preference entry
        prepare(path, str(smollm2_dir), tmp_path / "f", fmt="alpaca-preference")
    assert f"{path}:1" in exc.value.line()
    with pytest.raises(BadInput, match="missing field 'chosen'"):  # an SFT file under a preference format
        prepare(SAMPLE, str(smollm2_dir), tmp_path / "g", fmt="preference", mapping="prompt=Question")
    res = prepare(path, str(smollm2_dir), tmp_path / "ok", fmt="preference")
    assert res.format == "preference" and res.counts["kept"] == 4
    res = prepare(path, str(smollm2_dir), tmp_path / "sampled", token_stats=False)  # checks a sample, no statistics
    assert res.counts["kept"] == 4 and res.tokens == {}
    assert_pairs(tok, tmp_path / "sampled")


STRIP_THINK = (
    "{% for message in messages %}{% set content = message['content'] %}"
    "{% if message['role'] == 'assistant' and '</think>' in content %}"
    "{% set content = content.split('</think>')[-1].lstrip() %}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_a_template_that_deletes_think_blocks_keeps_the_reasoning(tmp_path, smollm2_dir, tok):
    """As SFT writes such data as pre-rendered text, each completion is then the answer with its reasoning and the
    end token as written, after the template's prompt."""
    d = tmp_path / "model"
    shutil.copytree(smollm2_dir, d, ignore=shutil.ignore_patterns("*.safetensors"))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = STRIP_THINK
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").write_bytes(b"")  # the folder checks want weights; prepare reads only the tokenizer
    recs = [
        {
            "chosen": [
                {"role": "user", "content": r["Question"]},
                {"role": "assistant", "content": r["Response"], "reasoning_content": r["Complex_CoT"]},
            ],
            "rejected": [{"role": "user", "content": r["Question"]}, {"role": "assistant", "content": "Unsure."}],
        }
        for r in O1[:4]
    ]
    res = prepare(write_jsonl(tmp_path / "think.jsonl", recs), str(d), tmp_path / "out")
    assert res.style == "preference-text" and any("deletes <think> blocks" in n for n in res.notes)
    rows = assert_pairs(tok, tmp_path / "out")
    assert all(r["chosen"].startswith("<think>\n") and r["rejected"] == f"Unsure.{END}" for r in rows)


# ---- broken records: one clear error, nothing written ------------------------------------------------------
def _lines(*records) -> bytes:
    return "\n".join(json.dumps(r) for r in records).encode() + b"\n"


GOOD = {"prompt": "q", "chosen": "a", "rejected": "b"}
BAD = [
    ("missing-rejected.jsonl", _lines(GOOD, {"prompt": "q2", "chosen": "a"}), ":2", "missing field 'rejected'"),
    ("missing-chosen.jsonl", _lines({"prompt": "q", "rejected": "b"}), ":1", "missing field 'chosen'"),
    (
        "chosen-type.jsonl",
        _lines(GOOD, {"prompt": "q2", "chosen": 5, "rejected": "b"}),
        ":2",
        "field 'chosen' is a int",
    ),
    (
        "uf-type.jsonl",
        _lines(UF, {**UF, "rejected": "b"}),
        ":2",
        "field 'rejected' is a str, expected a list of {role, content} messages",
    ),
    (
        "sharegpt-side.jsonl",
        _lines({"conversations": [{"from": "human", "value": "q"}], "chosen": "a", "rejected": {"from": "gpt"}}),
        ":1",
        "field 'chosen' is a str, expected a {from, value} object",
    ),
    (
        "sharegpt-role.jsonl",
        _lines(
            {
                "conversations": [{"from": "human", "value": "q"}],
                "chosen": {"from": "gpt", "value": "a"},
                "rejected": {"from": "human", "value": "b"},
            }
        ),
        ":1",
        "rejected must be an assistant turn",
    ),
    (
        "sharegpt-ends.jsonl",
        _lines(
            {
                "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "x"}],
                "chosen": {"from": "gpt", "value": "a"},
                "rejected": {"from": "gpt", "value": "b"},
            }
        ),
        ":1",
        "conversations must end with a user turn",
    ),
    (
        "chat-ends.jsonl",
        _lines({"chosen": [{"role": "user", "content": "q"}], "rejected": UF["rejected"]}),
        ":1",
        "chosen must end with an assistant turn",
    ),
    ("end-token.jsonl", _lines(GOOD, {"prompt": "q2", "chosen": f"a{END}", "rejected": "b"}), ":2", "end-of-turn"),
]


@pytest.mark.parametrize("name, content, where, message", BAD, ids=[b[0] for b in BAD])
def test_broken_preference_records_are_refused_and_nothing_is_written(
    tmp_path, smollm2_dir, name, content, where, message
):
    path = tmp_path / name
    path.write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(BadInput) as exc:
        prepare(path, str(smollm2_dir), out)
    assert message in exc.value.line(), exc.value.line()
    assert f"{path}{where}:" in exc.value.line() and exc.value.hint
    assert not out.exists()


def test_skip_invalid_counts_broken_pairs(tmp_path, smollm2_dir):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(
        _lines(*standard(5), {"prompt": "q", "chosen": "a"}, {"prompt": "q", "chosen": [], "rejected": "b"})
    )
    res = prepare(path, str(smollm2_dir), tmp_path / "out", skip_invalid=True)
    assert res.counts["kept"] == 5
    assert sum(v for k, v in res.counts["dropped"].items() if k.startswith("invalid")) == 2


def test_cli_prepares_pairs_and_refuses_a_broken_file_in_one_line(tmp_path, smollm2_dir):
    good = write_jsonl(tmp_path / "pairs.jsonl", standard(6))
    out = tmp_path / "out"
    ok = run_cli("prepare", good, "--model", smollm2_dir, "--out", out, "--json")
    assert ok.returncode == 0, ok.stderr
    summary = json.loads(ok.stdout)
    assert summary["kind"] == "preference" and summary["counts"]["pairs"] == 6
    before = (out / "train.jsonl").read_bytes()

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(_lines(GOOD, {"prompt": "q2", "chosen": "a"}))
    res = run_cli("prepare", bad, "--model", smollm2_dir, "--out", out)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{bad}:2" in errors[0] and "'rejected'" in errors[0], res.stderr
    assert "hint:" in res.stderr
    assert (out / "train.jsonl").read_bytes() == before  # the previous good output is untouched

    dry = run_cli("prepare", good, "--model", smollm2_dir, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "preference → preference" in dry.stderr and "rejected side" in dry.stderr


FAMILIES = ["qwen2.5", "qwen3", "deepseek-r1-qwen", "deepseek-r1-jan-qwen", "llama3.1", "mistral", "gemma3"]


@pytest.mark.parametrize("name", FAMILIES)
def test_pairs_pass_the_checks_on_each_family_template(tmp_path, smollm2_dir, name):
    """Through each family's real chat template (tests/families.py): the prompt is the template's generation prompt,
    each side ends in that family's end token once, and the chosen side keeps its reasoning (templates that delete
    <think> blocks, or whose generation prompt opens one, get the answer as written: style preference-text)."""
    from transformers import AutoTokenizer

    from medtune.export.chat_templates import TEMPLATE_VARS

    from families import CASES, write_tokenizer

    model = tmp_path / "tok"
    model.mkdir()
    write_tokenizer(model, Path(smollm2_dir), CASES[name])
    tok = AutoTokenizer.from_pretrained(str(model))
    recs = [
        {
            "prompt": [{"role": "user", "content": r["Question"]}],
            "chosen": [{"role": "assistant", "content": r["Response"], "reasoning_content": r["Complex_CoT"]}],
            "rejected": [{"role": "assistant", "content": f"Rest and fluids ({i})."}],
        }
        for i, r in enumerate(O1[:6])
    ]
    res = prepare(write_jsonl(tmp_path / "trl.jsonl", recs), str(model), tmp_path / "out", tokenizer=tok)
    assert res.counts["kept"] == 6, res.counts
    info = res.template
    assert res.style == ("preference-text" if info["strips_think"] or not info["prompt_is_prefix"] else "preference")
    end, end_id = info["end_token"], info["end_token_id"]
    heads = {
        tok.apply_chat_template(
            [{"role": "user", "content": r["Question"]}], tokenize=False, add_generation_prompt=True, **TEMPLATE_VARS
        ): r
        for r in O1[:6]
    }
    for row in all_rows(tmp_path / "out"):
        src = heads[row["prompt"]]  # the prompt is exactly the template's generation prompt
        assert src["Complex_CoT"][:48] in row["chosen"] and src["Response"][-24:] in row["chosen"]
        prompt_ids, chosen_ids, rejected_ids = encode.encode_pair(tok, row)
        for side, ids in (("chosen", chosen_ids), ("rejected", rejected_ids)):
            assert row[side].endswith(end) and row[side].count(end) == 1
            assert ids[-1] == end_id and ids.count(end_id) == 1
