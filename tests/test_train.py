import json

import numpy as np
import pytest

from medtune.data.prepare import prepare
from medtune.train import BACKENDS, TrainOptions, train
from medtune.train import loss as losses
from medtune.train.backends.mlx import make_batch

from conftest import SAMPLE


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, smollm2_dir):
    out = tmp_path_factory.mktemp("prep") / "sample"
    prepare(SAMPLE, str(smollm2_dir), out, max_seq_length=300, limit=24)
    return out


def test_mask_counts_exactly_the_completion_tokens():
    """Our labels are tokens offset..length-1; mlx_lm's default_loss also counts the padding slot after them."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.tuner.trainer import default_loss

    class Echo(nn.Module):
        def __call__(self, x):
            return mx.zeros((*x.shape, 16))

    items = [([1, 2, 3, 4, 5, 6, 7], 3), ([1, 2, 3, 4, 5], 4)]
    batch = make_batch(items, [0, 1])
    _, ours = losses.mlx_loss(None)(Echo(), *batch)
    _, theirs = default_loss(Echo(), *batch[:2])
    assert int(batch[3].sum().item()) == int(ours.item())  # the chunked loss's label positions: the same count
    expected = sum(len(t) - off for t, off in items)  # (7-3) + (5-4) = 5 completion tokens
    assert int(ours.item()) == expected
    assert int(theirs.item()) == expected + len(items)


def test_training_lowers_validation_loss_and_writes_a_loadable_adapter(tmp_path, tiny_llama_dir, prepared):
    out = tmp_path / "adapter"
    res = train(
        str(tiny_llama_dir),
        prepared,
        out,
        TrainOptions(iters=20, batch_size=2, num_layers=-1, rank=8, lr=3e-3, eval_every=10, seed=1),
    )
    assert res.final_val_loss < res.first_val_loss - 0.2
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train_loss" in r] == list(range(1, 21))
    assert all(r["label_tokens"] > 0 for r in rows if "train_loss" in r)
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["train_sha256"] and manifest["options"]["iters"] == 20

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tuner.utils import load_adapters

    model, _ = load(str(tiny_llama_dir))
    load_adapters(model, str(out))
    names = {k for k, _ in tree_flatten(model.parameters()) if "lora_b" in k}
    assert names and all(np.abs(np.array(v)).max() > 0 for k, v in tree_flatten(model.parameters()) if k in names)
    assert mx.load(str(out / "adapters.safetensors"))


def test_training_refuses_a_record_it_would_truncate(tmp_path, tiny_llama_dir, prepared):
    from medtune.core.errors import BadInput

    with pytest.raises(BadInput, match="cut off its end token"):
        train(str(tiny_llama_dir), prepared, tmp_path / "a", TrainOptions(iters=1, max_seq_length=64))


RESUME_OPTS = dict(
    iters=8,
    batch_size=2,
    num_layers=-1,
    rank=4,
    lr=3e-3,
    dropout=0.1,
    eval_every=4,
    save_every=3,
    seed=2,
    lr_schedule="cosine",
    warmup=2,
)


def _losses(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return (
        [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r],
        [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r],
    )


# ---- the one training loop, on every backend of the registry that runs on this machine -------------------
def _runs_here(name: str) -> bool:
    from medtune.core.errors import MedtuneError
    from medtune.train import _cuda_available
    from medtune.train.backends import backend_class

    try:  # any registered backend: what it needs is its own check
        backend_class(name)(TrainOptions()).check_available()
    except MedtuneError:
        return False
    return name != "unsloth" or _cuda_available()


# the registered backends this machine can run (CI: mlx and torch; Unsloth needs CUDA); the others are checked to
# refuse in one line, below, rather than skipped
LOOP_BACKENDS = [name for name in BACKENDS if _runs_here(name)]


def test_a_backend_that_cannot_train_here_says_what_is_missing():
    from medtune.core.errors import MissingDependency
    from medtune.train.backends import backend_class

    assert "mlx" in LOOP_BACKENDS and "torch" in LOOP_BACKENDS  # the loop tests below run on both, here and in CI
    for name in set(BACKENDS) - set(LOOP_BACKENDS):
        try:
            backend_class(name)(TrainOptions()).check_available()
        except MissingDependency as exc:
            assert exc.exit_code == 3 and exc.hint, name
        else:  # installed: what this machine lacks is the GPU
            from medtune.train import _cuda_available

            assert not _cuda_available(), name


# How closely a resumed run repeats the unbroken one: MLX compiles its step, PyTorch repeats bit for bit.
TOLERANCE = {
    "mlx": dict(rtol=1e-5, atol=1e-6),
    "torch": dict(rtol=1e-6, atol=1e-7),
    "unsloth": dict(rtol=1e-6, atol=1e-7),
}


@pytest.fixture(scope="module", params=LOOP_BACKENDS)
def loop_backend(request):
    """A backend name; PyTorch on one thread while its tests run (conftest binds OpenBLAS for MLX; torch's own
    threads then fight its spinning pool on a shared 2-core machine: 3-5x slower)."""
    if request.param == "mlx":
        yield request.param
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory, tiny_llama_dir, prepared, loop_backend):
    out = tmp_path_factory.mktemp("unbroken") / "a"
    train(str(tiny_llama_dir), prepared, out, TrainOptions(**RESUME_OPTS), backend=loop_backend)
    return out


def _check_checkpoint(backend: str, ckpt) -> None:
    """What a checkpoint at step 3 of RESUME_OPTS holds, on each backend."""
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 3 and state["micro"] == 3 and state["pos"] == 3
    if backend == "mlx":
        assert {p.name for p in ckpt.iterdir()} == {
            "adapter_config.json",
            "adapters.safetensors",
            "optimizer.safetensors",
            "state.json",
        }
        return
    import torch

    assert {p.name for p in ckpt.iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "optimizer.pt",
        "rng.pt",
        "state.json",
    }
    assert state["backend"] == backend
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert saved["scheduler"]["last_epoch"] == 3 and saved["optimizer"]["state"]
    assert set(torch.load(ckpt / "rng.pt", weights_only=True)) == {"torch", "cuda", "python", "numpy"}


def test_resume_after_a_crash_is_the_same_run(tmp_path, tiny_llama_dir, prepared, loop_backend, unbroken):
    """Killed at step 5 (checkpoints every 3 steps), resumed: the same losses at the same steps as a run
    that never stopped; dropout (RNG), the cosine schedule with warm-up and Adam's moments all come back."""
    out = tmp_path / "b"

    def power_cut(step, row):
        if step == 5:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        train(str(tiny_llama_dir), prepared, out, TrainOptions(**RESUME_OPTS), backend=loop_backend, on_step=power_cut)
    ckpt = out / "checkpoints" / "step-0000003"
    assert [p.name for p in (out / "checkpoints").iterdir()] == [ckpt.name]
    _check_checkpoint(loop_backend, ckpt)
    res = train(str(tiny_llama_dir), prepared, out, TrainOptions(**RESUME_OPTS), backend=loop_backend, resume=True)
    assert res.resumed_from == 3 and res.backend == loop_backend
    (train_a, val_a), (train_b, val_b) = _losses(unbroken), _losses(out)
    assert [s for s, _ in train_b] == list(range(1, 9))
    np.testing.assert_allclose([v for _, v in train_b], [v for _, v in train_a], **TOLERANCE[loop_backend])
    np.testing.assert_allclose([v for _, v in val_b], [v for _, v in val_a], **TOLERANCE[loop_backend])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["learning_rate"] for r in rows if "train_loss" in r]
    assert lrs[0] < lrs[1] < lrs[2] and lrs[2] > lrs[-1]  # warm-up, then cosine decay


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tmp_path, tiny_llama_dir, prepared, loop_backend, unbroken):
    import signal

    from medtune.train import Interrupted
    from medtune.train.backends import backend_class

    out = tmp_path / "c"

    def ctrl_c(step, row):
        if step == 4:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(Interrupted, match="stopped at step 4/8") as exc:
        train(str(tiny_llama_dir), prepared, out, TrainOptions(**RESUME_OPTS), backend=loop_backend, on_step=ctrl_c)
    assert exc.value.exit_code == 130 and "same command again" in exc.value.hint
    optimizer_file = "optimizer.safetensors" if loop_backend == "mlx" else "optimizer.pt"
    assert (out / "checkpoints" / "step-0000004" / optimizer_file).is_file()
    assert not (out / backend_class(loop_backend).adapter_file).exists()
    res = train(
        str(tiny_llama_dir), prepared, out, TrainOptions(**RESUME_OPTS), backend=loop_backend
    )  # the same call: it resumes
    assert res.resumed_from == 4
    np.testing.assert_allclose(
        [v for _, v in _losses(out)[0]], [v for _, v in _losses(unbroken)[0]], **TOLERANCE[loop_backend]
    )


