"""`medtune train --method dpo|orpo` on prepared preference pairs (MLX and torch backends): the held-out preference accuracy
and reward margin rise, the reference is computed once and kept with the run, a killed run resumes to the same
losses, and --method must match the data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medtune.core.errors import BadInput
from medtune.train import TrainOptions, train

from conftest import SAMPLE, run_cli

OPTS = dict(iters=8, batch_size=4, num_layers=-1, rank=8, lr=5e-3, eval_every=4, save_every=3, seed=0)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, tiny_llama_dir):
    """Pairs in which the chosen answer sends the patient to a clinician and the rejected one reassures: a pattern
    a tiny model can learn, shared by the held-out pairs."""
    from medtune.data.prepare import prepare

    root = tmp_path_factory.mktemp("pairs")
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()][:30]
    records = [
        {
            "prompt": r["Question"],
            "chosen": "See a clinician today. " + r["Response"][:80],
            "rejected": "Nothing to worry about. " + r["Response"][:80],
        }
        for r in rows
    ]
    src = root / "pairs.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    prepare(src, str(tiny_llama_dir), root / "data", max_seq_length=512, valid_ratio=0.25, token_stats=False)
    return root / "data"


def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_llama_dir, pairs):
    out = tmp_path_factory.mktemp("dpo") / "a"
    res = train(str(tiny_llama_dir), pairs, out, TrainOptions(method="dpo", beta=0.1, **OPTS))
    return out, res


def test_dpo_raises_heldout_preference_accuracy_and_margin(dpo_run, pairs):
    out, res = dpo_run
    val = [r for r in _rows(out) if "val_loss" in r]
    assert [r["step"] for r in val] == [0, 4, 8]
    first, last = val[0], val[-1]
    assert first["val_loss"] == pytest.approx(np.log(2), abs=1e-4)  # the policy is its own reference at step 0
    assert abs(first["val_margin"]) < 1e-4
    assert last["val_margin"] > 0.5 and last["val_accuracy"] == 1.0 and last["val_loss"] < 0.5 * first["val_loss"]
    steps = [r for r in _rows(out) if "train_loss" in r]
    assert all({"margin", "accuracy", "rewards_chosen", "rewards_rejected"} <= set(r) for r in steps)
    assert res.final_val_loss == last["val_loss"]
    from PIL import Image

    assert Image.open(out / "loss.png").size[0] > 1200  # the loss beside the margin/accuracy panel
    with np.load(out / "reference_logps.npz") as ref:  # the reference, kept with the run
        assert set(ref.files) == {"train_chosen", "train_rejected", "valid_chosen", "valid_rejected"}
        n_valid = len((pairs / "valid.jsonl").read_text(encoding="utf-8").splitlines())
        assert (ref["train_chosen"] < 0).all() and len(ref["valid_chosen"]) == n_valid


def test_a_killed_dpo_run_resumes_to_the_same_losses(tmp_path, tiny_llama_dir, pairs, dpo_run):
    out = tmp_path / "b"

    def power_cut(step, row):
        if step == 5:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        train(str(tiny_llama_dir), pairs, out, TrainOptions(method="dpo", **OPTS), on_step=power_cut)
    res = train(str(tiny_llama_dir), pairs, out, TrainOptions(method="dpo", **OPTS), resume=True)
    assert res.resumed_from == 3

    def losses(folder):
        return [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in _rows(folder)]

    assert losses(out) == losses(dpo_run[0])


def test_orpo_trains_the_chosen_side_and_separates_the_pair(tmp_path, tiny_llama_dir, pairs):
    out = tmp_path / "orpo"
    train(str(tiny_llama_dir), pairs, out, TrainOptions(method="orpo", orpo_lambda=0.5, **OPTS))
    val = [r for r in _rows(out) if "val_loss" in r]
    assert val[-1]["val_loss"] < val[0]["val_loss"] and val[-1]["val_nll"] < val[0]["val_nll"]
    assert val[-1]["val_log_odds_ratio"] > val[0]["val_log_odds_ratio"]
    assert not (out / "reference_logps.npz").exists()  # ORPO has no reference


def test_method_must_match_the_data(tmp_path, tiny_llama_dir, pairs):
    from medtune.data.prepare import prepare

    with pytest.raises(BadInput, match="preference pairs") as err:
        train(str(tiny_llama_dir), pairs, tmp_path / "a", TrainOptions(iters=1))
    assert "--method dpo" in err.value.hint
    sft = tmp_path / "sft"
    prepare(SAMPLE, str(tiny_llama_dir), sft, max_seq_length=512, limit=8, token_stats=False)
    with pytest.raises(BadInput, match="--method orpo trains on preference pairs"):
        train(str(tiny_llama_dir), sft, tmp_path / "b", TrainOptions(method="orpo", iters=1))
    with pytest.raises(BadInput, match="--method dpo is not supported with --backend unsloth"):  # fused loss
        train(str(tiny_llama_dir), pairs, tmp_path / "c", TrainOptions(method="dpo", iters=1), backend="unsloth")
    r = run_cli("train", "--model", tiny_llama_dir, "--data", pairs, "--out", tmp_path / "d", "--method", "kto")
    assert r.returncode == 2 and "--method must be one of sft, dpo, orpo" in r.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "d").exists()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread beside MLX's OpenBLAS pool (tests/test_train_torch.py: 3-5x faster on 2 cores)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def torch_dpo_run(tmp_path_factory, tiny_llama_dir, pairs, one_torch_thread):
    out = tmp_path_factory.mktemp("torch_dpo") / "a"
    train(str(tiny_llama_dir), pairs, out, TrainOptions(method="dpo", beta=0.1, **OPTS), backend="torch")
    return out


def test_dpo_on_torch_learns_the_preference_and_starts_where_mlx_does(torch_dpo_run, dpo_run):
    val = [r for r in _rows(torch_dpo_run) if "val_loss" in r]
    assert [r["step"] for r in val] == [0, 4, 8]
    first, last = val[0], val[-1]
    assert first["val_loss"] == pytest.approx(np.log(2), abs=1e-4)  # the policy is its own reference at step 0
    assert last["val_margin"] > 0 and last["val_accuracy"] > first["val_accuracy"]
    assert last["val_loss"] < first["val_loss"]
    # the same base (LoRA's B = 0), the same batches: the first step's loss and the reference are MLX's
    torch_steps = [r for r in _rows(torch_dpo_run) if "train_loss" in r]
    mlx_steps = [r for r in _rows(dpo_run[0]) if "train_loss" in r]
    assert {"margin", "accuracy", "rewards_chosen", "rewards_rejected"} <= set(torch_steps[0])
    assert torch_steps[0]["train_loss"] == pytest.approx(mlx_steps[0]["train_loss"], rel=1e-4)
    with np.load(torch_dpo_run / "reference_logps.npz") as t, np.load(dpo_run[0] / "reference_logps.npz") as m:
        for k in m.files:
            np.testing.assert_allclose(t[k], m[k], rtol=1e-4)


def test_a_killed_torch_dpo_run_resumes_to_the_same_losses(tmp_path, tiny_llama_dir, pairs, torch_dpo_run):
    out = tmp_path / "b"

    def power_cut(step, row):
        if step == 5:
            raise RuntimeError("power cut")

    opts = TrainOptions(method="dpo", **OPTS)
    with pytest.raises(RuntimeError, match="power cut"):
        train(str(tiny_llama_dir), pairs, out, opts, backend="torch", on_step=power_cut)
    res = train(str(tiny_llama_dir), pairs, out, opts, backend="torch", resume=True)
    assert res.resumed_from == 3

    def losses(folder):
        rows = _rows(folder)
        return [(r["step"], "train_loss" in r) for r in rows], [r.get("train_loss", r.get("val_loss")) for r in rows]

    (keys_b, b), (keys_a, a) = losses(out), losses(torch_dpo_run)
    assert keys_b == keys_a
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)  # tests/test_train.py TOLERANCE["torch"]


def test_eval_reports_preference_accuracy_for_base_tuned_and_gguf(tmp_path, tiny_llama_dir, pairs, dpo_run):
    """medtune eval on held-out pairs: the DPO-tuned model prefers the chosen answers more than the base does, and
    its GGUF (scored in llama.cpp with --gguf-loss) says the same."""
    from medtune.export import export
    from medtune.fuse import fuse

    fuse(str(tiny_llama_dir), dpo_run[0], tmp_path / "fused")
    res = export(tmp_path / "fused", tmp_path / "gguf", "dpo", quants=("f32",), modelfile_path=tmp_path / "m")
    gguf = res.gguf_paths["f32"]
    out = tmp_path / "report"
    r = run_cli(
        "eval", tmp_path / "fused", "--data", pairs, "--base", tiny_llama_dir, "--gguf", gguf, "--gguf-loss",
        "--probe-limit", 1, "--max-tokens", 2, "--threads", 1, "--out", out,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((out / "report.json").read_text(encoding="utf-8"))
    m = {e["label"]: e["metrics"] for e in rep["models"]}
    assert m["tuned"]["pref_accuracy"] == 1.0 and m["tuned"]["pref_margin"] > m["base"]["pref_margin"]
    assert m["tuned"]["pref_margin_vs_base"] == pytest.approx(m["tuned"]["pref_margin"] - m["base"]["pref_margin"])
    assert m[gguf.name]["pref_accuracy"] == 1.0
    assert m[gguf.name]["pref_margin"] == pytest.approx(m["tuned"]["pref_margin"], abs=0.05)  # summed over the answer
    assert [q["source"] for q in rep["questions"]] == ["probe"]  # a pair's prompt is not asked as a question
    assert "preference accuracy" in (out / "report.html").read_text(encoding="utf-8")


def test_eval_scores_the_pairs_of_a_second_folder(tmp_path, tiny_llama_dir, pairs, dpo_run):
    """--pairs: one report answers the SFT data's held-out questions and scores a preference folder's held-out pairs;
    a folder of SFT records, or raw unprepared pairs, given as --pairs are refused, and no report is written."""
    from medtune.data.prepare import prepare

    sft_data = tmp_path / "sft"
    prepare(SAMPLE, str(tiny_llama_dir), sft_data, max_seq_length=512, limit=12, token_stats=False)
    common = ("--probe-limit", 1, "--limit", 1, "--max-tokens", 2)
    out = tmp_path / "report"
    r = run_cli(
        "eval", tiny_llama_dir, "--adapter", dpo_run[0], "--data", sft_data, "--pairs", pairs, *common, "--out", out
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((out / "report.json").read_text(encoding="utf-8"))
    tuned = next(e for e in rep["models"] if e["label"] == "tuned")["metrics"]
    held = (pairs / "valid.jsonl").read_text(encoding="utf-8").splitlines()
    assert tuned["pref_pairs"] == len(held) and tuned["pref_accuracy"] == 1.0
    assert [q["source"] for q in rep["questions"]] == ["probe", "held-out"]
    assert rep["pairs"] == str(pairs / "valid.jsonl") and "pairs: " in (out / "report.md").read_text(encoding="utf-8")
    for given, said in ((sft_data, "prepared from sft data, not preference pairs"), (SAMPLE.parent, "no manifest")):
        bad = run_cli("eval", tiny_llama_dir, "--data", sft_data, "--pairs", given, *common, "--out", tmp_path / "bad")
        assert bad.returncode == 2 and said in bad.stderr and "medtune prepare PAIRS.jsonl" in bad.stderr
        assert not (tmp_path / "bad").exists()


def test_dpo_starts_from_an_sft_adapter(tmp_path, tiny_llama_dir, pairs, dpo_run):
    """--adapter: DPO continues an SFT run's adapter (its layout, its weights); the reference is the SFT model, so
    the step-0 loss is log 2 again but the reference log-probs are not the base's."""
    from medtune.data.prepare import prepare
    from medtune.fuse import fuse

    sft_data = tmp_path / "sft"
    prepare(SAMPLE, str(tiny_llama_dir), sft_data, max_seq_length=512, limit=12, token_stats=False)
    sft = tmp_path / "sft-adapter"
    train(str(tiny_llama_dir), sft_data, sft, TrainOptions(iters=4, batch_size=4, num_layers=1, rank=4, lr=1e-2))
    out = tmp_path / "dpo"
    layout = {**OPTS, "num_layers": 8, "rank": 8}  # the defaults: the adapter's layout decides (no conflict)
    train(str(tiny_llama_dir), pairs, out, TrainOptions(method="dpo", adapter=sft, **layout))
    val = [r for r in _rows(out) if "val_loss" in r]
    assert val[0]["val_loss"] == pytest.approx(np.log(2), abs=1e-4) and val[-1]["val_margin"] > 0
    with np.load(out / "reference_logps.npz") as mine, np.load(dpo_run[0] / "reference_logps.npz") as base:
        assert not np.allclose(mine["train_chosen"], base["train_chosen"])
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["num_layers"] == 1 and cfg["lora_parameters"]["rank"] == 4  # the SFT adapter's layout
    fuse(str(tiny_llama_dir), out, tmp_path / "fused")  # and it merges like any adapter
    with pytest.raises(BadInput, match="no adapter_config.json"):
        train(str(tiny_llama_dir), pairs, tmp_path / "x", TrainOptions(method="dpo", adapter=tmp_path, iters=1))
