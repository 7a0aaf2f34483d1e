"""Data parallelism on the CPU's cores: every thread runs the whole U-Net on its share of the batch.

NumPy lets go of Python's GIL inside its loops and matrix products, so Python threads really do run
layers at the same time. Each share of the batch (a "shard") gets its own replica of the network:
the replicas share the *parameter arrays* (one set of weights, updated once by the optimizer) but
keep their own forward caches, dropout streams and gradients, which are then summed:

    logits   = concat_k  forward_k(x_k)               x_k: the k-th slice of the batch
    dL/dW    = sum_k     backward_k(dlogits_k)         into the model's own grads

The sum is exact because the loss is a mean over the *whole* batch: its gradient dlogits already
carries the 1/(N*H*W) of every pixel, so each shard's slice of it is that shard's share of dL/dW.

Why not let BLAS thread each matrix product instead? With 8 to 16 channels most of a step is thin
matrix products and elementwise passes (padding, ReLU, pooling, concatenation, dropout) that NumPy runs
on one core; threading whole shards puts every core on all of it. Inside the shards BLAS runs on one
thread (threadpoolctl), so k shards use k cores and never fight over them.

Inference (``train=False``) on the CPU goes one step further: each shard runs its images in pieces
of about ``INFERENCE_PIXELS`` pixels (4 images of 128 x 128), small enough that a piece's activations
stay in the cores' caches between layers. The replicas' caches then hold only their last piece, so a
backward needs a training forward. A GPU predicts its whole batch at once: in 4-image pieces it would
spend its time waiting for kernel launches.

Results depend (slightly) on the number of shards: each shard draws its own dropout masks, and the
gradient sums are added in another order. The same seed and thread count repeat a run exactly.
On a GPU there is one shard: the device is the parallelism.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import ThreadpoolController

from tinyunet.backend import map_batches

# Pixels per inference forward on the CPU: on 2 cores a 4-image piece of 128 x 128 predicted about 15 %
# faster per image than a 16-image one (see docs/performance.md); training keeps the whole shard, as
# backward needs, and so does the GPU.
INFERENCE_PIXELS = 4 * 128 * 128


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class DataParallel:
    """Run ``model`` (a :class:`tinyunet.unet.UNet`) on up to ``threads`` shards of every batch.

    Same interface as the model for what training and prediction call: ``forward(x, train)``,
    ``backward(dlogits, input_grad)``, ``reseed_dropout(seed)``, ``load_params``, ``params``,
    ``grads``, ``xp``, ``dtype`` and ``config``. Shard 0 is ``model`` itself, so after ``backward``
    the summed gradients are in ``model.grads``. A batch of B images uses min(threads, B) shards of sizes that
    differ by at most one. ``threads=None`` uses every usable core; on CuPy it is always 1.
    """

    def __init__(self, model, threads: int | None = None):
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        threads = usable_cores() if threads is None else threads
        self.model = model
        self.threads = 1 if model.xp is not np else threads
        self.replicas = [model] + [model.replica() for _ in range(self.threads - 1)]
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="tinyunet") if self.threads > 1 else None
        self.blas = ThreadpoolController() if self.pool else None  # limits BLAS to 1 thread per shard
        self.splits = []  # [(replica, slice of the batch)] of the last forward, reused by backward

    # --- what training and prediction read from the model ---

    xp = property(lambda self: self.model.xp)
    dtype = property(lambda self: self.model.dtype)
    config = property(lambda self: self.model.config)
    params = property(lambda self: self.model.params)
    buffers = property(lambda self: self.model.buffers)
    grads = property(lambda self: self.model.grads)

    def load_params(self, params, buffers=None) -> None:
        """Copy values into the shared parameter (and buffer) arrays: every replica sees them."""
        self.model.load_params(params, buffers)

    def reseed_dropout(self, seed) -> None:
        """Replica 0 (the model) reseeds with ``seed``; replica k > 0 with ``(*seed, k)``."""
        for k, replica in enumerate(self.replicas):
            replica.reseed_dropout(seed if k == 0 else (*np.atleast_1d(seed).tolist(), k))

    # --- forward and backward, shard by shard ---

    def _map(self, fn, items: list) -> list:
        """``[fn(*item) for item in items]``, one thread each, BLAS single-threaded meanwhile."""
        if len(items) == 1:
            return [fn(*items[0])]
        with self.blas.limit(limits=1, user_api="blas"):
            return list(self.pool.map(lambda item: fn(*item), items))

    def forward(self, x, train: bool = False):
        """Logits (N, H, W, 1): every shard's forward, joined along the batch."""
        bounds = np.linspace(0, len(x), min(self.threads, len(x)) + 1).round().astype(int)
        shards = [(replica, slice(a, b)) for replica, a, b in zip(self.replicas, bounds, bounds[1:])]
        if train:
            self.splits = shards  # backward runs the same shards in reverse
            outs = self._map(lambda replica, part: replica.forward(x[part], train=True), shards)
        else:
            self.splits = []  # the replicas' caches hold only their last piece
            outs = self._map(lambda replica, part: self._infer(replica, x[part]), shards)
        return self._join(outs)

    def _infer(self, replica, x):
        """``replica.forward(x)``, on the CPU in pieces of about INFERENCE_PIXELS pixels, joined."""
        if self.xp is not np:
            return replica.forward(x)
        piece = max(1, INFERENCE_PIXELS // (x.shape[1] * x.shape[2]))
        return map_batches(replica.forward, x, piece, self.xp, self.dtype)

    def _join(self, parts: list):
        return parts[0] if len(parts) == 1 else self.xp.concatenate(parts)

    def backward(self, dlogits, input_grad: bool = True):
        """Fill ``model.grads`` with the sum of every shard's gradients; return dL/dx (or None)."""
        if not self.splits:
            raise RuntimeError("DataParallel.backward needs a forward with train=True first "
                               "(an inference forward keeps nothing for it)")
        dxs = self._map(lambda replica, part: replica.backward(dlogits[part], input_grad), self.splits)
        total = self.model.grads
        for replica, _ in self.splits[1:]:  # in shard order, so the sum is reproducible
            for name, grad in replica.grads.items():
                total[name] += grad
        if not input_grad:
            return None
        return self._join(dxs)
