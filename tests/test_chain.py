"""The walking skeleton end to end on the real builtin model: prepare → train → fuse → export, then
prove the GGUF right with llama.cpp (tokens equal to the HF tokenizer's, greedy continuation equal to
the fused MLX model's)."""

import json

import numpy as np
import pytest

from medtune.data.prepare import prepare
from medtune.fuse import fuse
from medtune.train import TrainOptions, train

from conftest import SAMPLE, run_cli

CHATS = [
    [
        {
            "role": "user",
            "content": "A 67-year-old woman has sudden weakness of the right arm and slurred speech "
            "that started 40 minutes ago. What should be done first?",
        }
    ],
    [{"role": "user", "content": "患者，男，45岁，饮酒后上腹部剧痛，向背部放射，血淀粉酶升高。最可能的诊断是什么？"}],
    [
        {"role": "system", "content": "You are a careful clinical assistant."},
        {"role": "user", "content": "List 3 causes of hyperkalaemia with K+ 6.8 mmol/L."},
    ],
    [{"role": "user", "content": "What is the antidote for paracetamol overdose?"}],
]
N_TOKENS = 32


@pytest.fixture(scope="module")
def chain(tmp_path_factory, smollm2_dir):
    root = tmp_path_factory.mktemp("chain")
    prepare(SAMPLE, str(smollm2_dir), root / "data", max_seq_length=384, limit=16)
    res = train(
        str(smollm2_dir),
        root / "data",
        root / "adapter",
        TrainOptions(iters=2, batch_size=2, num_layers=4, lr=2e-4, eval_every=2, seed=0),
    )
    fuse(str(smollm2_dir), root / "adapter", root / "fused")
    return {"root": root, "fused": root / "fused", "adapter": root / "adapter", "train": res}


def test_fused_model_equals_base_plus_adapter(chain, smollm2_dir):
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.tuner.utils import load_adapters

    ids = mx.array([[1, 9690, 198, 2683, 314, 253, 2106, 30]])
    fused, _ = load(str(chain["fused"]))
    base, _ = load(str(smollm2_dir))
    with_adapter = load_adapters(load(str(smollm2_dir))[0], str(chain["adapter"]))
    f, b, a = (np.array(m(ids)) for m in (fused, base, with_adapter))
    assert np.abs(f - a).max() < 1e-3  # fusing changes nothing the adapter did
    assert np.abs(f - b).max() > 1e-3  # ... and the adapter did something
    cfg = json.loads((chain["fused"] / "config.json").read_text())
    assert cfg["rope_theta"] == 100000.0 and cfg["architectures"] == ["LlamaForCausalLM"]
    assert "quantization" not in cfg


@pytest.fixture(scope="module")
def exported(chain):
    out = chain["root"] / "export"
    modelfile = chain["root"] / "Modelfiles" / "chain.Modelfile"
    res = run_cli(
        "export",
        chain["fused"],
        "--out",
        out,
        "--name",
        "chain",
        "--quant",
        "f16",
        "--quant",
        "f32",
        "--modelfile",
        modelfile,
    )
    assert res.returncode == 0, res.stderr
    f16, f32 = out / "chain-f16.gguf", out / "chain-f32.gguf"
    assert f16.is_file() and f32.is_file() and modelfile.is_file()
    assert f"ollama create chain -f {modelfile}" in res.stdout and "ollama run chain" in res.stdout
    assert (modelfile.parent / modelfile.read_text().split("\nFROM ")[1].split("\n")[0]).resolve() == f16.resolve()
    return {"f16": f16, "f32": f32, "modelfile": modelfile}


def _mlx_greedy(model, ids, n, eos):
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    out = []
    for tok, _ in generate_step(mx.array(ids), model, max_tokens=n):
        tok = int(tok)
        out.append(tok)
        if tok == eos:
            break
    return out


def _llama_greedy(llm, ids, n, eos):
    out = []
    for tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(tok))
        if tok == eos or len(out) >= n:
            break
    return out


def _tie_margin(model, llm, ids, ours, theirs):
    """At the first divergence: how far apart the two candidate tokens are, in each runtime's logits."""
    import mlx.core as mx

    k = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
    seq = ids + ours[:k]
    mlx_logits = np.array(model(mx.array([seq]))[0, -1])
    llm.reset()
    llm.eval(seq)
    gguf_logits = np.array(llm.scores[len(seq) - 1])
    a, b = ours[k], theirs[k]
    return max(abs(mlx_logits[a] - mlx_logits[b]), abs(gguf_logits[a] - gguf_logits[b]))


@pytest.mark.parametrize("quant, tie", [("f16", 0.02), ("f32", 0.002)])
def test_gguf_tokenizes_like_hf_and_continues_like_mlx(chain, exported, quant, tie):
    """Token ids equal to the HF tokenizer's; greedy continuations (32 tokens) equal to MLX's on the fused
    model. F16 rounds the weights, so a continuation may part where MLX's top two tokens are within `tie`
    logits of each other (measured: 0.0008); that is checked, not assumed, and 3 prompts must agree
    in full. F32 (with an F32 cache) must agree on every prompt, or part only on a near-tie of
    float32 rounding (2e-3: the sums run in another order than MLX's)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from mlx_lm import load
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chain["fused"])
    # F32: an F32 KV cache too, so the comparison is of the file (llama.cpp's default F16 cache alone
    # moves logits by ~1e-2); F16 keeps the default cache, as Ollama runs it.
    cache = {"type_k": 0, "type_v": 0} if quant == "f32" else {}
    llm = llama_cpp.Llama(
        model_path=str(exported[quant]), n_ctx=1024, n_threads=2, verbose=False, seed=0, logits_all=True, **cache
    )
    model, _ = load(str(chain["fused"]))
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    assert llm.token_eos() == eos
    agreeing = 0
    for messages in CHATS:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        hf_ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == hf_ids
        ours = _mlx_greedy(model, hf_ids, N_TOKENS, eos)
        theirs = _llama_greedy(llm, hf_ids, N_TOKENS, eos)
        assert len(ours) >= 24 or ours[-1] == eos
        if ours == theirs:
            agreeing += 1
            continue
        margin = _tie_margin(model, llm, hf_ids, ours, theirs)
        assert margin <= tie, (quant, margin, tok.decode(ours), tok.decode(theirs))
    assert agreeing >= (3 if quant == "f16" else len(CHATS) - 1)
