import ctypes.util
import os
import subprocess
import sys

import pytest

from conftest import ROOT

LINUX_OPENBLAS = any(os.path.exists(p) for p in ("/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
                                                  "/usr/lib/aarch64-linux-gnu/libopenblas.so.0")) or ctypes.util.find_library("openblas")


@pytest.mark.skipif(not (sys.platform.startswith("linux") and LINUX_OPENBLAS), reason="needs Linux with OpenBLAS")
def test_openblas_is_bound_before_mlx_and_is_faster():
    code = (
        "import time, sys\n"
        "from medtune import runtime\n"
        "s = runtime.setup(); mx = runtime.mx()\n"
        "a = mx.random.normal((768, 768)); mx.eval(a @ a)\n"
        "t = time.perf_counter()\n"
        "for _ in range(5): mx.eval(a @ a)\n"
        "print(s.active, 5 * 2 * 768**3 / (time.perf_counter() - t) / 1e9)\n"
    )
    res = {}
    for label, env in (("bound", {}), ("reference", {"MEDTUNE_NO_OPENBLAS": "1"})):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                             env={**os.environ, **env})
        assert out.returncode == 0, out.stderr
        active, gflops = out.stdout.split()
        res[label] = (active == "True", float(gflops))
    assert res["bound"][0] is True and res["reference"][0] is False
    # The reference BLAS runs at a few GFLOP/s; OpenBLAS is many times faster even on a busy machine.
    assert res["bound"][1] > 3 * res["reference"][1], res


def test_binding_after_mlx_import_is_reported_not_silent():
    code = "import mlx.core\nfrom medtune import runtime\ns = runtime.setup()\nprint(s.active, '|', s.reason)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    if sys.platform.startswith("linux"):
        assert out.stdout.startswith("False |") and "imported before" in out.stdout
