"""Checks the command-line and training tests share (imported as ``helpers``: pytest puts tests/ on the path)."""

from __future__ import annotations

from tinyunet import losses


def exit_code(main, argv: list) -> int:
    """A script's exit code from its ``main(argv)``, in this process (argparse exits via SystemExit)."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as exit:
        return exit.code


def assert_one_line_error(stderr: str, *words: str) -> None:
    """``stderr`` is one line starting 'error: ', without a traceback, holding every one of ``words``."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    for word in words:
        assert word in lines[0], (word, stderr)


def poison_loss(monkeypatch, at_call: int, factor: float) -> dict:
    """Make training's loss non-finite (loss * ``factor``) at its ``at_call``-th call, counting from 1.

    Returns the live call count, ``{"n": calls so far}``.
    """
    real = losses.LOSSES["bce"]
    calls = {"n": 0}

    def poisoned(logits, target):
        calls["n"] += 1
        loss, dlogits = real(logits, target)
        return (loss * factor if calls["n"] == at_call else loss), dlogits

    monkeypatch.setitem(losses.LOSSES, "bce", poisoned)
    return calls


def check_whole_network(model, x, y, sample: int | None = None, tol: float = 1e-6) -> list[str]:
    """Gradient-check BCE -> logits -> the input and every parameter of ``model`` (float64), with the
    dropout masks drawn once and frozen; returns the names checked. ``sample``: check each array at
    that many random entries only (a big network), instead of every entry."""
    import numpy as np

    from tinyunet.backend import as_numpy
    from tinyunet.gradcheck import assert_gradients_close, numerical_gradient

    model.forward(x, train=True)  # draw the dropout masks once ...
    for layer in model.dropouts:
        layer.frozen = True  # ... and keep them for every evaluation below
    assert any(float((layer.mask == 0).mean()) > 0 for layer in model.dropouts)

    def loss() -> float:
        return float(losses.binary_crossentropy(model.forward(x, train=True), y)[0])

    _, dlogits = losses.binary_crossentropy(model.forward(x, train=True), y)
    dx = model.backward(dlogits)
    analytic = {"input": dx} | {name: g.copy() for name, g in model.grads.items()}
    targets = {"input": x} | model.params
    rng = np.random.default_rng(0)
    for name, array in targets.items():
        if sample is None:
            assert_gradients_close(name, analytic[name], numerical_gradient(loss, array), tol=tol)
        else:
            entries = rng.choice(array.size, min(array.size, sample), replace=False)
            assert_gradients_close(name, as_numpy(analytic[name]).reshape(-1)[entries],
                                   numerical_gradient(loss, array, entries=entries), tol=tol)
    return list(targets)


# The bit-exact references from before the redesign (tests/test_training.py) were computed with OpenBLAS's
# Haswell kernels. OpenBLAS picks its kernels by CPU (an AVX-512 machine gets SkylakeX's, which sum in another
# order), so those tests run under the Haswell kernels on every x86-64 CPU that has them (OPENBLAS_CORETYPE).
REFERENCE_KERNEL = "Haswell"


def blas_kernel() -> str | None:
    """The kernel family NumPy's OpenBLAS runs (threadpoolctl's 'architecture'); None for another BLAS."""
    import numpy  # noqa: F401  (loads the BLAS that threadpoolctl looks for)
    from threadpoolctl import threadpool_info

    kernels = [info.get("architecture") for info in threadpool_info()
               if info.get("internal_api") == "openblas" and "numpy" in info.get("filepath", "")]
    return kernels[0] if kernels else None


def on_reference_kernels(request) -> bool:
    """True when this process already runs the reference kernels (run the test's body here); otherwise runs
    the test of ``request`` (pytest's fixture) in a fresh pytest process under them, from the same root
    folder, asserts that it passed and returns False. Skips where neither is possible (another BLAS, or a
    CPU without AVX2)."""
    import os
    import platform
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    if blas_kernel() == REFERENCE_KERNEL:
        return True
    if os.environ.get("OPENBLAS_CORETYPE") == REFERENCE_KERNEL:
        pytest.fail(f"OPENBLAS_CORETYPE={REFERENCE_KERNEL} is set but NumPy's BLAS runs {blas_kernel()}")
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.exists() else ""
    if blas_kernel() is None or platform.machine() != "x86_64" or " avx2 " not in flags:
        pytest.skip(f"the bit-exact reference needs OpenBLAS's {REFERENCE_KERNEL} kernels (x86-64 with AVX2); "
                    f"this machine runs {blas_kernel() or 'another BLAS'}")
    env = {**os.environ, "OPENBLAS_CORETYPE": REFERENCE_KERNEL}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", request.node.nodeid],
                          env=env, cwd=request.config.rootpath, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    return False
