"""Adam, as Keras computes it.

For each parameter p with gradient g, at step t = 1, 2, ...:

    m = beta_1 * m + (1 - beta_1) * g
    v = beta_2 * v + (1 - beta_2) * g^2
    p = p - lr * sqrt(1 - beta_2^t) / (1 - beta_1^t) * m / (sqrt(v) + epsilon)

The bias corrections are folded into the step size, and epsilon is added after the square root, as
in Keras (so results match its Adam for the same epsilon).
"""

from __future__ import annotations

from collections.abc import Mapping

from tinyunet.backend import as_array, get_array_module


class Adam:
    """Adam over an ordered mapping name -> parameter array, updated in place by :meth:`step`.

    ``lr`` is a plain attribute: callbacks such as ReduceLROnPlateau change it between steps.
    """

    def __init__(self, params: Mapping, lr: float = 1e-3, beta_1: float = 0.9, beta_2: float = 0.999,
                 epsilon: float = 1e-7):
        self.params = params  # name -> array, the model's own arrays (updated in place)
        self.lr = lr
        self.beta_1, self.beta_2, self.epsilon = beta_1, beta_2, epsilon
        self.t = 0  # steps taken
        self.m = {name: get_array_module(p).zeros_like(p) for name, p in params.items()}  # 1st moments
        self.v = {name: get_array_module(p).zeros_like(p) for name, p in params.items()}  # 2nd moments

    def step(self, grads: Mapping) -> None:
        """Apply one update with ``grads`` (same names as the parameters)."""
        self.t += 1
        b1, b2 = self.beta_1, self.beta_2
        step_size = self.lr * (1 - b2 ** self.t) ** 0.5 / (1 - b1 ** self.t)
        for name, p in self.params.items():
            xp = get_array_module(p)
            g, m, v = grads[name], self.m[name], self.v[name]
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * (g * g)
            p -= step_size * m / (xp.sqrt(v) + self.epsilon)

    def reset(self) -> None:
        """Forget both moments and the step count: the next step is the first of a new Adam (warm restarts
        with --restart-optimizer). The arrays are zeroed in place; the learning rate is left as it is."""
        self.t = 0
        for moments in (self.m, self.v):
            for moment in moments.values():
                moment[...] = 0

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: hyper-parameters, step count and both moments."""
        return {"lr": self.lr, "beta_1": self.beta_1, "beta_2": self.beta_2, "epsilon": self.epsilon,
                "t": self.t, "m": dict(self.m), "v": dict(self.v)}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a :meth:`state_dict` (moments may be NumPy arrays; they move to the params' device)."""
        missing = set(self.params) - set(state["m"]) | set(self.params) - set(state["v"])
        if missing:
            raise ValueError(f"optimizer state lacks moments for {sorted(missing)[:3]}")
        self.lr = float(state["lr"])
        self.beta_1, self.beta_2 = float(state["beta_1"]), float(state["beta_2"])
        self.epsilon, self.t = float(state["epsilon"]), int(state["t"])
        for key, moments in (("m", self.m), ("v", self.v)):
            for name, p in self.params.items():
                value = as_array(state[key][name], get_array_module(p))
                if value.shape != p.shape:
                    raise ValueError(f"optimizer moment {key} of {name} has shape {value.shape}, "
                                     f"the parameter {p.shape}")
                moments[name] = value.astype(p.dtype, copy=True)
