"""Export of Qwen2, Qwen3, DeepSeek-R1-distill (a qwen2 model, both template versions) and Llama 3 models, end to
end, on tiny random models built here with transformers (no hub, no mocks; the builders are tests/families.py).

Each tokenizer is SmolLM2's byte-level BPE vocabulary (fixture `smollm2_dir`) re-pointed to the pre-tokenizer
and special tokens of the family it stands for, with the family's real chat template. What is shown per model:
the GGUF tokenizes chat prompts exactly like the HF tokenizer, both as rendered by HF and as built by the
Modelfile's TEMPLATE through Ollama's pipeline (BOS included); llama.cpp's greedy continuation equals mlx_lm's
(the runtime medtune trains with); llama.cpp's logits equal transformers'; the chat-template family is the
right one and the Modelfile carries its stops.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from medtune.core.errors import BadInput
from medtune.export import export
from medtune.export.chat_templates import with_fixed_vars
from medtune.export.gguf_writer import plan_gguf, write_gguf
from medtune.export.gotemplate import ollama_prompt
from medtune.export.modelfile import FAMILIES, detect_family, parse_modelfile

from families import ARCHS, ARCHS_UNIT_ONLY, CASES, CHATS, TEXTS, arch_case, make_model, ollama_view

N_TOKENS = 20


@pytest.fixture(scope="module")
def built(tmp_path_factory, smollm2_dir):
    """case name -> exported model (built and exported on first use, once per module)."""
    root = tmp_path_factory.mktemp("archs")
    cache = {}

    def get(name):
        if name not in cache:
            case = CASES[name]
            model_dir = make_model(root / name / "hf", Path(smollm2_dir), case)
            result = export(model_dir, root / name / "out", f"t-{name}", quants=("f16", "f32"))
            cache[name] = {"case": case, "dir": model_dir, "result": result}
        return cache[name]

    return get


def _hf_tok(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def _llama(path):
    import llama_cpp

    # F32 KV cache: the comparison is of the file, not of llama.cpp's cache precision. One thread: on a
    # shared 2-core machine llama.cpp's threads wait on each other far longer than these tiny models compute.
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=512,
        n_threads=1,
        n_threads_batch=1,
        verbose=False,
        logits_all=True,
        type_k=0,
        type_v=0,
        seed=0,
    )


@functools.lru_cache(maxsize=None)
def _reader(path: str, mtime: float):
    """GGUFReader parses every metadata array when opened (seconds for a 49k vocabulary): open once."""
    import gguf

    return gguf.GGUFReader(path)


def _field(path, key):
    f = _reader(str(path), Path(path).stat().st_mtime).fields.get(key)
    return None if f is None else f.contents()


# ---- per model: metadata, family, Modelfile, tokens, greedy continuation, logits ------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_gguf_metadata_and_tensors(built, name):
    got = built(name)
    case, result = got["case"], got["result"]
    f16 = result.gguf_paths["f16"]
    summary = result.summaries[0]
    assert summary["arch"] == case["gguf_arch"] and summary["pre_tokenizer"] == case["pre"]
    assert _field(f16, "general.architecture") == case["gguf_arch"]
    a = case["gguf_arch"]
    head_dim = case.get("head_dim", 16)
    assert _field(f16, f"{a}.embedding_length") == 64 and _field(f16, f"{a}.block_count") == 2
    assert _field(f16, f"{a}.attention.head_count") == 4 and _field(f16, f"{a}.attention.head_count_kv") == 2
    assert _field(f16, f"{a}.context_length") == 1024 and _field(f16, f"{a}.feed_forward_length") == 128
    assert _field(f16, f"{a}.rope.dimension_count") == case.get("rope_dims", head_dim)  # Phi-4-mini: partial
    assert _field(f16, f"{a}.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert _field(f16, f"{a}.rope.freq_base") == pytest.approx(500000.0 if a == "llama" else 1000000.0)
    if head_dim * 4 != 64:
        assert _field(f16, f"{a}.attention.key_length") == head_dim == _field(f16, f"{a}.attention.value_length")
    else:
        assert _field(f16, f"{a}.attention.key_length") is None
    assert _field(f16, "tokenizer.ggml.add_bos_token") is bool(case.get("post_bos"))
    tokens = _field(f16, "tokenizer.ggml.tokens")
    assert tokens[_field(f16, "tokenizer.ggml.eos_token_id")] == case["tok"]["eos_token"]
    assert tokens[_field(f16, "tokenizer.ggml.bos_token_id")] == case["ids"]["bos"]
    assert _field(f16, "tokenizer.chat_template") == with_fixed_vars(case["template"])  # Llama 3.x: date fixed

    tensors = {t.name: t for t in _reader(str(f16), f16.stat().st_mtime).tensors}
    assert ("output.weight" in tensors) is not case["tied"]
    assert ("blk.0.attn_q.bias" in tensors) is (case["model"] == "Qwen2")  # q/k/v biases: qwen2 only
    assert ("blk.1.attn_q_norm.weight" in tensors) is (case["model"] == "Qwen3")
    assert ("rope_freqs.weight" in tensors) is bool(case.get("rope_scaling"))
    for tname, t in tensors.items():
        want = "F32" if len(t.shape) == 1 or tname.endswith("_norm.weight") else "F16"
        assert t.tensor_type.name == want, tname
    if case["model"] == "Qwen3":
        assert list(tensors["blk.0.attn_q.weight"].shape) == [64, 4 * head_dim]
        assert list(tensors["blk.0.attn_k_norm.weight"].shape) == [head_dim]


@pytest.mark.parametrize("name", list(CASES))
def test_family_and_modelfile(built, name):
    got = built(name)
    case, result = got["case"], got["result"]
    assert result.family == case["family"] == detect_family(got["dir"]).family.name
    cmds = parse_modelfile(result.modelfile_text)
    stops = [v for k, v in cmds if k == "stop"]
    assert stops[: len(case["stops"])] == case["stops"] and stops == result.stops
    assert [v for k, v in cmds if k == "template"] == [FAMILIES[case["family"]].template]  # BOS left to add_bos
    assert [v for k, v in cmds if k == "system"] == ([case["system"]] if case["system"] else [])
    (from_,) = [v for k, v in cmds if k == "model"]  # resolved as Ollama does: from the Modelfile's folder
    assert (result.modelfile_path.parent / from_).resolve() == result.gguf_paths["f16"].resolve()
    assert not result.warnings


@pytest.mark.parametrize("name", list(CASES))
def test_modelfile_template_renders_like_apply_chat_template(built, name):
    """The written Modelfile's TEMPLATE and SYSTEM, rendered the way Ollama renders them (the runtime adding the
    BOS that add_bos asks for), give apply_chat_template's prompt on every chat; replies with reasoning come back
    parsed into `thinking` where the TEMPLATE names `.Thinking`."""
    got = built(name)
    cmds = parse_modelfile(got["result"].modelfile_text)
    template = next(v for k, v in cmds if k == "template")
    system = next((v for k, v in cmds if k == "system"), None)
    bos = got["case"]["ids"]["bos"] if got["case"].get("post_bos") else ""
    tok = _hf_tok(got["dir"])
    for conv in CHATS:
        want = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert bos + ollama_prompt(template, ollama_view(conv, template), system) == want


@pytest.mark.parametrize("name", list(CASES))
def test_export_renders_the_template_like_apply_chat_template(built, name):
    """Export renders with the compiled template and the special tokens (no tokenizer, no torch);
    it must give apply_chat_template's text exactly."""
    from medtune.export.modelfile import _hf_renderer, hf_render

    model_dir = built(name)["dir"]
    render = _hf_renderer(Path(model_dir))
    for chat in CHATS:
        assert render(chat) == hf_render(model_dir, chat)


