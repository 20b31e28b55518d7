"""LoRA adapters as llama.cpp LoRA GGUFs (`medtune export ADAPTER --base MODEL`, Ollama's ADAPTER line): the base
GGUF with the adapter GGUF on top gives, in llama.cpp, the logits of the fused model's GGUF and the greedy
continuations of the MLX model with its adapter, for llama (its Q/K rows regrouped), qwen2, qwen3 and gemma3; PEFT
adapters with per-module ranks and alphas; one base shared by several adapters; and what llama.cpp cannot apply is
refused before anything is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medtune.core.errors import BadInput
from medtune.export import export
from medtune.export.lora import write_lora_gguf

from conftest import SAMPLE, make_tiny_llama, run_cli
from families import arch_case, make_model

ARCHS = ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM"]
IDS = [1, 400, 512, 610, 733, 845, 901, 1200]


def _train(base: Path, root: Path, **opts) -> Path:
    from medtune.data.prepare import prepare
    from medtune.train import TrainOptions, train

    data = root / "data"
    if not data.exists():
        prepare(SAMPLE, str(base), data, max_seq_length=1024, limit=12, token_stats=False)
    out = root / opts.pop("out", "adapter")
    options = dict(iters=3, batch_size=2, num_layers=-1, rank=4, lr=1e-2, max_seq_length=1024, **opts)
    train(str(base), data, out, TrainOptions(**options))
    return out


@pytest.fixture(scope="module", params=ARCHS)
def adapted(request, tmp_path_factory, smollm2_dir):
    """A tiny model of the family, an MLX LoRA trained on it (3 steps at a high rate: far from the base), its base
    GGUFs (F32, F16) and the fused model's GGUF (F32)."""
    from medtune.fuse import fuse

    root = tmp_path_factory.mktemp(request.param)
    base = make_model(root / "hf", Path(smollm2_dir), arch_case(request.param))
    adapter = _train(base, root)
    bases = export(base, root / "base", "base", quant=["f32", "f16"], modelfile_path=root / "b.Modelfile").gguf_paths
    fuse(str(base), adapter, root / "fused", dtype="float32")
    fused = export(root / "fused", root / "fused", "fused", quant=["f32"], modelfile_path=root / "f.Modelfile")
    return {"arch": request.param, "root": root, "base": base, "adapter": adapter, "base_gguf": bases["f32"], "base_f16": bases["f16"],
            "fused_gguf": fused.gguf_paths["f32"]}  # fmt: skip


def _logits(gguf: Path, lora: Path | None = None) -> np.ndarray:
    from medtune.runtimes import llamacpp

    llm = llamacpp.load_gguf(gguf, 256, n_threads=1, logits_all=True, **({"lora_path": str(lora)} if lora else {}))
    try:
        llm.eval(IDS)
        return np.array(llm.scores[: len(IDS)], dtype=np.float32)
    finally:
        llm.close()


def test_base_plus_adapter_gguf_is_the_fused_model_in_llama_cpp(adapted):
    import gguf

    a = adapted
    lora = write_lora_gguf(a["adapter"], a["base"], a["root"] / "lora-f32.gguf", "f32", name="cardio")
    meta = gguf.GGUFReader(lora["path"])
    kv = {f.name: f.contents() for f in meta.fields.values() if not f.name.startswith("GGUF.")}
    assert kv["general.type"] == "adapter" and kv["adapter.type"] == "lora"
    base_kv = gguf.GGUFReader(a["base_gguf"]).fields["general.architecture"].contents()
    assert kv["general.architecture"] == base_kv  # llama.cpp refuses a LoRA of another architecture
    assert kv["adapter.lora.alpha"] == pytest.approx(20.0 * 4)  # mlx_lm's scale x the rank
    names = {t.name for t in meta.tensors}
    assert "blk.0.attn_q.weight.lora_a" in names and "blk.1.ffn_down.weight.lora_b" in names
    fused, base = _logits(a["fused_gguf"]), _logits(a["base_gguf"])
    stacked = _logits(a["base_gguf"], Path(lora["path"]))
    assert np.abs(fused - base).max() > 1.0  # the adapter changes the model a lot
    assert np.abs(fused - stacked).max() < 5e-3  # and the stacked files are the fused model, to float rounding


def test_llama_server_with_lora_continues_like_mlx_with_the_adapter(adapted):
    """`eval fidelity --lora` on the F16 files: llama-server (the engine inside Ollama) renders, tokenizes and greedily
    continues with the F16 base GGUF and --lora (F16), against MLX with the adapter, near-ties excused; without the
    adapter the same check fails."""
    from medtune.eval.fidelity import fidelity, read_prompts

    a = adapted
    lora = write_lora_gguf(a["adapter"], a["base"], a["root"] / "lora-f16.gguf", "f16")["path"]
    prompts = read_prompts(limit=2)
    rep = fidelity(a["base"], a["base_f16"], prompts, 12, runtime="llama-server", lora=lora, adapter=a["adapter"])
    assert rep.passed, rep.to_dict()
    assert rep.lora == lora and rep.file_type == "F16" and rep.summary["continuations_equal"] == 2
    if a["arch"] == "LlamaForCausalLM":  # the same without --lora: the base's continuations, not the adapter's
        bare = fidelity(a["base"], a["base_f16"], prompts, 12, runtime="llama-server", adapter=a["adapter"])
        assert not bare.passed


