"""The PyTorch backend (transformers + PEFT) on CPU: it does the MLX backend's job on the same terms.

A tiny random Llama with the real SmolLM2 tokenizer trains (loss falls); the same records give the same
label tokens and the same starting loss as the MLX backend; a run killed or Ctrl-C'd and resumed gives
the losses of an unbroken run (tests/test_train.py, on every backend); two processes under torchrun train like one with the whole batch; the
PEFT adapter fuses (`medtune fuse`), exports (`medtune export --quant f32`) and llama.cpp continues
greedily like transformers on the fused model; what cannot be honoured is refused with exit codes.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import SAMPLE, run_cli

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from medtune.core.errors import BadInput, MissingDependency, ResourceError  # noqa: E402
from medtune.data.prepare import prepare  # noqa: E402
from medtune.train import TrainOptions, train  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """conftest binds OpenBLAS process-wide for MLX; torch's own threads then fight its spinning pool on a
    shared 2-core machine (measured: 3-5x slower). One torch thread is the fast, reproducible choice here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, smollm2_dir):
    out = tmp_path_factory.mktemp("prep") / "sample"
    prepare(SAMPLE, str(smollm2_dir), out, max_seq_length=300, limit=24)
    return out


def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out):
    rows = _rows(out)
    return (
        [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r],
        [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r],
    )


MAIN_OPTS = dict(iters=12, batch_size=2, num_layers=-1, rank=8, lr=3e-3, eval_every=6, seed=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama_dir, prepared):
    out = tmp_path_factory.mktemp("torch") / "adapter"
    res = train(str(tiny_llama_dir), prepared, out, TrainOptions(**MAIN_OPTS), backend="torch")
    return out, res


def test_training_lowers_validation_loss_and_writes_a_peft_adapter(trained, tiny_llama_dir, prepared, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, res = trained
    assert res.backend == "torch" and res.final_val_loss < res.first_val_loss - 0.2
    rows = _rows(out)
    assert [r["step"] for r in rows if "train_loss" in r] == list(range(1, 13))
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 6, 12]
    assert all(r["label_tokens"] > 0 and r["tokens_per_second"] > 0 for r in rows if "train_loss" in r)
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend"] == "torch" and manifest["device"]["kind"] == "cpu" and manifest["precision"] == "float32"
    assert manifest["inputs"]["train_sha256"] and manifest["options"]["iters"] == 12 and manifest["peak_memory_gb"] > 0
    acfg = json.loads((out / "adapter_config.json").read_text())
    assert acfg["peft_type"] == "LORA" and acfg["r"] == 8 and acfg["lora_alpha"] == 160  # scale 20 = alpha / r
    assert set(acfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), out)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b)
    # The dry run's sizes come from the safetensors headers, without loading the model: the same numbers.
    dry = train(
        str(tiny_llama_dir), prepared, tmp_path / "dry", TrainOptions(**MAIN_OPTS), backend="torch", dry_run=True
    )
    assert (dry.trainable_parameters, dry.total_parameters) == (res.trainable_parameters, res.total_parameters)
    assert not (tmp_path / "dry").exists()