@pytest.mark.parametrize("name", list(CASES))
def test_llama_cpp_tokenizes_like_hf_directly_and_through_ollama(built, name):
    """HF renders, HF tokenizes without adding anything (as training does): llama.cpp gives the same ids for
    the same text, and for the prompt Ollama builds from the Modelfile (its BOS added by add_bos)."""
    pytest.importorskip("llama_cpp")
    got = built(name)
    tok = _hf_tok(got["dir"])
    llm = _llama(got["result"].gguf_paths["f16"])
    cmds = parse_modelfile(got["result"].modelfile_text)
    template = next(v for k, v in cmds if k == "template")
    system = next((v for k, v in cmds if k == "system"), None)
    for conv in CHATS:
        text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        want = tok(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == want
        ollama = ollama_prompt(template, ollama_view(conv, template), system)
        assert llm.tokenize(ollama.encode("utf-8"), special=True) == want, (ollama, text)
    for text in TEXTS:
        want = tok(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == want, text


def _mlx_greedy(model, ids, n):
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    return [int(t) for t, _ in generate_step(mx.array(ids), model, max_tokens=n)]


def _llama_greedy(llm, ids, n):
    out = []
    for t in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(t))
        if len(out) >= n:
            break
    return out


def _assert_greedy_agrees(mlx_model, llm, tok) -> None:
    """mlx_lm's and llama.cpp's greedy continuations of every chat prompt agree (all but one exactly; that one
    parts only at a near-tie)."""
    import mlx.core as mx

    agreeing = 0
    for conv in CHATS:
        ids = tok(tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True), add_special_tokens=False)[
            "input_ids"
        ]
        ours = _mlx_greedy(mlx_model, ids, N_TOKENS)
        assert len(ours) == N_TOKENS and len(set(ours)) > 3  # a continuation, not one token repeated
        theirs = _llama_greedy(llm, ids, N_TOKENS)
        if theirs == ours:
            agreeing += 1
            continue
        # llama.cpp's F16 matmul rounds the activations to F16 as well, and its sums run in another order
        # from one CPU build to the next: a parting is allowed only where MLX's two candidates are a
        # near-tie (what a wrong tensor or a wrong RoPE never gives: those move logits by whole units).
        k = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
        logits = np.array(mlx_model(mx.array([ids + ours[:k]]))[0, -1].astype(mx.float32))
        margin = abs(float(logits[ours[k]] - logits[theirs[k]]))
        assert margin < 0.02, (conv, k, margin)
    assert agreeing >= len(CHATS) - 1


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_continuation_equals_mlx_and_logits_equal_transformers(built, name):
    pytest.importorskip("llama_cpp")
    import torch
    from mlx_lm import load
    from transformers import AutoModelForCausalLM

    got = built(name)
    tok = _hf_tok(got["dir"])
    mlx_model, _ = load(str(got["dir"]))
    f16 = _llama(got["result"].gguf_paths["f16"])
    _assert_greedy_agrees(mlx_model, f16, tok)
    del f16

    hf = AutoModelForCausalLM.from_pretrained(str(got["dir"]), dtype=torch.float32).eval()
    f32 = _llama(got["result"].gguf_paths["f32"])
    ids = tok(tok.apply_chat_template(CHATS[2], tokenize=False, add_generation_prompt=True), add_special_tokens=False)[
        "input_ids"
    ]
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()
    f32.eval(ids)
    got_logits = np.array(f32.scores[: len(ids)])
    assert np.abs(want).max() > 1.0
    assert np.abs(got_logits - want).max() < 2e-3


