import json

import pytest

from medtune.core.errors import BadInput
from medtune.data.prepare import prepare

from conftest import SAMPLE, run_cli


def test_sample_set_is_bilingual_and_complete():
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(rows) >= 60
    zh = [r for r in rows if any("\u4e00" <= ch <= "\u9fff" for ch in r["Question"])]
    assert len(zh) >= 10 and len(rows) - len(zh) >= 10
    assert all(set(r) == {"Question", "Complex_CoT", "Response"} and all(r.values()) for r in rows)
    assert len({r["Question"] for r in rows}) == len(rows)


def test_prepare_writes_checked_splits(tmp_path, smollm2_dir):
    from transformers import AutoTokenizer

    out = tmp_path / "prep"
    res = prepare(SAMPLE, str(smollm2_dir), out)
    assert res.counts["read"] >= 60 and res.counts["train"] + res.counts["valid"] == res.counts["kept"]
    assert res.template["end_token"] == "<|im_end|>"  # from the template, not hard-coded
    train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    valid = [json.loads(x) for x in (out / "valid.jsonl").read_text().splitlines()]
    assert set(train[0]) == {"prompt", "completion"}
    assert train[0]["completion"].startswith("<think>\n") and "\n</think>\n\n" in train[0]["completion"]
    assert not any("<|im_end|>" in r["completion"] for r in train)  # the template adds it, exactly once
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in valid}

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": train[0]["prompt"]}, {"role": "assistant", "content": train[0]["completion"]}],
        tokenize=False,
    )
    assert rendered.rstrip().endswith("<|im_end|>")
    assert rendered.count("<|im_end|>") == 3  # default system, user, assistant
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["sha256"][str(SAMPLE)]
    assert manifest["first_example"]["rendered"].rstrip().endswith("<|im_end|>")
    assert manifest["tokens"]["max"] <= 2048


def test_split_is_reproducible_and_seeded(tmp_path, smollm2_dir):
    a = prepare(SAMPLE, str(smollm2_dir), tmp_path / "a", seed=1)
    b = prepare(SAMPLE, str(smollm2_dir), tmp_path / "b", seed=1)
    c = prepare(SAMPLE, str(smollm2_dir), tmp_path / "c", seed=2)
    read = lambda r: (r.out / "valid.jsonl").read_text()  # noqa: E731
    assert read(a) == read(b)
    assert read(a) != read(c)


def test_overlong_records_are_dropped_never_truncated(tmp_path, smollm2_dir):
    res = prepare(SAMPLE, str(smollm2_dir), tmp_path / "p", max_seq_length=300)
    assert res.counts["dropped"]["over max_seq_length"] > 0
    assert res.tokens["max"] <= 300
    with pytest.raises(BadInput, match="over --max-seq-length"):
        prepare(SAMPLE, str(smollm2_dir), tmp_path / "q", max_seq_length=300, overlong="error")


def test_dry_run_writes_nothing(tmp_path, smollm2_dir):
    res = prepare(SAMPLE, str(smollm2_dir), tmp_path / "dry", dry_run=True)
    assert not (tmp_path / "dry").exists()
    assert "<think>" in res.example["rendered"]


@pytest.mark.parametrize(
    "content, where, message",
    [
        (
            '{"Question": "a", "Complex_CoT": "b", "Response": "c"}\n{"Question": "x", "Complex_CoT": \n',
            ":2",
            "invalid JSON",
        ),
        ('{"Question": "a", "Complex_CoT": "b"}\n', ":1", "cannot tell the dataset format"),
        ('{"Question": "a", "Complex_CoT": "b", "Response": 5}\n', ":1", "expected text"),
        ("", "", "empty"),
        ('["not an object"]', "[0]", "not an object"),
    ],
)
def test_bad_input_names_the_place(tmp_path, smollm2_dir, content, where, message):
    bad = tmp_path / ("bad.json" if content.startswith("[") else "bad.jsonl")
    bad.write_text(content, encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(BadInput) as exc:
        prepare(bad, str(smollm2_dir), out)
    assert message in exc.value.line() and f"{bad}{where}" in exc.value.line()
    assert not out.exists()


def test_bad_input_via_cli_is_one_line_exit_2_and_keeps_previous_output(tmp_path, smollm2_dir):
    out = tmp_path / "out"
    ok = run_cli("prepare", SAMPLE, "--model", smollm2_dir, "--out", out)
    assert ok.returncode == 0, ok.stderr
    before = (out / "train.jsonl").read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"Question": "q", "Complex_CoT": "c", "Response": "r"}\n\xff\xfe broken\n')
    res = run_cli("prepare", bad, "--model", smollm2_dir, "--out", out)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert f"{bad}:2" in res.stderr and "hint:" in res.stderr
    assert (out / "train.jsonl").read_bytes() == before


