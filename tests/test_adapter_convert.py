"""Adapters that move and keep learning: `medtune adapter convert` (mlx_lm ↔ PEFT, exact), a PEFT adapter trained by the
torch backend used and trained further on MLX, and `medtune train --init-adapter` (an earlier adapter's weights on new
data, a fresh optimizer, its lineage in the manifest; conflicting options refused)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from medtune.adapters import convert
from medtune.core.errors import BadInput
from medtune.train import TrainOptions, train

from conftest import SAMPLE, run_cli

IDS = [1, 400, 512, 610, 733, 845]
OPTS = dict(batch_size=2, num_layers=-1, rank=4, lr=1e-2, eval_every=3, save_every=3, max_seq_length=300, seed=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_llama_dir):
    """Two prepared folders with different training records and the same held-out split."""
    from medtune.data.prepare import prepare

    root = tmp_path_factory.mktemp("data")
    rows = SAMPLE.read_text(encoding="utf-8").splitlines()
    (root / "a.jsonl").write_text("\n".join(rows[:20]) + "\n", encoding="utf-8")
    (root / "b.jsonl").write_text("\n".join(rows[20:40]) + "\n", encoding="utf-8")
    for name in ("a", "b"):
        prepare(root / f"{name}.jsonl", str(tiny_llama_dir), root / name, max_seq_length=300, token_stats=False)
    shutil.copy(root / "a" / "valid.jsonl", root / "b" / "valid.jsonl")
    return root


@pytest.fixture(scope="module")
def first(tmp_path_factory, tiny_llama_dir, data):
    out = tmp_path_factory.mktemp("first") / "adapter"
    train(str(tiny_llama_dir), data / "a", out, TrainOptions(iters=6, **OPTS))
    return out


def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def _mlx_logits(base, adapter) -> np.ndarray:
    from medtune.core import runtime
    from medtune.runtimes import mlx

    mx = runtime.mx()
    model, _ = mlx.load(str(base), adapter)
    return np.array(model(mx.array([IDS]))[0], dtype=np.float32)


def _peft_logits(base, adapter) -> np.ndarray:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(adapter))
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].numpy()


def test_mlx_to_peft_and_back_is_exact(tmp_path, tiny_llama_dir, first):
    from safetensors.numpy import load_file

    r = run_cli("adapter", "convert", first, "--to", "peft", "--out", tmp_path / "peft", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["from"] == "mlx" and (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    convert(tmp_path / "peft", "mlx", tmp_path / "back")
    before, after = (
        load_file(str(first / "adapters.safetensors")),
        load_file(str(tmp_path / "back/adapters.safetensors")),
    )
    assert set(before) == set(after) and all(np.array_equal(before[k], after[k]) for k in before)
    want = _mlx_logits(tiny_llama_dir, first)
    assert np.array_equal(_mlx_logits(tiny_llama_dir, tmp_path / "back"), want)
    assert np.abs(_peft_logits(tiny_llama_dir, tmp_path / "peft") - want).max() < 1e-5  # PEFT in torch, the same
    assert np.abs(want - _mlx_logits(tiny_llama_dir, None)).max() > 0.05  # and the adapter does something
    lineage = json.loads((tmp_path / "back" / "medtune_converted.json").read_text())
    assert lineage["kind"] == "peft" and lineage["converted_from"] == str((tmp_path / "peft").absolute())


def test_a_peft_adapter_with_rank_and_alpha_patterns_runs_on_mlx(tmp_path, tiny_llama_dir):
    """PEFT's per-module ranks and alphas (zero-padded to one rank, scales folded into B): MLX loads it (converted on
    the fly, as chat and generate do) and gives PEFT's logits."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 2},
        alpha_pattern={"down_proj": 32}, layers_to_transform=[1], init_lora_weights=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32), cfg)
    model.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        want = model(torch.tensor([IDS])).logits[0].numpy()
    got = _mlx_logits(tiny_llama_dir, tmp_path / "peft")
    assert np.abs(got - want).max() < 1e-5 and np.abs(got - _mlx_logits(tiny_llama_dir, None)).max() > 0.05
    back = convert(tmp_path / "peft", "mlx", tmp_path / "mlx", base=str(tiny_llama_dir))
    assert back["rank"] == 4 and back["layers"] == [1]
    acfg = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    assert acfg["num_layers"] == 1 and acfg["lora_parameters"]["keys"] == ["mlp.down_proj", "self_attn.q_proj",
                                                                           "self_attn.v_proj"]  # fmt: skip