# ---- chat templates: Ollama's prompt equals HF's, think blocks included ----------------------------------
def test_reasoning_in_history_renders_like_hf(built):
    """An assistant turn with reasoning: HF drops it from the history; in Ollama it arrives parsed out as
    `.Thinking` and the TEMPLATE renders the same text. Qwen3 with --think=false = enable_thinking=False."""
    for name in ("qwen3", "deepseek-r1-qwen", "deepseek-r1-jan-qwen"):
        got = built(name)
        tok = _hf_tok(got["dir"])
        template = FAMILIES[got["case"]["family"]].template
        conv = CHATS[3]
        hf = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert "Adults" not in hf
        bos = got["case"]["tok"]["bos_token"] if got["case"].get("post_bos") else ""
        assert bos + ollama_prompt(template, ollama_view(conv, template)) == hf
        assert "<think>\nAdults" in ollama_prompt(template, conv)  # unparsed reasoning stays: Ollama must parse it
    tok = _hf_tok(built("qwen3")["dir"])
    no_think = tok.apply_chat_template(CHATS[0], tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert ollama_prompt(FAMILIES["qwen3"].template, CHATS[0], think=False) == no_think
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # An assistant turn after the last user message shows its reasoning (empty or not), as HF does.
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>\nr\n</think>\n\nA"}]
    hf = tok.apply_chat_template(conv, tokenize=False)
    template = FAMILIES["qwen3"].template
    assert (
        ollama_prompt(template, ollama_view(conv, template))
        == hf
        == FAMILIES["qwen3"].render(conv, add_generation_prompt=False)
    )


def test_templates_name_thinking_between_think_tags():
    """Ollama infers a model's think tags from the text around `.Thinking` in the TEMPLATE (the innermost block
    holding the last `{{ .Thinking }}` must start with <think> and end with </think>): only then does it parse
    reasoning out of replies, which the two templates rely on."""
    for name in ("qwen3", "deepseek-r1", "deepseek-r1-jan"):
        template = FAMILIES[name].template
        last = template.rindex("{{ .Thinking }}")
        block_start = template.rindex("}}", 0, last - 1) + 2
        block_end = template.index("{{", last + len("{{ .Thinking }}"))
        assert template[block_start:last].strip() == "<think>"
        assert template[last + len("{{ .Thinking }}") : block_end].strip() == "</think>"
    for name in ("chatml", "generic", "llama3"):
        assert ".Thinking" not in FAMILIES[name].template


def test_bos_goes_into_the_template_when_the_runtime_adds_none(built, tmp_path):
    from medtune.export.modelfile import render_modelfile

    got = built("llama3")
    model = tmp_path / "nobos"
    shutil.copytree(got["dir"], model)
    tcfg = json.loads((model / "tokenizer_config.json").read_text())
    tcfg["add_bos_token"] = False
    (model / "tokenizer_config.json").write_text(json.dumps(tcfg))
    text, info = render_modelfile("/m.gguf", model)
    assert info["family"] == "llama3" and info["template"] == "<|begin_of_text|>" + FAMILIES["llama3"].template
    tok = _hf_tok(got["dir"])
    assert ollama_prompt(info["template"], CHATS[1]) == tok.apply_chat_template(
        CHATS[1], tokenize=False, add_generation_prompt=True
    )


def test_real_go_template_agrees(built, go_ollama_render):
    """Where a Go toolchain exists, run the new families' TEMPLATEs on Go's text/template itself."""
    convs = [
        *CHATS,
        [
            {"role": "system", "content": "S1"},
            {"role": "user", "content": "a"},
            {"role": "system", "content": "S2"},
            {"role": "user", "content": "b"},
        ],
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>\nr\n</think>\n\nA"}],
    ]
    cases, ours, hf = [], [], []
    for name in ("qwen3", "deepseek-r1-qwen", "deepseek-r1-jan-qwen", "llama3"):
        got = built(name)
        family = FAMILIES[got["case"]["family"]]
        bos = family.bos
        tok = _hf_tok(got["dir"])
        for conv in convs:
            for think in (None, False, True):
                msgs = ollama_view(conv, family.template)
                cases.append({"template": family.template, "system": "", "think": think, "messages": msgs})
                ours.append(ollama_prompt(family.template, msgs, think=think))
                prefill = conv[-1]["role"] == "assistant"
                if think is None and not (prefill and family.name.startswith("deepseek-r1")):
                    # (a DeepSeek reply continued in Ollama keeps its parsed reasoning; HF drops it)
                    hf.append(
                        (
                            len(ours) - 1,
                            tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=not prefill),
                            bos,
                        )
                    )
    got = go_ollama_render(cases)
    assert got == ours
    for i, want, bos in hf:
        assert bos + got[i] == want, (i, cases[i]["template"][:40])


# ---- refusals, before anything is written ---------------------------------------------------------------
def _tiny_config_dir(tmp_path, arch: str, **cfg) -> Path:
    """A config-only model folder: refusals based on config.json come before any weight or tokenizer."""
    d = tmp_path / arch
    d.mkdir()
    (d / "config.json").write_text(
        json.dumps(
            {
                "architectures": [arch],
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "intermediate_size": 128,
                "max_position_embeddings": 1024,
                "rms_norm_eps": 1e-6,
                "rope_theta": 1e6,
                **cfg,
            }
        )
    )
    return d