def test_prompt_masking_and_schedules_match_the_mlx_backend(trained, tiny_llama_dir, prepared, tmp_path):
    """The same records give the same label tokens (position by position), the same loss before training,
    the same label counts per step and the same learning-rate schedule as the MLX backend."""
    mx = pytest.importorskip("mlx.core")
    from transformers import AutoTokenizer

    from medtune.train import data as train_data
    from medtune.train.backends import mlx as mlx_backend
    from medtune.train.backends import torch as torch_backend

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    items = train_data.build_dataset(train_data.load_jsonl(prepared / "train.jsonl"), tok, True, 300, prepared)
    for group in train_data.batch_order(items, 2, 0, 0):
        batch, lengths, _, _ = mlx_backend.make_batch(items, group)
        pos = np.arange(1, batch.shape[1])[None, :]
        lens = np.array(lengths)
        mlx_mask = (pos >= lens[:, :1]) & (pos < lens[:, 1:2])  # targets batch[:, 1:] that get loss
        _, labels, _ = torch_backend.make_batch(items, group)
        torch_mask = (labels[:, 1:] != torch_backend.IGNORE).numpy()
        assert np.array_equal(mlx_mask, torch_mask)
        assert np.array_equal(np.array(batch)[:, 1:][mlx_mask], labels[:, 1:].numpy()[torch_mask])

    mlx_out = tmp_path / "mlx"
    train(str(tiny_llama_dir), prepared, mlx_out, TrainOptions(**{**MAIN_OPTS, "iters": 3}), backend="mlx")
    (t_mlx, v_mlx), (t_torch, v_torch) = _losses(mlx_out), _losses(trained[0])
    assert abs(v_mlx[0][1] - v_torch[0][1]) < 1e-4  # step 0: the base model on the same label tokens
    assert abs(t_mlx[0][1] - t_torch[0][1]) < 1e-4  # step 1 is computed before any update
    label_counts = [[r["label_tokens"] for r in _rows(o) if "train_loss" in r][:3] for o in (mlx_out, trained[0])]
    assert label_counts[0] == label_counts[1]

    for sched in ("cosine", "linear", "constant"):
        opts = TrainOptions(iters=9, lr=2e-3, lr_schedule=sched, warmup=3)
        schedule = mlx_backend.make_schedule(opts, 9)
        ours = [torch_backend.lr_at(opts, 9, i) for i in range(9)]
        theirs = [float(schedule(mx.array(i))) if callable(schedule) else schedule for i in range(9)]
        np.testing.assert_allclose(ours, theirs, rtol=1e-6)


# Resume after a crash and Ctrl-C are the one training loop's: tests/test_train.py runs them on every backend.


def _greedy_hf(model, ids, n, eos):
    out = []
    with torch.no_grad():
        for _ in range(n):
            tok = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(tok)
            if tok == eos:
                break
    return out


def _greedy_llama(llm, ids, n, eos):
    out = []
    for tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(tok))
        if tok == eos or len(out) >= n:
            break
    return out