def test_export_adapter_shares_one_base_and_writes_the_modelfile(tmp_path, smollm2_dir):
    """Two adapters on one base: the base GGUF is written once, the Modelfile stacks FROM and ADAPTER by paths
    relative to it (what `medtune ollama create` reads and uploads), and the F16 pair passes `eval fidelity`."""
    from medtune.ollama import read_modelfile

    base = make_model(tmp_path / "hf", Path(smollm2_dir), arch_case("Qwen3ForCausalLM"))
    cardio = _train(base, tmp_path, out="cardio")
    peds = _train(base, tmp_path, out="peds", seed=1)
    common = ("--base-out", tmp_path / "models" / "base", "--json")
    runs = [  # the second without --base: the base the adapter records (its adapter_config.json's base_model)
        run_cli(
            "export",
            ad,
            *given,
            "--name",
            ad.name,
            "--modelfile",
            tmp_path / "Modelfiles" / f"{ad.name}.Modelfile",
            *common,
        )  # fmt: skip
        for ad, given in ((cardio, ("--base", base)), (peds, ()))
    ]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr[-2000:]
    first, second = (json.loads(r.stdout) for r in runs)
    assert first["base_written"] and not second["base_written"] and first["base_gguf"] == second["base_gguf"]
    assert Path(second["adapter_gguf"]) == peds / "peds-lora-f16.gguf"
    assert sorted(p.name for p in (tmp_path / "models" / "base").glob("*.gguf")) == ["hf-f16.gguf"]
    text = (tmp_path / "Modelfiles" / "peds.Modelfile").read_text(encoding="utf-8")
    assert "FROM ../models/base/hf-f16.gguf\nADAPTER ../peds/peds-lora-f16.gguf\n" in text
    spec = read_modelfile(tmp_path / "Modelfiles" / "peds.Modelfile")
    assert spec.gguf == Path(first["base_gguf"]).resolve() and spec.adapters[0].resolve() == (
        peds / "peds-lora-f16.gguf"
    )
    r = run_cli(
        "eval", "fidelity", base, first["base_gguf"], "--lora", first["adapter_gguf"], "--adapter", cardio,
        "--limit", 2, "--tokens", 12, "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    rep = json.loads(r.stdout)
    assert rep["file_type"] == "F16" and rep["passed"] and rep["lora"] == first["adapter_gguf"]


def test_a_peft_adapter_with_per_module_ranks_and_alphas(tmp_path, smollm2_dir):
    """PEFT's layout (lora_A [r x in], lora_B [out x r]) with rank_pattern and alpha_pattern: each module's own
    scale is folded where it differs from the file's one alpha; on llama, B's rows follow the Q/K regrouping. The
    reference is PEFT's own merge (merge_and_unload), exported and run in llama.cpp."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = make_model(tmp_path / "hf", Path(smollm2_dir), arch_case("LlamaForCausalLM"))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 32},
        init_lora_weights=False,  # random A and B: the adapter is not a no-op
    )  # fmt: skip
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), cfg)
    model.save_pretrained(tmp_path / "peft")
    merged = tmp_path / "merged"
    model.merge_and_unload().save_pretrained(merged)
    for f in base.iterdir():  # the base's normalised config and its tokenizer
        if f.suffix == ".json" and "safetensors" not in f.name:
            shutil.copy(f, merged / f.name)
    quant = dict(quant=["f32"], modelfile_path=tmp_path / "m.Modelfile")
    want = _logits(export(merged, tmp_path / "merged-gguf", "merged", **quant).gguf_paths["f32"])
    base_gguf = export(base, tmp_path / "base", "base", **quant).gguf_paths["f32"]
    res = write_lora_gguf(tmp_path / "peft", base, tmp_path / "peft.gguf", "f32")
    assert res["adapter_kind"] == "peft" and res["ranks"] == [2, 4] and res["alpha"] == pytest.approx(8.0)
    got, bare = _logits(base_gguf, tmp_path / "peft.gguf"), _logits(base_gguf)
    assert np.abs(want - bare).max() > 1.0 and np.abs(want - got).max() < 5e-3


def test_what_llama_cpp_cannot_apply_is_refused_and_nothing_is_written(tmp_path, smollm2_dir, tiny_llama_dir):
    base = make_model(tmp_path / "hf", Path(smollm2_dir), arch_case("LlamaForCausalLM"))
    adapter = _train(base, tmp_path)
    dora = tmp_path / "dora"
    shutil.copytree(adapter, dora)
    acfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**acfg, "fine_tune_type": "dora"}))
    small = make_tiny_llama(tmp_path / "small", tiny_llama_dir, hidden=32, heads=2, kv_heads=1)
    out = tmp_path / "out"
    cases = [
        (dora, base, "DoRA"),
        (adapter, small, "the base weight is"),  # another base: the shapes disagree
        (base, base, "not an adapter folder"),  # a model folder given as the adapter
    ]
    for ad, b, said in cases:
        r = run_cli("export", ad, "--base", b, "--name", "x", "--out", out, "--base-out", tmp_path / "bases",
                    "--modelfile", tmp_path / "x.Modelfile")  # fmt: skip
        assert r.returncode == 2 and said in r.stderr, r.stderr[-2000:]
    assert not out.exists() and not (tmp_path / "bases").exists() and not (tmp_path / "x.Modelfile").exists()
    # LoRA on the output layer (PEFT, target lm_head): a llama.cpp LoRA is not where it belongs
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules=["q_proj", "lm_head"])
    )
    model.save_pretrained(tmp_path / "head")
    with pytest.raises(BadInput, match="output layer") as e:
        write_lora_gguf(tmp_path / "head", base, tmp_path / "head.gguf")
    assert "fuse" in e.value.hint and not (tmp_path / "head.gguf").exists()