def test_unsupported_architecture_fails_before_writing(tmp_path, built, monkeypatch):
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)  # no llama.cpp checkout to fall back on
    model = tmp_path / "gpt2"
    shutil.copytree(built("qwen2.5")["dir"], model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (model / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    with pytest.raises(BadInput) as err:
        export(model, out, "x")
    msg = str(err.value)
    assert "GPT2LMHeadModel" in msg
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert name in msg
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(
    "arch, cfg, words",
    [
        ("Qwen2ForCausalLM", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, ["llama3", "linear, yarn"]),
        (
            "Qwen3ForCausalLM",
            {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "mscale": 0.7, "mscale_all_dim": 0.7}},
            ["mscale"],
        ),
        ("Qwen3ForCausalLM", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 16}}, ["beta_fast"]),
        ("Qwen2ForCausalLM", {"rope_scaling": {"type": "linear"}}, ["factor"]),
        ("Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 256}, ["use_sliding_window"]),
        ("LlamaForCausalLM", {"rope_scaling": {"rope_type": "longrope", "factor": 4.0}}, ["longrope"]),
        # Gemma 3: what llama.cpp's gemma3 graph cannot compute (_tiny_config_dir: head_dim defaults to 256)
        ("Gemma3ForCausalLM", {"query_pre_attn_scalar": 128}, ["query_pre_attn_scalar 128", "1/sqrt(256)"]),
        ("Gemma3ForCausalLM", {"attn_logit_softcapping": 50.0}, ["attn_logit_softcapping", "does not cap"]),
        ("Gemma3ForCausalLM", {"use_bidirectional_attention": True}, ["use_bidirectional_attention", "causally"]),
        ("Gemma3ForCausalLM", {"hidden_activation": "gelu"}, ["'gelu'", "tanh"]),
        ("Gemma3ForCausalLM", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, ["'yarn'", "linear"]),
        (
            "Gemma3ForCausalLM",
            {"sliding_window": 8, "layer_types": ["full_attention", "sliding_attention"]},
            ["layer_types", "every P-th layer global"],
        ),
        (
            "Gemma3ForCausalLM",
            {
                "layer_types": ["sliding_attention", "full_attention"],
                "rope_parameters": {
                    "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                    "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
                },
            },
            ["'linear' on the sliding layers", "global layers only"],
        ),
    ],
)
def test_config_refusals(tmp_path, arch, cfg, words):
    with pytest.raises(BadInput) as err:
        plan_gguf(_tiny_config_dir(tmp_path, arch, **cfg))
    msg = str(err.value) + " " + err.value.hint
    for w in words:
        assert w in msg