def test_grad_accumulation_dora_and_schedules_train(tmp_path, tiny_llama_dir, prepared):
    res = train(
        str(tiny_llama_dir),
        prepared,
        tmp_path / "d",
        TrainOptions(
            iters=6,
            batch_size=2,
            grad_accum=2,
            fine_tune_type="dora",
            num_layers=1,
            target_modules=["q_proj", "v_proj"],
            lr=1e-3,
            lr_schedule="linear",
            warmup=2,
            eval_every=6,
        ),
    )
    cfg = json.loads((tmp_path / "d" / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "dora" and cfg["lora_parameters"]["keys"] == [
        "self_attn.q_proj",
        "self_attn.v_proj",
    ]
    rows = [json.loads(x) for x in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines() if "train_loss" in x]
    lrs = [r["learning_rate"] for r in rows]
    top = lrs.index(max(lrs))
    assert 0 < top < len(lrs) - 1 and max(lrs) <= 1e-3 + 1e-9  # warm-up, then linear decay
    assert lrs[: top + 1] == sorted(lrs[: top + 1]) and lrs[top:] == sorted(lrs[top:], reverse=True)
    assert all(r["tokens_per_second"] > 0 for r in rows) and res.trainable_parameters > 0


def test_preflight_refuses_what_cannot_fit(tmp_path, tiny_llama_dir, prepared, monkeypatch):
    from medtune.core.errors import ResourceError

    dry = train(str(tiny_llama_dir), prepared, tmp_path / "e", TrainOptions(iters=5, batch_size=2), dry_run=True)
    pf = dry.preflight
    assert pf["trainable_parameters"] < pf["parameters"] and pf["steps"] == 5 and pf["estimated_peak_bytes"] > 0
    assert not (tmp_path / "e").exists()
    monkeypatch.setenv("MEDTUNE_MEMORY_LIMIT_GB", str(pf["estimated_peak_bytes"] / 1e9 / 2))
    with pytest.raises(ResourceError, match="needs ~") as exc:
        train(str(tiny_llama_dir), prepared, tmp_path / "e", TrainOptions(iters=5, batch_size=2))
    assert exc.value.exit_code == 4 and "--batch-size 1" in exc.value.hint
    assert not (tmp_path / "e").exists()


def test_dry_run_refuses_what_the_run_refuses_with_the_same_exit_code(tmp_path, tiny_llama_dir, prepared):
    """`train --dry-run` of a run that cannot fit shows the figures, then the run's own refusal (exit 4)."""
    from conftest import run_cli

    pf = train(
        str(tiny_llama_dir), prepared, tmp_path / "e", TrainOptions(iters=5, batch_size=2), dry_run=True
    ).preflight
    env = {"MEDTUNE_MEMORY_LIMIT_GB": str(pf["estimated_peak_bytes"] / 1e9 / 2)}
    args = (
        "train",
        "--model",
        tiny_llama_dir,
        "--data",
        prepared,
        "--out",
        tmp_path / "e",
        "--iters",
        "5",
        "--batch-size",
        "2",
        "--backend",
        "mlx",
    )
    real = run_cli(*args, env=env, cwd=tmp_path)
    dry = run_cli(*args, "--dry-run", env=env, cwd=tmp_path)
    assert real.returncode == 4, real.stderr
    assert dry.returncode == 4, dry.stderr
    refusal = [ln for ln in real.stderr.splitlines() if ln.startswith(("error:", "hint:"))]
    assert refusal and "needs ~" in refusal[0]
    assert [ln for ln in dry.stderr.splitlines() if ln.startswith(("error:", "hint:"))] == refusal
    assert "estimated peak" in dry.stderr.split("error:")[0]  # the figures come first
    assert not (tmp_path / "e").exists()
    js = run_cli(*args, "--dry-run", "--json", env=env, cwd=tmp_path)
    assert js.returncode == 4 and json.loads(js.stdout)["preflight"]["steps"] == 5


def test_full_fine_tune_fuses_and_fuse_will_not_overwrite_without_force(tmp_path, tiny_llama_dir, prepared):
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.tuner.utils import load_adapters

    from medtune.core.errors import BadInput
    from medtune.fuse import fuse

    adapter = tmp_path / "full"
    train(
        str(tiny_llama_dir),
        prepared,
        adapter,
        TrainOptions(iters=2, batch_size=2, fine_tune_type="full", num_layers=1, lr=1e-3, eval_every=2),
    )
    out = tmp_path / "fused"
    res = fuse(str(tiny_llama_dir), adapter, out)
    assert res.fused_layers == 0
    ids = mx.array([[1, 2, 3, 4, 5, 6]])
    fused, _ = load(str(out))
    expected = load_adapters(load(str(tiny_llama_dir))[0], str(adapter))
    base, _ = load(str(tiny_llama_dir))
    f, e, b = (np.array(m(ids)) for m in (fused, expected, base))
    assert np.abs(f - e).max() < 1e-4 and np.abs(f - b).max() > 1e-4
    with pytest.raises(BadInput, match="exists and is not empty") as exc:
        fuse(str(tiny_llama_dir), adapter, out)
    assert "--force" in exc.value.hint
    fuse(str(tiny_llama_dir), adapter, out, force=True, dtype="float16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"


def _two_free_ports() -> int:
    import random
    import socket

    for _ in range(50):
        port = random.randint(40000, 60000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    pytest.skip("no two free consecutive ports on localhost")


def test_two_processes_train_like_one_with_the_whole_batch(tmp_path, tiny_llama_dir, prepared):
    """`mlx.launch --backend ring -n 2` runs `medtune train` data-parallel on this machine: each process takes
    half of every batch, and the loss curve equals one process's on the whole batch."""
    import subprocess
    import sys
    from pathlib import Path

    launcher = Path(sys.executable).parent / "mlx.launch"
    if not launcher.exists():
        pytest.skip("mlx.launch is not installed")
    args = [
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
    one = tmp_path / "one"
    train(
        str(tiny_llama_dir),
        prepared,
        one,
        TrainOptions(iters=4, batch_size=4, num_layers=-1, rank=4, lr=3e-3, eval_every=2, seed=0),
    )
    two = tmp_path / "two"
    cmd = [
        str(launcher),
        "--backend",
        "ring",
        "-n",
        "2",
        "--hosts",
        "127.0.0.1",
        "--starting-port",
        str(_two_free_ports()),
        sys.executable,
        "-m",
        "medtune",
        "train",
        "--model",
        str(tiny_llama_dir),
        "--data",
        str(prepared),
        "--out",
        str(two),
        *args,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    (train_1, val_1), (train_2, val_2) = _losses(one), _losses(two)
    assert [s for s, _ in train_2] == [1, 2, 3, 4]
    np.testing.assert_allclose([v for _, v in train_2], [v for _, v in train_1], rtol=1e-4)
    np.testing.assert_allclose([v for _, v in val_2], [v for _, v in val_1], rtol=1e-4)
    assert json.loads((two / "manifest.json").read_text())["processes"] == 2


def test_qlora_on_an_mlx_quantized_base_and_dequantized_fuse(tmp_path, tiny_llama_dir, prepared):
    from mlx_lm import convert, load

    from medtune.core.errors import BadInput
    from medtune.fuse import fuse

    q = tmp_path / "q4"
    convert(str(tiny_llama_dir), mlx_path=str(q), quantize=True, q_group_size=32, q_bits=4)
    assert "quantization" in json.loads((q / "config.json").read_text())
    res = train(
        str(q), prepared, tmp_path / "a", TrainOptions(iters=3, batch_size=2, num_layers=-1, lr=3e-3, eval_every=3)
    )
    assert res.final_train_loss is not None and res.trainable_parameters < res.total_parameters
    with pytest.raises(BadInput, match="quantized"):
        fuse(str(q), tmp_path / "a", tmp_path / "f")
    fuse(str(q), tmp_path / "a", tmp_path / "f", dequantize=True)
    cfg = json.loads((tmp_path / "f" / "config.json").read_text())
    assert "quantization" not in cfg and "quantization_config" not in cfg
    model, _ = load(str(tmp_path / "f"))
    assert model(__import__("mlx.core", fromlist=["array"]).array([[1, 2, 3]])).shape[-1] == cfg["vocab_size"]