def test_init_adapter_starts_from_the_earlier_weights_with_its_lineage(tmp_path, tiny_llama_dir, data, first):
    """Six steps on data a, then --init-adapter and six steps on data b (same held-out split): the second run's
    step-0 validation loss is the first run's final one, and its manifest names the adapter and both datasets."""
    out = tmp_path / "second"
    r = run_cli(
        "train", "--model", tiny_llama_dir, "--data", data / "b", "--out", out, "--init-adapter", first,
        "--iters", 6, "--batch-size", 2, "--num-layers", -1, "--lr", 1e-2, "--eval-every", 3, "--max-seq-length", 300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    first_val = [x["val_loss"] for x in _rows(first) if "val_loss" in x]
    second_val = [x["val_loss"] for x in _rows(out) if "val_loss" in x]
    assert second_val[0] == pytest.approx(first_val[-1], abs=1e-5) and second_val[0] < first_val[0] - 0.01
    manifest = json.loads((out / "manifest.json").read_text())
    now, before = manifest["lineage"]
    assert (
        now["data"] == str(data / "b") and now["init_adapter"] == str(first) and len(now["init_adapter_sha256"]) == 64
    )
    assert before["data"] == str(data / "a")
    acfg = json.loads((out / "adapter_config.json").read_text())
    assert acfg["lora_parameters"]["rank"] == 4  # the adapter's rank, not the default 8


def test_conflicting_options_are_refused_and_nothing_is_written(tmp_path, tiny_llama_dir, data, first):
    for flags, said in ((("--rank", 16), "--rank 16 (the adapter's: 4)"), (("--num-layers", 1), "--num-layers 1")):
        out = tmp_path / f"x{flags[1]}"
        r = run_cli("train", "--model", tiny_llama_dir, "--data", data / "b", "--out", out, "--init-adapter", first,
                    "--iters", 2, *flags)  # fmt: skip
        assert r.returncode == 2 and said in r.stderr, r.stderr[-2000:]
        assert "adapter_config.json" in r.stderr and not out.exists()
    with pytest.raises(BadInput, match="layer 1, the base"):
        from conftest import make_tiny_llama

        small = make_tiny_llama(tmp_path / "one-layer", tiny_llama_dir, layers=1)
        convert(first, "peft", tmp_path / "p", base=str(small))


def test_a_torch_trained_peft_adapter_continues_on_mlx(tmp_path, tiny_llama_dir, data):
    """Trained on the torch backend (PEFT, as on a rented T4), then --init-adapter on MLX: the MLX run's step-0
    validation loss is the torch run's final one."""
    torch_out = tmp_path / "torch"
    train(str(tiny_llama_dir), data / "a", torch_out, TrainOptions(iters=3, **OPTS), backend="torch")
    assert "peft_type" in json.loads((torch_out / "adapter_config.json").read_text())
    mlx_out = tmp_path / "mlx"
    opts = {**OPTS, "num_layers": 8}  # the adapter decides; the default is not a conflict
    train(str(tiny_llama_dir), data / "b", mlx_out, TrainOptions(iters=3, adapter=torch_out, **opts))
    torch_val = [x["val_loss"] for x in _rows(torch_out) if "val_loss" in x]
    mlx_val = [x["val_loss"] for x in _rows(mlx_out) if "val_loss" in x]
    assert mlx_val[0] == pytest.approx(torch_val[-1], abs=1e-4) and mlx_val[0] < torch_val[0] - 0.01


def test_an_mlx_adapter_continues_on_the_torch_backend(tmp_path, tiny_llama_dir, data, first):
    """The other way: an adapter trained on MLX continues on the torch backend (converted to PEFT, exactly): its
    step-0 validation loss is the MLX run's final one; a conflicting --rank is refused there too."""
    out = tmp_path / "torch"
    opts = {**OPTS, "num_layers": -1}
    train(str(tiny_llama_dir), data / "b", out, TrainOptions(iters=3, adapter=first, **opts), backend="torch")
    mlx_val = [x["val_loss"] for x in _rows(first) if "val_loss" in x]
    torch_val = [x["val_loss"] for x in _rows(out) if "val_loss" in x]
    assert torch_val[0] == pytest.approx(mlx_val[-1], abs=1e-4)
    assert json.loads((out / "manifest.json").read_text())["lineage"][0]["init_adapter"] == str(first)
    with pytest.raises(BadInput, match="--rank 16"):
        train(str(tiny_llama_dir), data / "b", tmp_path / "x", TrainOptions(iters=1, adapter=first, **{**opts, "rank": 16}),
              backend="torch")  # fmt: skip
    assert not (tmp_path / "x").exists()


def test_an_adapter_for_another_base_is_refused_and_nothing_is_written(tmp_path, tiny_llama_dir, data, first):
    from conftest import make_tiny_llama

    other = make_tiny_llama(tmp_path / "other", tiny_llama_dir, hidden=32, heads=2, kv_heads=1)
    for backend in ("mlx", "torch"):
        out = tmp_path / backend
        with pytest.raises(BadInput, match="does not fit this model") as e:
            train(str(other), data / "b", out, TrainOptions(iters=1, adapter=first, **OPTS), backend=backend)
        assert str(first) in str(e.value.where) and not out.exists()


def test_fuse_merges_a_peft_adapter_without_torch_through_mlx(tmp_path, tiny_llama_dir, first, monkeypatch):
    """On a Mac without torch, `medtune fuse` of a PEFT adapter converts it to mlx_lm's layout and merges it there:
    the same fused weights as the mlx adapter it came from."""
    import importlib.util

    from safetensors.numpy import load_file

    from medtune.fuse import fuse

    convert(first, "peft", tmp_path / "peft")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    res = fuse(str(tiny_llama_dir), tmp_path / "peft", tmp_path / "fused", dtype="float32")
    monkeypatch.undo()
    fuse(str(tiny_llama_dir), first, tmp_path / "ref", dtype="float32")
    got, want = load_file(str(tmp_path / "fused/model.safetensors")), load_file(str(tmp_path / "ref/model.safetensors"))
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
    assert res.fused_layers == json.loads((tmp_path / "ref" / "medtune_manifest.json").read_text())["fused_layers"]
    manifest = json.loads((tmp_path / "fused" / "medtune_manifest.json").read_text())
    assert "/adapters/mlx-" in manifest["inputs"]["adapter"] and "backend" not in manifest  # merged by the mlx path
