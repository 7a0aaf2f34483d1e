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