@pytest.mark.parametrize(
    "given, message, hint",
    [
        ({"reasoning": "x"}, "--reasoning must be one of think, drop, inline, not 'x'", "e.g. --reasoning think"),
        ({"overlong": "cut"}, "--overlong must be one of drop, keep, error, not 'cut'", "e.g. --overlong drop"),
        ({"style": "x"}, "--style must be one of auto, completions, chat, text, not 'x'", "e.g. --style auto"),
        ({"answers": "best"}, "--answers must be one of all, first, not 'best'", "e.g. --answers all"),
        (
            {"valid_ratio": 0.6, "test_ratio": 0.5},
            "--valid-ratio and --test-ratio must be in [0, 1) and sum below 1",
            "e.g. --valid-ratio 0.1",
        ),
        ({"valid_ratio": -0.1}, "--valid-ratio and --test-ratio must be in [0, 1)", "e.g. --valid-ratio 0.1"),
        ({"limit": 0}, "--limit must be at least 1", "e.g. --limit 1000"),
        ({"sample": 0}, "--sample must be at least 1", "e.g. --sample 1000"),
        ({"max_seq_length": 0}, "--max-seq-length must be at least 1", "e.g. --max-seq-length 1000"),
    ],
)
def test_options_are_checked_before_any_work(tmp_path, given, message, hint):
    """PrepareOptions.check() judges the values; prepare() calls it before it touches the model or the data."""
    from medtune.data.options import PrepareOptions

    with pytest.raises(BadInput) as exc:
        PrepareOptions(**given).check()
    assert message in exc.value.message and exc.value.hint == hint
    with pytest.raises(BadInput) as exc:  # no model, no dataset: the options are refused first
        prepare(tmp_path / "missing.jsonl", "builtin:no-such-model", tmp_path / "out", **given)
    assert message in exc.value.message
    assert not (tmp_path / "out").exists()
    PrepareOptions().check()  # the defaults pass


def test_prepare_takes_the_options_dataclass_and_keywords_on_top(tmp_path, smollm2_dir):
    """prepare(opts=PrepareOptions(...)) as the CLI calls it; keywords (also the old names format=, map=) set fields on
    top, as medtune run's config sections and older scripts pass them."""
    from medtune.data.options import PrepareOptions

    opts = PrepareOptions(limit=6, token_stats=False, valid_ratio=0.0)
    a = prepare(SAMPLE, str(smollm2_dir), tmp_path / "a", opts)
    assert a.counts["examples"] == 6 and a.counts["valid"] == 0
    assert a.manifest["options"]["limit"] == 6 and a.manifest["options"]["token_stats"] is False
    b = prepare(
        SAMPLE, str(smollm2_dir), tmp_path / "b", opts, limit=4, format="medical-o1", map={"Question": "Question"}
    )
    assert b.counts["examples"] == 4 and b.format == "medical-o1"
    assert b.manifest["options"]["map"] == {"question": "Question"}
    assert opts.limit == 6  # the caller's options are not changed
    with pytest.raises(BadInput) as exc:
        prepare(SAMPLE, str(smollm2_dir), tmp_path / "c", max_seq_lenght=10)
    assert "max_seq_length" in exc.value.hint


@pytest.mark.parametrize("name", ["llama3.1", "llama3.2", "mistral", "gemma3"])
def test_prepare_checks_pass_on_the_new_families_templates(tmp_path, smollm2_dir, name):
    """Records prepared through Llama 3.1/3.2's, Mistral v0.3's and Gemma 3's real templates pass prepare's checks
    (prompt tokens a prefix, the end token once at the end, reasoning kept), and Llama 3.x's "Today Date" is
    medtune's fixed date, recorded in the manifest, not the day prepare ran (3.2 defaults to today)."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from medtune.export.chat_templates import FIXED_DATE

    from families import CASES, LLAMA32_TEMPLATE, write_tokenizer

    case = {**CASES["llama3.1"], "template": LLAMA32_TEMPLATE} if name == "llama3.2" else CASES[name]
    model = tmp_path / "tok"
    model.mkdir()
    write_tokenizer(model, Path(smollm2_dir), case)
    out = tmp_path / "prep"
    tok = AutoTokenizer.from_pretrained(str(model))
    res = prepare(SAMPLE, str(model), out, limit=12, tokenizer=tok)
    end = {"mistral": "</s>", "gemma3": "<end_of_turn>"}.get(name, "<|eot_id|>")
    assert res.template["end_token"] == end and res.counts["train"] > 0
    train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert all(r["completion"].startswith("<think>\n") and end not in r["completion"] for r in train)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["template_vars"] == {"date_string": FIXED_DATE}
    rendered = manifest["first_example"]["rendered"]
    assert rendered.count(end) == {"mistral": 1, "gemma3": 2}.get(name, 3)  # answer; +user; +system, user
    today = tok.apply_chat_template([{"role": "user", "content": "q"}], tokenize=False)
    if name.startswith("llama"):
        assert f"Today Date: {FIXED_DATE}\n\n" in rendered
        assert (FIXED_DATE in today) is (name == "llama3.1")  # 3.2 alone would have rendered today's date
