"""Faults a laptop meets: a process killed (SIGKILL) in the middle of a stage, a full disk, too little memory,
two runs writing one folder. Every kill here is a real SIGKILL of the real `medtune` command at a random
moment (the seed is printed: MEDTUNE_FAULT_SEED=N reproduces a run) or at the worst moment, while a
temporary output exists; then the same command runs again."""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, SAMPLE, run_cli

SEED = int(os.environ.get("MEDTUNE_FAULT_SEED", str(int(time.time()) % 100000)))
LEFTOVER = (".tmp-", ".old-", ".intermediate-")


@pytest.fixture(scope="module")
def rng():
    print(f"fault-injection seed: MEDTUNE_FAULT_SEED={SEED}")
    return random.Random(SEED)


def start(*args, preexec=None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "medtune", *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=preexec,
    )


def kill(proc: subprocess.Popen) -> bool:
    """SIGKILL the command and every process it started; True if it was still running."""
    alive = proc.poll() is None
    if alive:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    return alive


def snapshot(path: Path) -> dict[str, str]:
    """sha256 of every visible file under `path` (a file or a folder); {} when it does not exist."""
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    if not path.is_dir():
        return {}
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    }


def leftovers(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith(".") and any(m in n for m in LEFTOVER))


def timed(*args) -> float:
    t0 = time.time()
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    return time.time() - t0