def test_text_changing_normalizer_refused(tmp_path, built):
    """llama.cpp does not normalise text: a tokenizer.json normalizer other than NFC would make it split
    text differently from training, so it is refused (with its name) rather than silently dropped."""
    model = tmp_path / "lower"
    shutil.copytree(built("qwen2.5")["dir"], model)
    tok = json.loads((model / "tokenizer.json").read_text(encoding="utf-8"))
    tok["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]}
    (model / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(BadInput, match="NFC\\+Lowercase"):
        plan_gguf(model)


def test_qwen3_output_projection_bias_refused(tmp_path):
    """llama.cpp's qwen3 graph has no attn_output bias: attention_bias=True models cannot be written."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        attention_bias=True,
    )
    Qwen3ForCausalLM(cfg).save_pretrained(str(tmp_path / "m"))
    with pytest.raises(BadInput, match=r"no GGUF counterpart.*o_proj\.bias"):
        plan_gguf(tmp_path / "m")


# ---- rope scaling: llama.cpp computes what transformers computes ---------------------------------------
@pytest.mark.parametrize(
    "base, scaling",
    [
        ("qwen3", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}),
        (
            "qwen3",
            {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "attention_factor": 1.3},
        ),
        ("qwen2.5", {"rope_type": "linear", "factor": 2.0}),
    ],
)
def test_rope_scaling_logits_match_transformers(built, tmp_path, base, scaling):
    pytest.importorskip("llama_cpp")
    import torch
    from transformers import AutoModelForCausalLM

    from medtune import archs
    from medtune.models.config import normalise_config, read_config

    model = tmp_path / "scaled"
    shutil.copytree(built(base)["dir"], model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_theta": cfg["rope_theta"], **scaling}
    cfg.pop("rope_scaling", None)
    (model / "config.json").write_text(json.dumps(normalise_config(cfg)))
    write_gguf(model, tmp_path / "s.gguf", "f32")
    hparams = {k: v for k, _, v in archs.for_config(read_config(model)).hparams(0)}
    a = built(base)["case"]["gguf_arch"]
    assert hparams[f"{a}.rope.scaling.type"] == scaling["rope_type"]
    assert hparams[f"{a}.rope.scaling.factor"] == scaling["factor"]
    ids = list(range(300, 420))
    hf = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()
    llm = _llama(tmp_path / "s.gguf")
    llm.eval(ids)
    assert np.abs(np.array(llm.scores[: len(ids)]) - want).max() < 2e-3


# ---- the architecture table (families.ARCHS): every class in medtune.archs, the same four tests -------------
@pytest.fixture(scope="module")
def arch_built(tmp_path_factory, smollm2_dir):
    """HF architecture name -> its tiny model, its F32 GGUF and that GGUF imported back (built once)."""
    from medtune.models.gguf_import import import_gguf

    root = tmp_path_factory.mktemp("arch-table")
    cache = {}

    def get(hf_arch):
        if hf_arch not in cache:
            case = arch_case(hf_arch)
            model_dir = make_model(root / hf_arch / "hf", Path(smollm2_dir), case)
            gguf_path = root / hf_arch / "m-f32.gguf"
            summary = write_gguf(model_dir, gguf_path, "f32")
            imported = import_gguf(gguf_path, root / hf_arch / "imported")
            cache[hf_arch] = {
                "case": case,
                "dir": model_dir,
                "gguf": gguf_path,
                "summary": summary,
                "imported": imported,
            }
        return cache[hf_arch]

    return get


def test_every_architecture_class_has_a_table_entry():
    from medtune import archs

    assert set(archs.REGISTRY) == set(ARCHS) | set(ARCHS_UNIT_ONLY)
    for hf_arch, entry in ARCHS.items():
        assert archs.REGISTRY[hf_arch].gguf_arch() == entry["gguf_arch"]


@pytest.mark.parametrize("hf_arch", list(ARCHS))
def test_arch_config_normalisation_names_the_architecture(hf_arch):
    from medtune.models.config import normalise_config

    cfg = normalise_config({"model_type": ARCHS[hf_arch]["model_type"], "rope_parameters": {"rope_theta": 5.0}})
    assert cfg["architectures"] == [hf_arch] and cfg["rope_theta"] == 5.0


@pytest.mark.parametrize("hf_arch", list(ARCHS))
def test_arch_export_writes_the_architectures_tensors_and_keys(arch_built, hf_arch):
    from medtune import archs
    from medtune.export.gguf_reader import read_gguf_header
    from medtune.models.config import read_config

    got = arch_built(hf_arch)
    entry, case = ARCHS[hf_arch], got["case"]
    assert got["summary"]["arch"] == entry["gguf_arch"] and got["summary"]["hf_arch"] == hf_arch
    header = read_gguf_header(got["gguf"])
    meta, names = header["metadata"], {t["name"] for t in header["tensors"]}
    assert meta["general.architecture"] == entry["gguf_arch"]
    arch = archs.for_config(read_config(got["dir"]))
    for key, _, value in arch.hparams(0):
        if not key.endswith(".vocab_size"):
            assert meta[key] == pytest.approx(value), key
    from safetensors import safe_open

    with safe_open(str(got["dir"] / "model.safetensors"), "np") as f:
        want = {arch.gguf_name(n) for n in f.keys()} - {""}
    assert names == want | {name for name, _ in arch.extra_tensors()}
    assert ("rope_freqs.weight" in names) is (arch.rope_scaling()[0] == "llama3")
    assert ("output.weight" in names) is not case["tied"]


@pytest.mark.parametrize("hf_arch", list(ARCHS))
def test_arch_gguf_import_gives_back_the_same_model(arch_built, hf_arch):
    """F32 export then import: every weight bit-exact in HF's layout (llama's Q/K permutation undone), the
    config's shape and rope the same."""
    from safetensors.numpy import load_file

    got = arch_built(hf_arch)
    want = load_file(str(got["dir"] / "model.safetensors"))
    back = load_file(str(got["imported"] / "model.safetensors"))
    if got["case"]["tied"]:
        want.pop("lm_head.weight", None)
    assert set(back) == set(want)
    for name, w in want.items():
        assert np.array_equal(back[name], w), name
    cfg = json.loads((got["imported"] / "config.json").read_text())
    orig = json.loads((got["dir"] / "config.json").read_text())
    assert cfg["architectures"] == [ARCHS[hf_arch].get("imports_as", hf_arch)]
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "rope_theta",
        "tie_word_embeddings",
    ):
        assert cfg[key] == orig[key], key
    assert cfg["head_dim"] == (orig.get("head_dim") or orig["hidden_size"] // orig["num_attention_heads"])


@pytest.mark.parametrize("hf_arch", list(ARCHS))
def test_arch_loads_in_llama_cpp_with_transformers_logits(arch_built, hf_arch):
    pytest.importorskip("llama_cpp")
    import torch
    from transformers import AutoModelForCausalLM

    got = arch_built(hf_arch)
    ids = list(range(300, 364))
    hf = AutoModelForCausalLM.from_pretrained(str(got["dir"]), dtype=torch.float32).eval()
    if not ARCHS[hf_arch].get("gelu_fp16"):
        with torch.no_grad():
            want = hf(torch.tensor([ids])).logits[0].numpy()
        llm = _llama(got["gguf"])
        llm.eval(ids)
        assert np.abs(np.array(llm.scores[: len(ids)]) - want).max() < 2e-3
        return
    _assert_logits_with_llama_cpp_gelu(hf, _llama(got["gguf"]), ids)


def _assert_logits_with_llama_cpp_gelu(hf, llm, ids) -> None:
    import torch

    with torch.no_grad():
        plain = hf(torch.tensor([ids])).logits[0].numpy()
        _with_llama_cpp_gelu(hf)
        want = hf(torch.tensor([ids])).logits[0].numpy()
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    err = np.abs(got - want)
    # F16 rounding boundaries still fall differently for a few activations: most logits agree to 1e-5, a few
    # move by up to ~1e-2; without the F16 GELU the typical logit is off by ~1e-3
    assert np.abs(want).max() > 1.0
    assert np.median(err) < 1e-4 and np.quantile(err, 0.99) < 2e-3 and err.max() < 2e-2
    assert np.median(np.abs(got - plain)) > 10 * np.median(err)


def _with_llama_cpp_gelu(hf_model) -> None:
    """llama.cpp's CPU GELU rounds its input to F16 and reads the result from an F16 table (GGML_GELU_FP16,
    ggml-cpu/vec.h), even in an F32 model: the reference model computes the same, so that what is compared
    is the file (tensors, norms, rope, window), not that rounding."""
    import torch

    class F16TableGelu(torch.nn.Module):
        def forward(self, x):
            y = torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()
            return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))

    for layer in hf_model.model.layers:
        layer.mlp.act_fn = F16TableGelu()


