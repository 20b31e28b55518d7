"""Gemma 3 end to end on the real Gemma tokenizer (the SentencePiece vocabulary of builtin:gemma3-270m, 262k
tokens, imported from the embedded package's GGUF header): a tiny random Gemma3ForCausalLM with that tokenizer
and the template medtune attaches to a template-less gemma3 GGUF is prepared, exported with our writer and run
in llama.cpp. Tokenization = HF's, F16/F32 greedy continuation = mlx_lm's, the Modelfile is the gemma3 family's
with <end_of_turn> as a stop, and the prepared records pass prepare's template checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_export_archs import _assert_greedy_agrees, _llama

from medtune.export import export
from medtune.export.modelfile import parse_modelfile

from families import CHATS, TEXTS

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "medical_o1_sample.jsonl"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")


def _tiny_gemma(out: Path, tokenizer_dir: Path) -> Path:
    """A random 3-layer Gemma 3 (window 8, every 2nd layer global, local rope base 1e4) on the real tokenizer,
    float32 with values F16 holds exactly."""
    import torch
    import transformers

    from medtune.models.config import normalise_config

    gen = json.loads((tokenizer_dir / "generation_config.json").read_text())
    cfg = transformers.Gemma3TextConfig(
        vocab_size=262144,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        query_pre_attn_scalar=32,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        sliding_window=8,
        max_position_embeddings=1024,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
        tie_word_embeddings=False,  # a tied tiny random Gemma repeats one token: no continuation to compare
        bos_token_id=gen.get("bos_token_id"),
        eos_token_id=gen.get("eos_token_id"),
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(cfg).to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5)  # Gemma scales by (1 + w): a norm shifted wrongly on export shows
            elif name in ("model.embed_tokens.weight", "lm_head.weight"):
                p.normal_(0, 0.35)
            else:
                p.normal_(0, 0.12)
            p.copy_(p.half().float())
    model.save_pretrained(str(out))
    for f in TOKENIZER_FILES:
        if (tokenizer_dir / f).is_file():
            shutil.copy(tokenizer_dir / f, out / f)
    path = out / "config.json"
    path.write_text(json.dumps(normalise_config(json.loads(path.read_text())), indent=2))
    return out


@pytest.fixture(scope="module")
def gemma(tmp_path_factory, gemma_tokenizer_dir):
    root = tmp_path_factory.mktemp("gemma-real-tok")
    model = _tiny_gemma(root / "hf", Path(gemma_tokenizer_dir))
    result = export(model, root / "out", "tiny-gemma", quants=("f16", "f32"))
    return {"dir": model, "result": result}


def test_the_real_tokenizer_exports_and_tokenizes_like_hf(gemma):
    from transformers import AutoTokenizer

    res = gemma["result"]
    assert res.family == "gemma3"
    assert "<end_of_turn>" in res.stops
    stops = [v for k, v in parse_modelfile(res.modelfile_text) if k == "stop"]
    assert stops[:2] == ["<end_of_turn>", "<start_of_turn>"] and "<eos>" in stops
    tok = AutoTokenizer.from_pretrained(str(gemma["dir"]))
    llm = _llama(res.gguf_paths["f16"])
    for conv in CHATS:
        text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert text.startswith("<bos><start_of_turn>user\n") and text.endswith("<start_of_turn>model\n")
        want = tok(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == want, text
    for text in TEXTS:
        want = tok(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == want, text


def test_greedy_continuation_equals_mlx_on_f16_and_f32(gemma):
    from mlx_lm import load
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gemma["dir"]))
    mlx_model, _ = load(str(gemma["dir"]))
    for quant in ("f32", "f16"):
        llm = _llama(gemma["result"].gguf_paths[quant])
        _assert_greedy_agrees(mlx_model, llm, tok)
        del llm


def test_records_prepared_for_gemma_pass_the_template_checks(gemma, tmp_path):
    """prepare renders through the template and checks it (prompt tokens a prefix of the record's, <end_of_turn>
    once at the end of the answer, reasoning kept); a failed check would raise."""
    from medtune.data.prepare import prepare

    out = tmp_path / "prep"
    res = prepare(SAMPLE, str(gemma["dir"]), out, limit=8)
    assert res.template["end_token"] == "<end_of_turn>" and res.counts["train"] > 0
    records = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert all(r["completion"].startswith("<think>\n") and "<end_of_turn>" not in r["completion"] for r in records)
    rendered = json.loads((out / "manifest.json").read_text())["first_example"]["rendered"]
    assert rendered.startswith("<bos><start_of_turn>user\n") and "<start_of_turn>model\n<think>\n" in rendered
    assert rendered.endswith("<end_of_turn>\n") or rendered.endswith("<end_of_turn>")
    assert rendered.count("<end_of_turn>") == 2  # the user turn's and the answer's


def test_a_multimodal_gemma_checkpoint_exports_its_language_model(tmp_path, gemma_tokenizer_dir):
    """A Gemma3ForConditionalGeneration folder (MedGemma 4B's layout, tiny, with the real tokenizer) exports the
    language model alone: llama.cpp's logits equal the multimodal model's on a text prompt, no vision tensor is
    written, and the export warns that image input is left out."""
    import numpy as np
    import torch
    import transformers

    from medtune.export.gguf_reader import read_gguf_header
    from medtune.models.config import normalise_config

    text = dict(
        vocab_size=262144,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=512,
        sliding_window_pattern=2,
    )
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16
    )
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(
        transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    ).eval()
    folder = tmp_path / "mm"
    model.save_pretrained(str(folder))
    for f in TOKENIZER_FILES:
        if (Path(gemma_tokenizer_dir) / f).is_file():
            shutil.copy(Path(gemma_tokenizer_dir) / f, folder / f)
    path = folder / "config.json"
    path.write_text(json.dumps(normalise_config(json.loads(path.read_text())), indent=2))

    res = export(folder, tmp_path / "out", "tiny-medgemma", quants=("f32",))
    assert res.family == "gemma3" and any("vision tower" in w for w in res.warnings), res.warnings
    header = read_gguf_header(res.gguf_paths["f32"])
    names = [t["name"] for t in header["tensors"]]
    assert header["metadata"]["general.architecture"] == "gemma3"
    assert not [n for n in names if "vision" in n or "mm" in n.split(".")[0]] and "token_embd.weight" in names

    ids = [2, 105, 2364, 107, 236777, 1126, 563, 496, 2216, 236881, 106, 107, 105, 4368, 107]  # a chat, 15 tokens
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    llm = _llama(res.gguf_paths["f32"])
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    assert np.abs(want).max() > 0.1 and np.abs(got - want).max() < 5e-3