def test_fused_peft_adapter_exports_and_llama_cpp_continues_like_transformers(trained, tiny_llama_dir, tmp_path):
    """`medtune fuse` merges the PEFT adapter (16-bit HF folder, normalised config, tokenizer), `medtune export
    --quant f32` takes it unchanged, and llama.cpp's greedy tokens equal transformers' on the fused model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fused = tmp_path / "fused"
    res = run_cli("fuse", "--model", tiny_llama_dir, "--adapter", trained[0], "--out", fused, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["fused_layers"] == 14  # 7 linear layers x 2 layers
    cfg = json.loads((fused / "config.json").read_text())
    assert (
        cfg["torch_dtype"] == "float16"
        and cfg["rope_theta"] == 10000.0
        and cfg["architectures"] == ["LlamaForCausalLM"]
    )
    assert (fused / "tokenizer.json").is_file() and (fused / "tokenizer_config.json").is_file()
    assert json.loads((fused / "medtune_manifest.json").read_text())["backend"] == "peft"

    model = AutoModelForCausalLM.from_pretrained(fused, dtype=torch.float32).eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), trained[0]).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    ids = torch.tensor([[1, 9690, 198, 2683, 314, 253, 2106, 30]])
    with torch.no_grad():
        f, a, b = (m(ids).logits for m in (model, with_adapter, base))
    assert (f - a).abs().max() < 0.02 < (f - b).abs().max()  # float16 rounding only; the adapter did something

    gguf_dir, modelfile = tmp_path / "gguf", tmp_path / "Modelfiles" / "tt.Modelfile"
    res = run_cli("export", fused, "--out", gguf_dir, "--name", "tt", "--quant", "f32", "--modelfile", modelfile)
    assert res.returncode == 0, res.stderr
    gguf = gguf_dir / "tt-f32.gguf"
    assert gguf.is_file() and modelfile.is_file()

    llama_cpp = pytest.importorskip("llama_cpp")
    tok = AutoTokenizer.from_pretrained(fused)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=256, n_threads=1, verbose=False, seed=0, logits_all=True)
    for question in ("What is the antidote for paracetamol overdose?", "List 3 causes of hyperkalaemia."):
        messages = [{"role": "user", "content": question}]
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        hf_ids = tok(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == hf_ids
        ours, theirs = _greedy_hf(model, hf_ids, 16, eos), _greedy_llama(llm, hf_ids, 16, eos)
        if ours != theirs:  # allowed only where transformers' top two tokens tie within float32 noise
            k = next(i for i, (x, y) in enumerate(zip(ours, theirs)) if x != y)
            with torch.no_grad():
                logits = model(torch.tensor([hf_ids + ours[:k]])).logits[0, -1]
            assert abs(float(logits[ours[k]] - logits[theirs[k]])) < 1e-3, (question, ours, theirs)


def test_dora_grad_accumulation_and_a_full_fine_tune_that_fuses(tmp_path, tiny_llama_dir, prepared):
    from transformers import AutoModelForCausalLM

    from medtune.fuse import fuse

    res = train(
        str(tiny_llama_dir),
        prepared,
        tmp_path / "d",
        TrainOptions(
            iters=4,
            batch_size=2,
            grad_accum=2,
            fine_tune_type="dora",
            num_layers=1,
            target_modules=["q_proj", "self_attn.v_proj"],
            lr=1e-3,
            lr_schedule="linear",
            warmup=1,
            eval_every=4,
            grad_checkpoint=True,
        ),
        backend="torch",
    )
    acfg = json.loads((tmp_path / "d" / "adapter_config.json").read_text())
    assert (
        acfg["use_dora"]
        and acfg["layers_to_transform"] == [1]
        and sorted(acfg["target_modules"]) == ["q_proj", "v_proj"]
    )
    # rank 8 on q (64 -> 64) and v (64 -> 32), plus DoRA's magnitude vectors, in the top layer only
    assert res.trainable_parameters == 8 * (64 + 64) + 64 + 8 * (64 + 32) + 32
    rows = [r for r in _rows(tmp_path / "d") if "train_loss" in r]
    assert [r["learning_rate"] for r in rows] == pytest.approx([5e-4, 1e-3, 2e-3 / 3, 1e-3 / 3])
    assert all(r["label_tokens"] > 0 for r in rows)

    full = tmp_path / "full"
    train(
        str(tiny_llama_dir),
        prepared,
        full,
        TrainOptions(iters=2, batch_size=2, fine_tune_type="full", num_layers=1, lr=1e-3, eval_every=2),
        backend="torch",
    )
    assert json.loads((full / "adapter_config.json").read_text())["medtune_format"] == "torch-full"
    out = fuse(str(tiny_llama_dir), full, tmp_path / "fused", dtype="float32")
    assert out.fused_layers == 0
    from safetensors.torch import load_file

    trained_tensors = load_file(str(full / "adapter_model.safetensors"))
    assert trained_tensors and all(".layers.1." in k for k in trained_tensors)
    fused = AutoModelForCausalLM.from_pretrained(tmp_path / "fused", dtype=torch.float32).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).state_dict()
    for k, v in trained_tensors.items():
        assert torch.equal(fused[k], v)
    assert any(not torch.equal(base[k], v) for k, v in trained_tensors.items())
    assert torch.equal(fused["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])


def test_refusals(tmp_path, tiny_llama_dir, prepared, monkeypatch):
    from medtune.train.backends import torch as torch_backend

    # QLoRA needs CUDA: refused on this CPU, before anything is loaded.
    with pytest.raises(BadInput, match="needs a CUDA GPU") as exc:
        train(str(tiny_llama_dir), prepared, tmp_path / "q", TrainOptions(load_in_4bit=True), backend="torch")
    assert exc.value.exit_code == 2
    # Unsloth missing (and no CUDA here): exit 3 from the CLI, with the install line.
    res = run_cli(
        "train", "--backend", "unsloth", "--model", tiny_llama_dir, "--data", prepared, "--out", tmp_path / "u"
    )
    assert res.returncode == 3 and "medtune[unsloth]" in res.stderr
    with pytest.raises(MissingDependency):
        train(str(tiny_llama_dir), prepared, tmp_path / "u", TrainOptions(), backend="unsloth")
    # Options a backend cannot honour.
    with pytest.raises(BadInput, match="full is not supported with --backend unsloth"):
        train(str(tiny_llama_dir), prepared, tmp_path / "u", TrainOptions(fine_tune_type="full"), backend="unsloth")
    with pytest.raises(BadInput, match="bitsandbytes"):
        train(str(tiny_llama_dir), prepared, tmp_path / "m", TrainOptions(load_in_4bit=True), backend="mlx")
    with pytest.raises(BadInput, match="fp16 is not supported on CPU"):
        train(str(tiny_llama_dir), prepared, tmp_path / "p", TrainOptions(precision="fp16"), backend="torch")
    # T4 rules, on a T4 as the CUDA runtime describes it: no bf16, fp16 with loss scaling, 4-bit above 3B.
    t4 = torch_backend.Device("cuda", 0, "Tesla T4", (7, 5))
    with pytest.raises(BadInput, match="Tesla T4 .* has no bfloat16"):
        torch_backend.plan_precision(TrainOptions(precision="bf16"), t4, 135_000_000, "torch")
    plan = torch_backend.plan_precision(TrainOptions(), t4, 135_000_000, "torch")
    assert (plan.dtype, plan.scaler, plan.load_in_4bit) == ("float16", True, False) and "GradScaler" in plan.notes[0]
    plan = torch_backend.plan_precision(TrainOptions(), t4, 7_600_000_000, "unsloth")
    assert plan.load_in_4bit and "4-bit" in plan.notes[1]
    with pytest.raises(BadInput, match="full"):
        torch_backend.plan_precision(TrainOptions(fine_tune_type="full", load_in_4bit=True), t4, 10**9, "torch")
    a100 = torch_backend.Device("cuda", 0, "A100", (8, 0))
    assert torch_backend.plan_precision(TrainOptions(), a100, 10**9, "torch").dtype == "bfloat16"


def test_preflight_refuses_what_cannot_fit(tmp_path, tiny_llama_dir, prepared, monkeypatch):
    dry = train(
        str(tiny_llama_dir),
        prepared,
        tmp_path / "e",
        TrainOptions(iters=5, batch_size=2),
        backend="torch",
        dry_run=True,
    )
    pf = dry.preflight
    assert pf["trainable_parameters"] < pf["parameters"] and pf["steps"] == 5 and pf["estimated_peak_bytes"] > 0
    assert pf["device"]["kind"] == "cpu" and pf["available_source"] == "available system memory"
    assert not (tmp_path / "e").exists()
    monkeypatch.setenv("MEDTUNE_MEMORY_LIMIT_GB", str(pf["estimated_peak_bytes"] / 1e9 / 2))
    with pytest.raises(ResourceError, match="needs ~") as exc:
        train(str(tiny_llama_dir), prepared, tmp_path / "e", TrainOptions(iters=5, batch_size=2), backend="torch")
    assert exc.value.exit_code == 4 and "--batch-size 1" in exc.value.hint and "--grad-checkpoint" in exc.value.hint
    assert not (tmp_path / "e").exists()


def test_dry_run_refuses_what_the_run_refuses(tmp_path, tiny_llama_dir, prepared, monkeypatch):
    """The torch backend's dry run gives the run's verdict: the same ResourceError, with its figures attached."""
    opts = TrainOptions(iters=5, batch_size=2)
    pf = train(str(tiny_llama_dir), prepared, tmp_path / "e", opts, backend="torch", dry_run=True).preflight
    monkeypatch.setenv("MEDTUNE_MEMORY_LIMIT_GB", str(pf["estimated_peak_bytes"] / 1e9 / 2))
    with pytest.raises(ResourceError, match="needs ~") as real:
        train(str(tiny_llama_dir), prepared, tmp_path / "e", opts, backend="torch")
    with pytest.raises(ResourceError, match="needs ~") as dry:
        train(str(tiny_llama_dir), prepared, tmp_path / "e", opts, backend="torch", dry_run=True)
    assert (dry.value.line(), dry.value.hint, dry.value.exit_code) == (real.value.line(), real.value.hint, 4)
    assert dry.value.preflight["estimated_peak_bytes"] == pf["estimated_peak_bytes"]
    assert not (tmp_path / "e").exists()


def test_two_processes_under_torchrun_train_like_one_with_the_whole_batch(tmp_path, tiny_llama_dir, prepared):
    """`torchrun --nproc_per_node 2 -m medtune train --backend torch` (gloo on CPU): each process takes half of
    every batch, gradients are combined by label tokens, and the loss curve is one process's on the whole batch."""
    launcher = Path(sys.executable).parent / "torchrun"
    if not launcher.exists():
        pytest.skip("torchrun is not installed")
    one = tmp_path / "one"
    train(
        str(tiny_llama_dir),
        prepared,
        one,
        TrainOptions(iters=4, batch_size=4, num_layers=-1, rank=4, lr=3e-3, eval_every=2, seed=0),
        backend="torch",
    )
    two = tmp_path / "two"
    cmd = [
        str(launcher),
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "medtune",
        "train",
        "--backend",
        "torch",
        "--model",
        str(tiny_llama_dir),
        "--data",
        str(prepared),
        "--out",
        str(two),
        "--iters",
        "4",
        "--batch-size",
        "4",
        "--num-layers",
        "-1",
        "--rank",
        "4",
        "--lr",
        "3e-3",
        "--eval-every",
        "2",
        "--seed",
        "0",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    (train_1, val_1), (train_2, val_2) = _losses(one), _losses(two)
    assert [s for s, _ in train_2] == [1, 2, 3, 4]
    np.testing.assert_allclose([v for _, v in train_2], [v for _, v in train_1], rtol=1e-4)
    np.testing.assert_allclose([v for _, v in val_2], [v for _, v in val_1], rtol=1e-4)
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["processes"] == 2 and manifest["backend"] == "torch"
    assert [r["label_tokens"] for r in _rows(two) if "train_loss" in r] == [
        r["label_tokens"] for r in _rows(one) if "train_loss" in r
    ]
    assert res.stdout.strip().splitlines()[-1] == str(two)  # rank 0 alone reports


def test_auto_backend_choice(monkeypatch):
    """auto: MLX on this CPU machine (today's behaviour); on CUDA Unsloth when installed, unless the options
    need plain PyTorch, else PyTorch."""
    import importlib.util

    import medtune.train as mt

    if sys.platform == "linux" and importlib.util.find_spec("mlx") is not None and not mt._cuda_available():
        assert mt.resolve_backend("auto") == "mlx"
    if sys.platform == "darwin" and __import__("platform").machine() == "arm64":
        assert mt.resolve_backend("auto") == "mlx"
        return
    monkeypatch.setattr(mt, "_cuda_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "unsloth" else real(name, *a))
    assert mt.resolve_backend("auto", TrainOptions()) == "torch"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "unsloth" else real(name, *a))
    assert mt.resolve_backend("auto", TrainOptions()) == "unsloth"
    assert mt.resolve_backend("auto", TrainOptions(fine_tune_type="full")) == "torch"
    with pytest.raises(BadInput, match="unknown backend"):
        mt.resolve_backend("tensorflow")