# ---- Gemma 3: sliding window, local rope, (1 + w) norms; multimodal checkpoints -----------------------------
def test_gemma3_greedy_continuation_equals_mlx(arch_built, tmp_path):
    """mlx_lm (training's runtime) reads the normalised config as transformers does (window, pattern, local
    rope, scaling), and its greedy continuation of every chat equals llama.cpp's on the F32 and F16 GGUFs.
    Every prompt is longer than the 8-token window, so both sides' sliding layers really drop tokens."""
    pytest.importorskip("llama_cpp")
    from mlx_lm import load

    got = arch_built("Gemma3ForCausalLM")
    tok = _hf_tok(got["dir"])
    mlx_model, _ = load(str(got["dir"]))
    args = mlx_model.args
    assert (args.sliding_window, args.sliding_window_pattern, args.num_hidden_layers) == (8, 2, 3)
    assert (args.rope_theta, args.rope_local_base_freq, args.query_pre_attn_scalar) == (1e6, 1e4, 32)
    assert args.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    for conv in CHATS:
        assert len(tok.apply_chat_template(conv, add_generation_prompt=True)["input_ids"]) > 2 * args.sliding_window
    _assert_greedy_agrees(mlx_model, _llama(got["gguf"]), tok)
    write_gguf(got["dir"], tmp_path / "f16.gguf", "f16")
    _assert_greedy_agrees(mlx_model, _llama(tmp_path / "f16.gguf"), tok)


def test_gemma3_imported_config_runs_like_the_original(arch_built):
    """The config.json import writes for a gemma3 GGUF: transformers and mlx_lm read it as the original's (same
    window, pattern, local rope, attention scale, scaling), so the imported model's logits are the original's."""
    import mlx.core as mx
    import torch
    from mlx_lm import load
    from transformers import AutoModelForCausalLM

    got = arch_built("Gemma3ForCausalLM")
    cfg = json.loads((got["imported"] / "config.json").read_text())
    orig = json.loads((got["dir"] / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma3ForCausalLM"] and cfg["model_type"] == "gemma3_text"
    for key in (
        "layer_types",
        "sliding_window",
        "sliding_window_pattern",
        "rope_local_base_freq",
        "query_pre_attn_scalar",
        "rope_scaling",
        "hidden_activation",
    ):
        assert cfg[key] == orig[key], key
    ids = list(range(300, 340))
    logits = []
    for d in (got["dir"], got["imported"]):
        hf = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
        with torch.no_grad():
            logits.append(hf(torch.tensor([ids])).logits[0].numpy())
        mlx_model, _ = load(str(d))
        logits.append(np.array(mlx_model(mx.array([ids]))[0].astype(mx.float32)))
    hf_orig, mlx_orig, hf_back, mlx_back = logits
    assert np.abs(hf_back - hf_orig).max() < 1e-5 and np.abs(mlx_back - mlx_orig).max() < 1e-5
    assert np.abs(mlx_orig - hf_orig).max() < 1e-3  # and mlx_lm computes what transformers does


def test_gemma3_multimodal_exports_its_language_model(tmp_path):
    """A Gemma3ForConditionalGeneration checkpoint (MedGemma 4B's layout, tiny): its text_config gives the GGUF
    keys of the same text model, its language-model tensors the same GGUF names (transformers 5's
    model.language_model.* and mlx_lm's fused language_model.model.*), and the vision tower and projector are
    left out on purpose, with a notice that says so."""
    import torch
    import transformers
    from safetensors import safe_open

    from medtune import archs
    from medtune.models.config import read_config

    text = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=256,
    )
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16
    )
    torch.manual_seed(0)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    transformers.Gemma3ForConditionalGeneration(cfg).save_pretrained(str(tmp_path / "mm"))
    text_model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**text))
    text_model.save_pretrained(str(tmp_path / "text"))

    arch = archs.for_config(read_config(tmp_path / "mm"))
    text_arch = archs.for_config(read_config(tmp_path / "text"))
    assert type(arch).__name__ == "Gemma3Multimodal" and arch.gguf_arch() == "gemma3"
    assert arch.hparams(256) == text_arch.hparams(256)
    assert "vision tower" in arch.notice() and text_arch.notice() is None

    with safe_open(str(tmp_path / "mm" / "model.safetensors"), "np") as f:
        mm_names = list(f.keys())
    with safe_open(str(tmp_path / "text" / "model.safetensors"), "np") as f:
        want = {text_arch.gguf_name(n) for n in f.keys()} - {""}
    vision_names = [n for n in mm_names if "vision_tower" in n or "multi_modal_projector" in n]
    assert vision_names and all(arch.gguf_name(n) == "" for n in vision_names)
    assert {arch.gguf_name(n) for n in mm_names} - {""} == want
    assert arch.gguf_name("language_model.model.layers.1.post_feedforward_layernorm.weight") == (
        "blk.1.post_ffw_norm.weight"
    )
    assert arch.gguf_name("language_model.model.embed_tokens.weight") == "token_embd.weight"


