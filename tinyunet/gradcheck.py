"""Numerical gradient checks: is a backward pass the derivative of its forward?

For a layer y = f(x; W) and a *random* upstream gradient G (never all ones, which hides transposed
or mixed-up indices), define the scalar L = sum(f(x; W) * G). Then dL/dx is exactly what
``backward(G)`` must return, and dL/dW what it must put in ``grads["W"]``. Central differences

    dL/dx_i ~ (L(x + eps e_i) - L(x - eps e_i)) / (2 eps)

agree with a correct backward to about eps^2 in float64. Each input and each parameter is checked
on its own, and the error report shows both gradients so a wrong one is easy to locate.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from tinyunet.backend import as_array, as_numpy, get_array_module


def numerical_gradient(f: Callable[[], float], x, eps: float = 1e-6, entries=None) -> np.ndarray:
    """dF/dx by central differences, perturbing ``x`` in place (restored afterwards).

    With ``entries`` (flat indices into ``x``) only those are perturbed, and the result is their
    gradients as a 1-D array: a spot check for arrays too large to perturb whole.
    """
    if not x.flags.c_contiguous:
        raise ValueError("numerical_gradient perturbs x through a flat view: x must be C-contiguous")
    flat = x.reshape(-1)  # a view: writing it changes x
    whole = entries is None
    entries = range(flat.size) if whole else entries
    grad = np.zeros(len(entries), dtype=np.float64)
    for k, i in enumerate(entries):
        orig = flat[i].item()
        flat[i] = orig + eps
        plus = f()
        flat[i] = orig - eps
        minus = f()
        flat[i] = orig
        grad[k] = (plus - minus) / (2 * eps)
    return grad.reshape(x.shape) if whole else grad


def relative_error(analytic, numeric) -> float:
    """||a - n|| / max(||a|| + ||n||, tiny): 0 for equal gradients, 1 for opposite ones."""
    a, n = as_numpy(analytic).astype(np.float64), as_numpy(numeric).astype(np.float64)
    return float(np.linalg.norm(a - n) / max(np.linalg.norm(a) + np.linalg.norm(n), 1e-30))


class GradientMismatch(AssertionError):
    """A backward pass disagrees with the numerical derivative of its forward."""


def assert_gradients_close(name: str, analytic, numeric, tol: float = 1e-6) -> None:
    """Raise :class:`GradientMismatch` showing both gradients when their relative error >= tol."""
    err = relative_error(analytic, numeric)
    if not err < tol:
        a, n = as_numpy(analytic).ravel(), as_numpy(numeric).ravel()
        worst = int(np.argmax(np.abs(a - n)))
        raise GradientMismatch(
            f"gradient of {name}: relative error {err:.3e} >= {tol:.0e}; worst entry {worst}: "
            f"backward {a[worst]:.9g} vs numerical {n[worst]:.9g}\n"
            f"backward (first 8):  {np.array2string(a[:8], precision=6)}\n"
            f"numerical (first 8): {np.array2string(n[:8], precision=6)}"
        )


def check_layer(layer, inputs: list, rng: np.random.Generator, tol: float = 1e-6,
                eps: float = 1e-6) -> dict[str, float]:
    """Check ``layer.backward`` against central differences for every input and parameter.

    ``inputs`` are float64 arrays (one for most layers, two for Concatenate); the forward runs with
    ``train=True`` (freeze a Dropout's mask first). Returns name -> relative error; raises
    :class:`GradientMismatch` for any error >= ``tol``.
    """
    out = layer.forward(*inputs, train=True)
    G = as_array(rng.standard_normal(out.shape), get_array_module(out))  # random upstream gradient

    def loss() -> float:
        return float((layer.forward(*inputs, train=True) * G).sum())

    layer.forward(*inputs, train=True)
    dins = layer.backward(G)
    dins = dins if isinstance(dins, tuple) else (dins,)
    analytic = {f"input{i}": d for i, d in enumerate(dins)}
    analytic.update({key: g.copy() for key, g in layer.grads.items()})
    targets = {f"input{i}": x for i, x in enumerate(inputs)} | dict(layer.params)

    errors = {}
    for name, array in targets.items():
        numeric = numerical_gradient(loss, array, eps)
        assert_gradients_close(name, analytic[name], numeric, tol)
        errors[name] = relative_error(analytic[name], numeric)
    return errors