def kill_when(proc: subprocess.Popen, cond, timeout: float = 300) -> bool:
    """SIGKILL as soon as cond() holds (polled every millisecond); False if the command ended first."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if cond():
            return kill(proc)
        time.sleep(0.001)
    kill(proc)
    return False


# ---- the stages ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("faults")
    big = root / "big.jsonl"  # enough records that prepare spends a while writing
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines() if line.strip()]
    with open(big, "w", encoding="utf-8") as fh:
        for i in range(40):
            for r in rows:
                fh.write(json.dumps({**r, "Question": f"[{i}] {r['Question']}"}, ensure_ascii=False) + "\n")
    return {"root": root, "model": tiny_llama_dir, "big": big}


def _kill_and_rerun(root: Path, out: Path, commands: dict, snaps: dict, t_full: float, rng) -> None:
    """Two trials: SIGKILL the command that writes the other output than the one in place, at a random moment
    and then while its hidden temporary folder exists; check what is under the final name; run it again."""
    have = next(k for k, v in snaps.items() if v == snapshot(out))
    for how in ("random", "mid-write"):
        todo = next(k for k in commands if k != have)
        proc = start(*commands[todo])
        if how == "random":
            time.sleep(rng.uniform(0.3, t_full))
            kill(proc)
        else:
            assert kill_when(proc, lambda: any(n.startswith(f".{out.name}.tmp-") for n in os.listdir(root))), (
                "the command finished before its output was being written"
            )
        now = snapshot(out)
        moved = [n for n in os.listdir(root) if n.startswith(f".{out.name}.old-")]
        # never a mix, never a partial file: the old folder, the new one, or (killed between the two renames of
        # the swap) the old one set aside, which the next run puts back
        assert now in (snaps[have], snaps[todo]) or (
            now == {} and moved and snapshot(root / moved[0]) == snaps[have]
        ), how
        r = run_cli(*commands[todo])
        assert r.returncode == 0, r.stderr[-2000:]
        assert snapshot(out) == snaps[todo] and leftovers(root) == [], how
        have = todo


def test_prepare_killed_at_random_then_rerun(work, rng):
    root, model = work["root"], work["model"]
    out = root / "prep"
    cmd = ("prepare", work["big"], "--model", model, "--max-seq-length", 1024, "--no-token-stats", "--out", out)
    commands = {seed: (*cmd, "--seed", seed) for seed in (1, 2)}
    timed(*commands[2])
    snaps = {2: snapshot(out)}
    t_full = timed(*commands[1])  # the previous good output: another split
    snaps[1] = snapshot(out)
    assert snaps[1] and snaps[2] and snaps[1] != snaps[2]
    _kill_and_rerun(root, out, commands, snaps, t_full, rng)


@pytest.fixture(scope="module")
def prepared(work):
    data = work["root"] / "data"
    timed(
        "prepare",
        SAMPLE,
        "--model",
        work["model"],
        "--out",
        data,
        "--limit",
        16,
        "--valid-ratio",
        0.25,
        "--max-seq-length",
        512,
        "--no-token-stats",
    )
    return data


def _train_cmd(work, prepared, out, seed=0):
    return (
        "train",
        "--model",
        work["model"],
        "--data",
        prepared,
        "--out",
        out,
        "--iters",
        10,
        "--batch-size",
        2,
        "--num-layers",
        2,
        "--max-seq-length",
        512,
        "--eval-every",
        5,
        "--save-every",
        2,
        "--seed",
        seed,
    )


def _steps_logged(metrics: Path) -> int:
    if not metrics.is_file():
        return 0
    steps = [
        json.loads(line).get("step", 0)
        for line in metrics.read_text(encoding="utf-8").splitlines()
        if line.strip().startswith("{") and line.strip().endswith("}") and "train_loss" in line
    ]
    return max(steps, default=0)


def test_train_killed_at_random_resumes_losing_at_most_save_every(work, prepared, rng):
    import mlx.core as mx

    root = work["root"]
    ref = root / "train-ref"
    timed(*_train_cmd(work, prepared, ref))
    want = mx.load(str(ref / "adapters.safetensors"))
    out = root / "train"
    timed(*_train_cmd(work, prepared, out, seed=7))  # a finished run of other settings: the previous good output
    old = {n: snapshot(out / n) for n in ("adapters.safetensors", "adapter_config.json", "manifest.json")}
    for trial in range(2):
        proc = start(*_train_cmd(work, prepared, out))
        metrics = out / "metrics.jsonl"
        at = 1 + trial * 3 + rng.randrange(4)
        started = kill_when(proc, lambda metrics=metrics, at=at: _steps_logged(metrics) >= at)
        reached = _steps_logged(metrics)
        marker = out / ".medtune-train.json"
        finished = json.loads(marker.read_text())["finished"]  # killed after the very end: nothing to resume
        if started and not finished:
            for name, snap in old.items():  # killed mid-run: the finished run's adapter is untouched
                assert snapshot(out / name) == snap, name
        r = run_cli(*_train_cmd(work, prepared, out))
        assert r.returncode == 0, r.stderr[-2000:]
        rec = json.loads((out / "manifest.json").read_text())
        resumed = rec["result"]["resumed_from"]
        if started and not finished:
            assert resumed is not None and reached - resumed <= 2, (reached, resumed)  # --save-every 2
            assert "resuming" in r.stdout + r.stderr
        got = mx.load(str(out / "adapters.safetensors"))
        assert got.keys() == want.keys()
        for k in want:  # the resumed run ends exactly where the unbroken one does
            assert mx.allclose(got[k], want[k], atol=1e-6).item(), k
        assert leftovers(out) == [] and leftovers(out / "checkpoints") == []
        old = {n: snapshot(out / n) for n in old}


def test_unfinished_run_of_other_settings_is_not_resumed(work, prepared):
    out = work["root"] / "train-other"
    proc = start(*_train_cmd(work, prepared, out))
    assert kill_when(proc, lambda: (out / "checkpoints" / "step-0000002" / "state.json").is_file())
    r = run_cli(*_train_cmd(work, prepared, out, seed=3))
    assert r.returncode == 2 and "unfinished training run with other settings" in r.stdout + r.stderr
    assert "(changed: seed)" in r.stdout + r.stderr and "--fresh" in r.stdout + r.stderr
    r = run_cli(*_train_cmd(work, prepared, out, seed=3), "--fresh")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "manifest.json").read_text())["result"]["resumed_from"] is None


@pytest.fixture(scope="module")
def adapter(work, prepared):
    out = work["root"] / "adapter"
    timed(
        "train",
        "--model",
        work["model"],
        "--data",
        prepared,
        "--out",
        out,
        "--iters",
        2,
        "--batch-size",
        2,
        "--num-layers",
        2,
        "--max-seq-length",
        512,
        "--eval-every",
        2,
        "--save-every",
        2,
    )
    return out


def test_fuse_killed_at_random_then_rerun(work, adapter, rng):
    root = work["root"]
    out = root / "fused"
    base = ("fuse", "--model", work["model"], "--adapter", adapter, "--force", "--out", out)
    commands = {d: (*base, "--dtype", d) for d in ("float16", "float32")}
    timed(*commands["float16"])
    snaps = {"float16": snapshot(out)}
    t_full = timed(*commands["float32"])
    snaps["float32"] = snapshot(out)
    assert snaps["float16"] != snaps["float32"]
    _kill_and_rerun(root, out, commands, snaps, t_full, rng)


@pytest.fixture(scope="module")
def fused(work, adapter):
    out = work["root"] / "fused32"
    timed("fuse", "--model", work["model"], "--adapter", adapter, "--out", out, "--dtype", "float32")
    return out


def _export_cmd(fused, out, quant="f32"):
    return ("export", fused, "--out", out, "--name", "t", "-q", quant, "--modelfile", out / "t.Modelfile")


def test_export_killed_at_random_then_rerun(work, fused, rng):
    root = work["root"]
    out = root / "gguf"
    t_full = timed(*_export_cmd(fused, out))
    good = snapshot(out)
    for how, delay in [("random", rng.uniform(0.3, t_full)), ("mid-write", None)]:
        proc = start(*_export_cmd(fused, out))
        if delay is None:
            kill_when(proc, lambda: out.is_dir() and any(".tmp-" in n for n in os.listdir(out)))
        else:
            time.sleep(delay)
            kill(proc)
        now = snapshot(out)
        # same command, so the same bytes: any file under a final name is complete or the old one
        assert {k: v for k, v in now.items() if k != "export_manifest.json"} == {
            k: v for k, v in good.items() if k != "export_manifest.json"
        }, (how, delay)
        r = run_cli(*_export_cmd(fused, out))
        assert r.returncode == 0, r.stderr[-2000:]
        assert snapshot(out).keys() == good.keys() and leftovers(out) == [], (how, delay)


# ---- disk ------------------------------------------------------------------------------------------
def _limit_file_size(limit: int):
    def set_limit():  # a size-limited file: writes past `limit` bytes fail with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return set_limit


@pytest.mark.parametrize("stage", ["export", "fuse", "prepare"])
def test_disk_full_during_write_leaves_nothing_corrupt(work, adapter, fused, stage, tmp_path):
    if stage == "export":
        out = tmp_path / "gguf"
        cmd = _export_cmd(fused, out)
        timed(*cmd)
        target = out
    elif stage == "fuse":
        out = tmp_path / "fused"
        cmd = ("fuse", "--model", work["model"], "--adapter", adapter, "--out", out, "--force")
        timed(*cmd)
        target = out
    else:
        out = tmp_path / "data"
        cmd = ("prepare", work["big"], "--model", work["model"], "--out", out, "--no-token-stats")
        timed(*cmd)
        target = out
    good = snapshot(target)
    proc = start(*cmd, preexec=_limit_file_size(256 << 10))
    stdout, stderr = proc.communicate(timeout=600)
    text = stdout + stderr
    assert proc.returncode == 4, text[-3000:]
    assert "disk filled up while writing" in text and "hint:" in text and "Traceback" not in text
    assert snapshot(target) == good  # the previous output is intact
    assert leftovers(target.parent) == [] and (not target.is_dir() or leftovers(target) == [])


def test_disk_preflight_refuses_with_the_numbers(work, adapter, fused, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from medtune.core.errors import ResourceError
    from medtune.export import export
    from medtune.fuse import fuse

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 30, (10 << 30) - (3 << 20), 3 << 20))
    with pytest.raises(ResourceError, match=r"not enough disk .*needs ~.*GiB, 0\.00 GiB free") as e:
        fuse(str(work["model"]), adapter, tmp_path / "f")
    assert e.value.exit_code == 4 and not (tmp_path / "f").exists()
    with pytest.raises(ResourceError, match=r"not enough disk for t-f32.gguf"):
        export(fused, tmp_path / "g", "t", quants=("f32",), modelfile_path=tmp_path / "g" / "t.Modelfile")
    assert not (tmp_path / "g").exists() or not any(p.name.endswith(".gguf") for p in (tmp_path / "g").iterdir())


def test_memory_guard_on_fuse_and_export(work, adapter, fused, tmp_path):
    env = {"MEDTUNE_MEMORY_LIMIT_GB": "0.001"}
    r = run_cli("fuse", "--model", work["model"], "--adapter", adapter, "--out", tmp_path / "f", env=env)
    assert (
        r.returncode == 4
        and "merging the adapter needs ~" in r.stdout + r.stderr
        and "GB is available" in r.stdout + r.stderr
    )
    assert not (tmp_path / "f").exists()
    r = run_cli(*_export_cmd(fused, tmp_path / "g"), env=env)
    assert r.returncode == 4 and "writing the GGUF needs ~" in r.stdout + r.stderr
    assert not list(tmp_path.glob("g/*.gguf"))


# ---- two writers -----------------------------------------------------------------------------------
HOLD = "import sys, time; from medtune.core import lock; lock.acquire(sys.argv[1], 'medtune test-holder'); print('held', flush=True); time.sleep(600)"


def test_second_writer_refused_and_stale_lock_taken_over(work, tmp_path):
    out = tmp_path / "data"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = run_cli("prepare", SAMPLE, "--model", work["model"], "--out", out, "--limit", 8, "--no-token-stats")
        text = r.stdout + r.stderr
        assert r.returncode == 4 and f"pid {holder.pid}" in text and "test-holder" in text, text[-2000:]
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock file is stale and the next run takes it over
    assert (tmp_path / ".data.medtune.lock").exists()
    r = run_cli("prepare", SAMPLE, "--model", work["model"], "--out", out, "--limit", 8, "--no-token-stats")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "stale lock" in r.stdout + r.stderr and (out / "train.jsonl").is_file()
    assert not (tmp_path / ".data.medtune.lock").exists()  # released at the end


def test_lock_is_reentrant_in_process_and_exclusive_across(tmp_path):
    from medtune.core import lock
    from medtune.core.errors import ResourceError

    target = tmp_path / "out"
    with lock.locked(target), lock.locked(target):  # `medtune run` holding a folder a stage locks again
        assert lock.lock_path(target).exists()
        code = f"from medtune.core import lock; lock.acquire({str(target)!r})"
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode != 0 and "ResourceError" in r.stderr and str(os.getpid()) in r.stderr
    assert not lock.lock_path(target).exists()
    with lock.locked(target):
        pass
    with pytest.raises(ResourceError):
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(target)], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        try:
            holder.stdout.readline()
            lock.acquire(target)
        finally:
            holder.kill()
            holder.wait()


def test_concurrent_medtune_run_refused(tmp_path, work):
    import yaml

    cfg = {"name": "busy", "model": str(work["model"]), "runs_dir": str(tmp_path)}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "busy")], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        holder.stdout.readline()
        r = run_cli("run", path)
        assert r.returncode == 4 and "in use by another medtune process" in r.stdout + r.stderr
    finally:
        holder.kill()
        holder.wait()


def test_really_full_disk_on_a_small_tmpfs(work, tmp_path):
    """A real ENOSPC, where this machine lets us mount one (root on Linux): prepare writes into a 1 MiB tmpfs
    that holds a small previous output but not the new one."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here (needs root); the RLIMIT_FSIZE tests cover the same path")
    try:
        out = mnt / "data"
        cmd = ("prepare", "--model", work["model"], "--out", out, "--no-token-stats")
        timed("prepare", SAMPLE, *cmd[1:], "--limit", 8)
        good = snapshot(out)
        r = run_cli("prepare", work["big"], *cmd[1:])
        text = r.stdout + r.stderr
        assert r.returncode == 4 and "No space left on device" in text and "Traceback" not in text, text[-2000:]
        assert snapshot(out) == good and leftovers(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
