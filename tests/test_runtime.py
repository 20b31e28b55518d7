import ctypes.util
import os
import subprocess
import sys

import pytest

from conftest import ROOT

LINUX_OPENBLAS = any(
    os.path.exists(p)
    for p in ("/usr/lib/x86_64-linux-gnu/libopenblas.so.0", "/usr/lib/aarch64-linux-gnu/libopenblas.so.0")
) or ctypes.util.find_library("openblas")


@pytest.mark.skipif(not (sys.platform.startswith("linux") and LINUX_OPENBLAS), reason="needs Linux with OpenBLAS")
def test_openblas_is_bound_before_mlx_and_is_faster():
    code = (
        "import time, sys\n"
        "from medtune.core import runtime\n"
        "s = runtime.setup(); mx = runtime.mx()\n"
        "a = mx.random.normal((768, 768)); mx.eval(a @ a)\n"
        "t = time.perf_counter()\n"
        "for _ in range(5): mx.eval(a @ a)\n"
        "print(s.active, 5 * 2 * 768**3 / (time.perf_counter() - t) / 1e9)\n"
    )
    res = {}
    for label, env in (("bound", {}), ("reference", {"MEDTUNE_NO_OPENBLAS": "1"})):
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env}
        )
        assert out.returncode == 0, out.stderr
        active, gflops = out.stdout.split()
        res[label] = (active == "True", float(gflops))
    assert res["bound"][0] is True and res["reference"][0] is False
    # The reference BLAS runs at a few GFLOP/s; OpenBLAS is many times faster even on a busy machine.
    assert res["bound"][1] > 3 * res["reference"][1], res


def test_binding_after_mlx_import_is_reported_not_silent():
    code = "import mlx.core\nfrom medtune.core import runtime\ns = runtime.setup()\nprint(s.active, '|', s.reason)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    if sys.platform.startswith("linux"):
        assert out.stdout.startswith("False |") and "imported before" in out.stdout


# ---- the engines' shared operations (medtune.runtimes.mlx / llamacpp, decoding) ------------------------------
QUESTION = [{"role": "user", "content": "What is the antidote for paracetamol overdose?"}]


@pytest.fixture(scope="module")
def tiny_mlx(tiny_llama_dir):
    from medtune.runtimes import mlx

    model, tokenizer = mlx.load(str(tiny_llama_dir))
    ids = tokenizer.encode(mlx.render_prompt(tokenizer, QUESTION), add_special_tokens=False)
    return model, tokenizer, ids


def test_mlx_greedy_with_the_modelfile_penalty_is_generate(tiny_mlx):
    """runtimes.mlx.greedy (our loop, numpy penalty rule) picks the tokens mlx_lm's generate picks at temp 0 with the
    same penalty: the one rule eval's GGUF column and fidelity decode with (a random tiny model loops, so the penalty
    decides at every step)."""
    from medtune.runtimes import mlx
    from medtune.runtimes.decoding import MODELFILE_PENALTY

    model, tokenizer, ids = tiny_mlx
    runs = {}
    for penalty in (MODELFILE_PENALTY, (3.0, 16)):
        want = mlx.generate(
            model, tokenizer, QUESTION, max_tokens=20, temp=0.0, repeat_penalty=penalty[0], repeat_last_n=penalty[1]
        )
        got = runs[penalty] = mlx.greedy(model, ids, 20, penalty=penalty, end_ids=tokenizer.eos_token_ids)
        assert (mlx.detokenize(tokenizer, got.answer_tokens), len(got.tokens), got.finish) == (
            want.text,
            want.tokens,
            want.finish_reason,
        )
    plain = mlx.greedy(model, ids, 20, end_ids=tokenizer.eos_token_ids, rows=True)
    assert plain.tokens != runs[(3.0, 16)].tokens  # the penalty is applied: the tiny model's loop is broken
    assert len(plain.rows) == len(plain.tokens) and all(int(r.argmax()) == t for r, t in zip(plain.rows, plain.tokens))


def test_mlx_token_logprobs_are_the_log_softmax_of_the_logits(tiny_mlx):
    import numpy as np

    from medtune.core import runtime
    from medtune.runtimes import mlx
    from medtune.runtimes.decoding import log_softmax, picked

    model, _, ids = tiny_mlx
    mx = runtime.mx()
    start = len(ids) - 5
    lp = mlx.token_logprobs(model, ids, start)
    logits = np.array(model(mx.array([ids[:-1]]))[0].astype(mx.float32))
    want = picked(log_softmax(logits[start:]), ids, start)
    assert lp.shape == (4,) and np.allclose(lp, want, atol=1e-4) and (lp < 0).all()


def test_greedy_result_and_penalty_helpers():
    import numpy as np

    from medtune.runtimes.decoding import Greedy, log_softmax, pick_greedy

    assert Greedy([4, 2], True).finish == "stop" and Greedy([4, 2], True).answer_tokens == [4]
    assert Greedy([4, 2], False).finish == "length" and Greedy([4, 2], False).answer_tokens == [4, 2]
    assert Greedy([4, 2], True, end_in_tokens=False).answer_tokens == [4, 2]  # llama-server returns no end token
    row = np.array([1.0, 1.05, -1.0], dtype=np.float32)
    assert pick_greedy(row.copy(), [0], None) == 1
    assert pick_greedy(row.copy(), [1], (1.1, 64)) == 0  # 1.05 / 1.1 < 1.0: the repeated token loses
    lp = log_softmax(np.array([[0.0, 0.0], [1000.0, 0.0]]))
    assert np.allclose(np.exp(lp).sum(axis=1), 1.0) and np.allclose(lp[0], np.log(0.5))


def test_llamacpp_and_mlx_give_the_same_greedy_and_logprobs_on_an_f32_export(tiny_mlx, tiny_llama_dir, tmp_path):
    """The two engines' shared operations agree on the same weights (F32 GGUF): greedy with and without a penalty
    (the rule that breaks the tiny model's loop), the finish, and the teacher-forced log-probs."""
    pytest.importorskip("llama_cpp")
    import numpy as np

    from medtune.export import export
    from medtune.runtimes import llamacpp, mlx
    from medtune.runtimes.decoding import MODELFILE_PENALTY

    model, tokenizer, ids = tiny_mlx
    gguf = export(tiny_llama_dir, tmp_path, "t", quants=("f32",), modelfile_path=tmp_path / "t.Modelfile").gguf_paths[
        "f32"
    ]
    llm = llamacpp.load_gguf(gguf, 512, n_threads=1, logits_all=True)
    try:
        for penalty in (None, MODELFILE_PENALTY, (3.0, 16)):
            want = mlx.greedy(model, ids, 16, penalty=penalty, end_ids=tokenizer.eos_token_ids)
            got = llamacpp.greedy(llm, ids, 16, penalty=penalty, end_ids=tokenizer.eos_token_ids, rows=True)
            assert (got.tokens, got.finish) == (want.tokens, want.finish), penalty
            assert len(got.rows) == len(got.tokens)
        seq = ids + want.tokens
        start = len(ids) - 1
        ours, theirs = mlx.token_logprobs(model, seq, start), llamacpp.token_logprobs(llm, seq, start)
        assert theirs.shape == ours.shape == (16,) and np.allclose(
            theirs, ours, atol=5e-3
        )  # F32 on both: kernels differ
        rows = llamacpp.logprobs(llm, seq, start)
        assert rows.shape == (16, llm.n_vocab()) and np.allclose(np.exp(rows).sum(axis=1), 1.0)
    finally:
        llm.close()