# ---- Phi-3 / Phi-4-mini: Go templates, LongRoPE, sliding window, refusals ---------------------------------
def test_phi_go_templates_agree(built, go_ollama_render):
    """The phi3 and phi4-mini TEMPLATEs on Go's text/template give apply_chat_template's prompt; a conversation
    ending in an assistant turn (a continuation in Ollama) is HF's rendering without a generation prompt, less
    the eos_token HF appends then. An empty system prompt: Phi-3.5 leaves it out, Phi-4-mini writes it."""
    convs = [*CHATS, [{"role": "system", "content": ""}, {"role": "user", "content": "a"}]]
    convs.append([{"role": "user", "content": "q"}, {"role": "assistant", "content": "A"}])
    cases, ours, hf = [], [], []
    for name in ("phi3", "phi4-mini"):
        got = built(name)
        template = FAMILIES[got["case"]["family"]].template
        tok = _hf_tok(got["dir"])
        for conv in convs:
            cases.append({"template": template, "system": "", "messages": conv})
            ours.append(ollama_prompt(template, conv))
            prefill = conv[-1]["role"] == "assistant"
            want = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=not prefill)
            hf.append(want.removesuffix("<|endoftext|>") if prefill else want)
    assert go_ollama_render(cases) == ours == hf
    assert "<|system|><|end|>" in ours[len(convs) + 4] and "<|system|>" not in ours[4]


