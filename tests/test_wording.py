"""One system prompt and one prompt wording from the prepared data to Ollama: `prepare --system --prompt-template`,
carried by the adapter's and the fused model's manifests to export (the Modelfile's SYSTEM), chat, generate, eval and
fidelity; the Modelfile's Go TEMPLATE (Ollama's rendering) and llama-server's rendering of the GGUF give the training
prompt token for token; bad wording refused with nothing written."""

from __future__ import annotations

import json

import pytest

from medtune.core.errors import BadInput
from medtune.data.prepare import prepare

from conftest import SAMPLE, run_cli
from families import CASES, write_tokenizer

SYSTEM = "你是一名专业的医生。请用简洁的语言回答。"
TEMPLATE = "问题：{question}\n回答："


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_llama_dir):
    from medtune.export import export
    from medtune.fuse import fuse
    from medtune.train import TrainOptions, train

    root = tmp_path_factory.mktemp("wording")
    (root / "system.txt").write_text(SYSTEM + "\n", encoding="utf-8")
    r = run_cli(
        "prepare", SAMPLE, "--model", tiny_llama_dir, "--out", root / "data", "--system", f"@{root / 'system.txt'}",
        "--prompt-template", r"问题：{question}\n回答：", "--limit", 10, "--valid-ratio", 0.2, "--max-seq-length", 1024,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    train(str(tiny_llama_dir), root / "data", root / "adapter", TrainOptions(iters=2, batch_size=2, num_layers=1))
    fuse(str(tiny_llama_dir), root / "adapter", root / "fused")
    res = export(root / "fused", root / "fused", "doc", quant=["f32"], modelfile_path=root / "doc.Modelfile")
    return root, res


def test_the_manifests_carry_the_wording_from_data_to_the_fused_model(exported):
    from medtune.data.wording import training_wording

    root, _ = exported
    manifest = json.loads((root / "data" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["options"]["system"].startswith("@") and manifest["wording"] == {
        "system": SYSTEM,
        "prompt_template": TEMPLATE,
    }
    shown = manifest["first_example"]["rendered"]
    assert SYSTEM in shown and "问题：" in shown and "\n回答：" in shown  # the first example as the model sees it
    for folder in ("data", "adapter", "fused"):
        assert training_wording(root / folder) == {"system": SYSTEM, "prompt_template": TEMPLATE}, folder


def test_ollama_and_llama_server_render_the_training_prompt_token_for_token(exported, tiny_llama_dir):
    """The held-out record's prompt, as training tokenized it, against what a client gets by sending the plain
    question: the Modelfile's TEMPLATE with its SYSTEM (Ollama's rendering, Go's text/template), and llama-server
    rendering the GGUF's chat template. Both put the question in training's wording themselves."""
    from transformers import AutoTokenizer

    from medtune.export.gotemplate import ollama_prompt
    from medtune.ollama import read_modelfile
    from medtune.runtimes.llama_server import LlamaServer

    root, res = exported
    spec = read_modelfile(root / "doc.Modelfile")
    assert spec.system == SYSTEM
    assert "# TEMPLATE (and the GGUF's template) word every question as training did" in res.modelfile_text
    tok = AutoTokenizer.from_pretrained(root / "fused")
    row = json.loads((root / "data" / "valid.jsonl").read_text(encoding="utf-8").splitlines()[0])
    system, user, _ = row["messages"]  # as prepared: the system prompt, the worded question, the answer
    assert system == {"role": "system", "content": SYSTEM} and user["content"].startswith("问题：")
    want = tok.apply_chat_template([system, user], tokenize=False, add_generation_prompt=True)
    want_ids = tok.encode(want, add_special_tokens=False)
    question = user["content"][len("问题：") : -len("\n回答：")]
    assert TEMPLATE.format(question=question) == user["content"]
    plain = [{"role": "user", "content": question}]
    ollama = ollama_prompt(spec.template, plain, spec.system)
    assert ollama == want and tok.encode(ollama, add_special_tokens=False) == want_ids
    # an earlier answer in the history keeps its text; the earlier question is worded too
    history = [{"role": "user", "content": "头痛"}, {"role": "assistant", "content": "多休息。"}, *plain]
    worded = [{**m, "content": TEMPLATE.format(question=m["content"])} if m["role"] == "user" else m for m in history]
    assert ollama_prompt(spec.template, history, spec.system) == tok.apply_chat_template(
        [system, *worded], tokenize=False, add_generation_prompt=True
    )
    with LlamaServer(res.gguf_paths["f32"], ctx=1024, n_threads=1) as srv:
        served = srv.apply_template([{"role": "system", "content": spec.system}, *plain])
        assert served == want
        assert srv.tokenize(served, add_special=False) == want_ids
        # the GGUF's chat template has training's system prompt as its default: a client that sends none gets it
        assert srv.apply_template(plain) == want
    manifest = json.loads(res.manifest_path.read_text(encoding="utf-8"))
    assert manifest["result"]["prompt_wording"] == ["问题：", "\n回答："]


def test_the_fused_chat_template_defaults_to_the_training_system_prompt(exported, tiny_llama_dir):
    from medtune.export.modelfile import detect_family

    root, _ = exported
    assert detect_family(root / "fused").default_system == SYSTEM
    assert detect_family(tiny_llama_dir).default_system != SYSTEM  # the base's own is left alone
    fused = json.loads((root / "fused" / "medtune_manifest.json").read_text(encoding="utf-8"))
    assert fused["wording"]["template_default"] == "set"


def test_export_warns_when_its_system_prompt_differs_from_training(exported, tmp_path):
    from medtune.export import export

    root, _ = exported
    res = export(root / "fused", tmp_path, "other", quant=["f32"], modelfile_path=tmp_path / "o.Modelfile",
                 system="You are a pirate.")  # fmt: skip
    assert any("differs from the system prompt training saw" in w for w in res.warnings)
    manifest = json.loads(res.manifest_path.read_text(encoding="utf-8"))
    assert manifest["options"]["system"] == "You are a pirate."


def test_generate_and_fidelity_ask_in_the_training_wording(exported):
    root, res = exported
    r = run_cli("generate", root / "fused", "--prompt", "发烧怎么办？", "--max-tokens", 2, "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)[0]["prompt"] == TEMPLATE.format(question="发烧怎么办？")
    assert "system prompt from training" in r.stderr
    r = run_cli("eval", "fidelity", root / "fused", res.gguf_paths["f32"], "--limit", 1, "--tokens", 4, "--json")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert any("system prompt and wording training saw" in n for n in report["notes"])
    # llama-server was sent the plain question (and plain probe conversations) and rendered the worded one
    assert any("llama-server is sent it plain" in n for n in report["notes"]), report["notes"]
    assert report["passed"] and report["summary"]["templates_equal"] == report["summary"]["templates"] > 0
    assert all(p["rendered_equal"] and p["tokens_equal"] for p in report["prompts"])


def test_a_template_of_several_fields_is_left_to_the_client_and_said(exported, tmp_path):
    """A wording that needs several fields of a record cannot be built from one question: the served templates are
    left plain (no wording in either), and export says the client must send it."""
    import shutil

    from medtune.export import export, read_gguf_header
    from medtune.export.chat_templates import words_user_turns

    root, _ = exported
    fused = tmp_path / "fused"
    shutil.copytree(root / "fused", fused)
    manifest = json.loads((fused / "medtune_manifest.json").read_text(encoding="utf-8"))
    manifest["wording"]["prompt_template"] = "以下是指令：{instruction}\n输入：{input}\n请生成输出。"
    (fused / "medtune_manifest.json").write_text(json.dumps(manifest, ensure_ascii=False), encoding="utf-8")
    res = export(fused, tmp_path, "multi", quant=["f32"], modelfile_path=tmp_path / "m.Modelfile")
    assert any("is not served (it needs several fields of a record)" in w for w in res.warnings), res.warnings
    assert "word every question" not in res.modelfile_text and "以下是指令" not in res.modelfile_text
    meta = read_gguf_header(res.gguf_paths["f32"])["metadata"]
    assert not words_user_turns(meta["tokenizer.chat_template"])
    assert json.loads(res.manifest_path.read_text(encoding="utf-8"))["result"]["prompt_wording"] is None


def test_field_names_match_the_records_in_any_case(tmp_path, tiny_llama_dir):
    from medtune.data.wording import user_wrap, word_prompt

    assert word_prompt("发烧？", "问题：{Question}\n回答：") == "问题：发烧？\n回答："
    assert (
        user_wrap("Q {{x}}: {Question}!") == ("Q {x}: ", "!")
        and user_wrap("{a} {A}") is None
        and user_wrap("{a}{b}") is None
    )
    src = tmp_path / "alpaca.jsonl"
    src.write_text(json.dumps({"instruction": "Name a beta blocker.", "output": "Atenolol."}) + "\n", encoding="utf-8")
    prepare(src, str(tiny_llama_dir), tmp_path / "d", prompt_template="Task: {Instruction}", valid_ratio=0.0,
            token_stats=False)  # fmt: skip
    row = json.loads((tmp_path / "d" / "train.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert "Task: Name a beta blocker." in json.dumps(row, ensure_ascii=False)


@pytest.mark.parametrize(
    "flags, said",
    [
        (("--prompt-template", "Q: {questoin}"), "missing field 'questoin'"),
        (("--prompt-template", "Q: {question"), "--prompt-template"),
        (("--prompt-template", "no field"), "names no field"),
        (("--system", "@{empty}"), "--system is empty"),
        (("--system", "@/no/such/file.txt"), "no such file"),
    ],
)
def test_bad_wording_is_refused_and_nothing_is_written(tmp_path, tiny_llama_dir, flags, said):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n", encoding="utf-8")
    flags = [f.replace("{empty}", str(empty)) if f.startswith("@") else f for f in flags]
    r = run_cli("prepare", SAMPLE, "--model", tiny_llama_dir, "--out", tmp_path / "x", *flags)
    assert r.returncode == 2 and said in r.stderr, r.stderr[-1500:]
    assert not (tmp_path / "x").exists()
    if "questoin" in said:
        assert f"{SAMPLE}:1" in r.stderr


def test_a_system_prompt_replaces_a_records_own_and_says_so(tmp_path, tiny_llama_dir):
    src = tmp_path / "alpaca.jsonl"
    src.write_text(
        json.dumps({"system": "Be terse.", "instruction": "Name a beta blocker.", "output": "Atenolol."}) + "\n"
        + json.dumps({"instruction": "Name an ACE inhibitor.", "output": "Ramipril."}) + "\n",
        encoding="utf-8",
    )  # fmt: skip
    res = prepare(src, str(tiny_llama_dir), tmp_path / "d", system=SYSTEM, valid_ratio=0.0, token_stats=False)
    assert any("replaced the records' own system prompt in 1 example" in n for n in res.notes)
    rows = [json.loads(x) for x in (tmp_path / "d" / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert all(SYSTEM in (r.get("prompt") or json.dumps(r, ensure_ascii=False)) for r in rows)
    with pytest.raises(BadInput, match="plain-text records"):
        (tmp_path / "t.jsonl").write_text('{"text": "some text"}\n', encoding="utf-8")
        prepare(tmp_path / "t.jsonl", str(tiny_llama_dir), tmp_path / "t", system=SYSTEM)


def test_an_adapter_export_carries_the_system_prompt_and_says_the_wording_is_the_clients(exported, tmp_path):
    root, _ = exported
    r = run_cli("export", root / "adapter", "--name", "docl", "--base-out", tmp_path / "base", "--out", tmp_path,
                "--modelfile", tmp_path / "docl.Modelfile")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "is not served (the shared base GGUF's template serves every adapter)" in r.stderr
    from medtune.ollama import read_modelfile

    spec = read_modelfile(tmp_path / "docl.Modelfile")
    assert spec.system == SYSTEM and "问题" not in spec.template


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c].get("template")])
def test_every_familys_templates_take_the_wording(case, tmp_path, smollm2_dir, smollm2_gguf):
    """For each chat-template family: the Go TEMPLATE (Go's text/template) and the GGUF's Jinja template (in
    transformers and in llama-server's own engine), with the wording added, render the plain conversation exactly
    as the unchanged templates render the worded one."""
    from medtune.export.chat_templates import with_fixed_vars, with_user_wording
    from medtune.export.modelfile import check_user_wording
    from medtune.export.tokenizer import chat_template
    from medtune.runtimes.llama_server import LlamaServer

    folder = tmp_path / case
    folder.mkdir()
    write_tokenizer(folder, smollm2_dir, CASES[case])
    jinja = with_fixed_vars(chat_template(folder))
    wrap = ("问题：", "\n回答：")
    assert check_user_wording(folder, jinja, wrap) is None
    plain = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "头痛怎么办？"},
        {"role": "assistant", "content": "多休息。"},
        {"role": "user", "content": "发烧呢？"},
    ]
    worded = [{**m, "content": wrap[0] + m["content"] + wrap[1]} if m["role"] == "user" else m for m in plain]
    rendered = []
    for template, conv in ((jinja, worded), (with_user_wording(jinja, *wrap), plain)):
        (tmp_path / "t.jinja").write_text(template, encoding="utf-8")
        extra = ["--chat-template-file", str(tmp_path / "t.jinja")]
        with LlamaServer(smollm2_gguf, ctx=512, n_threads=1, extra=extra) as srv:
            rendered.append(srv.apply_template(conv))
    assert "问题：发烧呢？\n回答：" in rendered[1] and rendered[0] == rendered[1]