def _longrope(base_cfg: dict, orig: int) -> dict:
    """A LongRoPE rope_parameters for a tiny model: distinct long and short factors, one per rotated pair."""
    half = (
        int(base_cfg["hidden_size"] // base_cfg["num_attention_heads"] * base_cfg.get("partial_rotary_factor", 1)) // 2
    )
    return {
        "rope_type": "longrope",
        "rope_theta": base_cfg["rope_theta"],
        "long_factor": [1.0 + 0.75 * i for i in range(half)],
        "short_factor": [1.0 + 0.05 * i for i in range(half)],
        "original_max_position_embeddings": orig,
        **({"partial_rotary_factor": base_cfg["partial_rotary_factor"]} if "partial_rotary_factor" in base_cfg else {}),
    }


def _phi_variant(built, tmp_path, base: str, **changes) -> Path:
    from medtune.models.config import normalise_config

    model = tmp_path / f"{base}-variant"
    shutil.copytree(built(base)["dir"], model)
    cfg = json.loads((model / "config.json").read_text())
    cfg.pop("rope_scaling", None)
    cfg.update(changes)
    (model / "config.json").write_text(json.dumps(normalise_config(cfg)))
    return model


@pytest.mark.parametrize("base", ["phi3", "phi4-mini"])  # full and partial (3/4) rotary
def test_phi_longrope_logits_match_transformers_and_mlx(built, tmp_path, base):
    """LongRoPE: the factor tensors, the original context and transformers' attention factor. llama.cpp takes
    the long factors when its context exceeds the original one, transformers (and mlx_lm, always) when the
    sequence does: a 300-token prompt in a 512 context is long for all three, a 40-token one in a 256 context
    (llama.cpp rounds contexts up to a multiple of 256) short for llama.cpp and transformers."""
    import llama_cpp
    import mlx.core as mx
    import torch
    from mlx_lm import load
    from transformers import AutoModelForCausalLM

    from medtune import archs
    from medtune.models.config import read_config

    orig = 256
    base_cfg = json.loads((built(base)["dir"] / "config.json").read_text())
    model = _phi_variant(
        built, tmp_path, base, rope_parameters=_longrope(base_cfg, orig), original_max_position_embeddings=orig
    )
    summary = write_gguf(model, tmp_path / "lr.gguf", "f32")
    assert summary["arch"] == "phi3"
    arch = archs.for_config(read_config(model))
    hparams = {k: v for k, _, v in arch.hparams(0)}
    assert hparams["phi3.rope.scaling.original_context_length"] == orig
    assert hparams["phi3.rope.scaling.attn_factor"] == pytest.approx(
        math.sqrt(1 + math.log(1024 / orig) / math.log(orig))
    )
    assert "phi3.rope.scaling.type" not in hparams
    rope_dims = built(base)["case"].get("rope_dims", 16)
    assert hparams["phi3.rope.dimension_count"] == rope_dims
    names = {t.name: t for t in _reader(str(tmp_path / "lr.gguf"), (tmp_path / "lr.gguf").stat().st_mtime).tensors}
    assert list(names["rope_factors_long.weight"].shape) == [rope_dims // 2]

    hf = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    mlx_model, _ = load(str(model))
    for n_ids, n_ctx in ((300, 512), (40, orig)):
        ids = list(range(300, 300 + n_ids))
        with torch.no_grad():
            want = hf(torch.tensor([ids])).logits[0].numpy()
        llm = llama_cpp.Llama(
            model_path=str(tmp_path / "lr.gguf"), n_ctx=n_ctx, n_threads=1, n_threads_batch=1, verbose=False,
            logits_all=True, type_k=0, type_v=0, seed=0,
        )  # fmt: skip
        llm.eval(ids)
        assert np.abs(np.array(llm.scores[:n_ids]) - want).max() < 2e-3, n_ctx
        del llm
        if n_ids > orig:
            ours = np.array(mlx_model(mx.array([ids]))[0].astype(mx.float32))
            assert np.abs(ours - want).max() < 2e-3


def test_phi_longrope_gguf_import_refused(built, tmp_path):
    from medtune.models.gguf_import import import_gguf

    base_cfg = json.loads((built("phi3")["dir"] / "config.json").read_text())
    model = _phi_variant(built, tmp_path, "phi3", rope_parameters=_longrope(base_cfg, 64))
    write_gguf(model, tmp_path / "lr.gguf", "f32")
    with pytest.raises(BadInput, match="LongRoPE") as err:
        import_gguf(tmp_path / "lr.gguf", tmp_path / "back")
    assert "Hugging Face folder" in err.value.hint and not (tmp_path / "back").exists()


def test_phi_sliding_window_accepted_with_a_notice(built, tmp_path):
    """llama.cpp's phi3 graph attends to the whole context (it switches Phi's window off): a window shorter than
    the context is written anyway, with a notice; prompts within the window give transformers' logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from medtune import archs
    from medtune.models.config import read_config

    model = _phi_variant(built, tmp_path, "phi3", sliding_window=100)
    notice = archs.for_config(read_config(model)).notice()
    assert "sliding_window 100" in notice and "whole context" in notice
    result = export(model, tmp_path / "sw", "sw", quants=("f32",))
    assert notice in result.warnings  # the user sees it (export prints its warnings)
    ids = list(range(300, 390))
    hf = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()
    llm = _llama(result.gguf_paths["f32"])
    llm.eval(ids)
    assert np.abs(np.array(llm.scores[: len(ids)]) - want).max() < 2e-3
    full = _phi_variant(built, tmp_path / "x", "phi3", sliding_window=1024)
    assert archs.for_config(read_config(full)).notice() is None


@pytest.mark.parametrize(
    "cfg, words",
    [
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, ["'linear'", "longrope, su"]),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, ["'yarn'"]),
        (
            {"rope_scaling": {"rope_type": "longrope", "long_factor": [1.0] * 8, "short_factor": [1.0] * 3}},
            ["short_factor", "8 numbers"],
        ),
        (
            {
                "partial_rotary_factor": 0.5,
                "rope_scaling": {"type": "su", "long_factor": [1.0] * 8, "short_factor": [1.0] * 8},
            },
            ["long_factor", "4 numbers"],
        ),
        ({"head_dim": 32}, ["head_dim 32"]),
    ],
)
def test_phi3_config_refusals(tmp_path, cfg, words):
    with pytest.raises(BadInput) as err:
        plan_gguf(_tiny_config_dir(tmp_path, "Phi3ForCausalLM", **cfg))
    msg = str(err.value) + " " + err.value.hint
    for w in words:
        assert w in msg


def test_gemma3_tied_output_logits_equal_transformers(tmp_path, smollm2_dir):
    """Gemma 3 ties its output to the embeddings (the table's entry does not: a tied tiny random model repeats
    one token, which the greedy test cannot use): no output.weight is written and llama.cpp's logits from the
    token embedding are transformers'."""
    pytest.importorskip("llama_cpp")
    import torch
    from transformers import AutoModelForCausalLM

    from medtune.export.gguf_reader import read_gguf_header

    model = make_model(tmp_path / "hf", Path(smollm2_dir), {**arch_case("Gemma3ForCausalLM"), "tied": True})
    write_gguf(model, tmp_path / "t.gguf", "f32")
    assert "output.weight" not in {t["name"] for t in read_gguf_header(tmp_path / "t.gguf")["tensors"]}
    hf = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    _assert_logits_with_llama_cpp_gelu(hf, _llama(tmp_path / "t.gguf"), list(range(300, 364)))


def test_phi3_gguf_import_loads_in_transformers_and_mlx(arch_built):
    """The imported Phi-3 folder (tied, 3/4 rotary) is a model transformers and mlx_lm load and run as the
    original: same logits, partial rotary included."""
    import mlx.core as mx
    import torch
    from mlx_lm import load
    from transformers import AutoModelForCausalLM

    got = arch_built("Phi3ForCausalLM")
    cfg = json.loads((got["imported"] / "config.json").read_text())
    assert cfg["rope_parameters"]["partial_rotary_factor"] == cfg["partial_rotary_factor"] == 0.75
    ids = list(range(300, 340))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(str(got["dir"]), dtype=torch.float32)(torch.tensor([ids])).logits
        back = AutoModelForCausalLM.from_pretrained(str(got["imported"]), dtype=torch.float32).eval()
        assert type(back).__name__ == "Phi3ForCausalLM"
        assert np.abs(back(torch.tensor([ids])).logits[0].numpy() - want[0].numpy()).max() < 1e-4
    mlx_model, _ = load(str(got["imported"]))
    ours = np.array(mlx_model(mx.array([ids]))[0].astype(mx.float32))
    assert np.abs(ours - want[0].numpy()).max() < 2e-3


@pytest.mark.parametrize("case_name, name", [("phi3", "clinic-model"), ("qwen2.5", "my-phi3-qwen")])
def test_llama_cpp_whitespace_rule_follows_the_tokenizer_not_the_name(built, tmp_path, case_name, name):
    """llama.cpp gives special tokens Phi-3's rstrip rule when general.name says phi3: the writer names the GGUF so
    the rule applies exactly when the tokenizer has it, whatever name the user picked (a Phi-3.5 fine-tune called
    "clinic-model" tokenizes as HF; a Qwen model called "my-phi3-qwen" loads and tokenizes as HF)."""
    from medtune.export.gguf_reader import read_gguf_header

    model_dir = built(case_name)["dir"]
    result = export(model_dir, tmp_path / "out", name, quants=("f16",))
    path = result.gguf_paths["f16"]
    written = read_gguf_header(path)["metadata"]["general.name"]
    assert ("phi3" in written.lower()) == (case_name == "phi3"), written
    tok, llm = _hf_tok(model_dir), _llama(path)
    for conv in CHATS:
        text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        want = tok(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == want, (name, text)
