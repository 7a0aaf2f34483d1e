"""The GEMM floor of a training step: its matrix products alone, beside the whole step and PyTorch's.

    python -m benchmarks.bench_gemm_floor [--features 8] [--block double|double_bn|residual] [--size 128]
                                          [--batch-size 8] [--repeats 5] [--threads N]

tinyunet lowers every convolution to matrix products, one per kernel tap on shifted rows
(:mod:`tinyunet.conv`), and every up-convolution to one product. Whatever else a step does (padding, bias,
ReLU, BatchNorm, pooling, the sums of the taps, Adam), it must compute these products, so their time is a
lower bound on the step for this design. This replays exactly the products of one training step, shard by
shard as ``DataParallel`` runs it (one thread per shard, BLAS on one thread each), on the layers' own
cached inputs after a real forward:

    conv, each tap group:  cols @ W_group               (forward)
                           d_rows[:L] @ W_t^T            (input gradient; none where the input is the image)
                           cols^T @ d_rows[:L]           (weight gradient), and ones(R) @ d_rows (bias, if any)
    up-conv:               x2d @ W_rows, x2d^T @ drows, drows @ W_rows^T, and ones @ drows (bias)

It prints the products' time, by pass and in all, beside the whole step (``bench_train_step``'s) and, when
PyTorch is importable, PyTorch's step (NCHW and channels-last) in the same process.
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import ThreadpoolController

from benchmarks.bench_train_step import tinyunet_step, torch_steps
from benchmarks.common import add_network_flags, add_step_flags, add_threads_flag, machine, median_ms, torch_or_none
from tinyunet.conv import column_sums, gather_taps, tap_groups, tap_offsets
from tinyunet.layers import Conv2D, Conv2DTranspose
from tinyunet.parallel import DataParallel
from tinyunet.unet import UNet

PASSES = ("forward", "input gradient", "weight gradient")


def conv_products(conv: Conv2D, rng) -> dict[str, list]:
    """The products of one Conv2D's forward and backward, as closures over its cached input."""
    wp = conv.grid[2]
    W = conv.params["W"]  # (KH, KW, C, F)
    c, f = W.shape[2], W.shape[3]
    x_rows = conv.x_rows  # (R, C)
    offsets = tap_offsets(*conv.kernel_size, wp)
    length = len(x_rows) - offsets[-1]  # L
    d_rows = rng.standard_normal((len(x_rows), f), dtype=np.float32)  # (R, F), an upstream gradient
    W_rows = W.reshape(-1, f)  # (KH*KW*C, F)
    groups = tap_groups(len(offsets), c)
    cols = [gather_taps(x_rows, offsets[g.start:g.stop], length) for g in groups]  # built once, untimed
    out = np.empty((length, f), np.float32)
    dx = np.empty((length, c), np.float32)
    products = {
        "forward": [lambda a=a, g=g: np.matmul(a, W_rows[g.start * c:g.stop * c], out=out)
                    for a, g in zip(cols, groups)],
        "input gradient": [] if c == 1 else [  # the first layer's input is the image: no gradient
            lambda t=t: np.matmul(d_rows[:length], W_rows[t * c:(t + 1) * c].T, out=dx) for t in range(len(offsets))],
        "weight gradient": [lambda a=a: a.T @ d_rows[:length] for a in cols],
    }
    if "b" in conv.params:  # no bias where a BatchNorm follows, so no bias gradient either
        products["weight gradient"].append(lambda: column_sums(d_rows))
    return products


def upconv_products(up: Conv2DTranspose, rng) -> dict[str, list]:
    """The three products of one Conv2DTranspose, over its cached input rows."""
    x2d = up.x2d  # (N*H*W, C)
    W_rows = up._w_rows()  # (C, KH*KW*F)
    drows = rng.standard_normal((len(x2d), W_rows.shape[1]), dtype=np.float32)  # (N*H*W, KH*KW*F)
    return {"forward": [lambda: x2d @ W_rows], "input gradient": [lambda: drows @ W_rows.T],
            "weight gradient": [lambda: x2d.T @ drows, lambda: column_sums(drows)]}


def shard_products(replica: UNet, rng) -> dict[str, list]:
    """Every product of one shard's training step, by pass, in the layers' forward order."""
    products = {name: [] for name in PASSES}
    for _, layer in replica.named_layers():
        if isinstance(layer, Conv2D):
            found = conv_products(layer, rng)
        elif isinstance(layer, Conv2DTranspose):
            found = upconv_products(layer, rng)
        else:
            continue
        for name in PASSES:
            products[name] += found[name]
    return products


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_step_flags(parser, repeats=5)
    add_threads_flag(parser, "training")
    add_network_flags(parser)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    model = UNet(features=args.features, depth=4, block=args.block)
    net = DataParallel(model, args.threads)
    x = rng.random((args.batch_size, args.size, args.size, 1), dtype=np.float32)
    net.forward(x, train=True)  # fills every shard's layers with their inputs and grids
    shards = [shard_products(replica, rng) for replica, _ in net.splits]

    pool = ThreadPoolExecutor(len(shards))
    blas = ThreadpoolController()

    def replay(passes) -> None:
        """Each shard's products of ``passes`` on its own thread, all shards at once, as DataParallel runs."""
        def one(products):
            for name in passes:
                for product in products[name]:
                    product()

        with blas.limit(limits=1, user_api="blas"):
            list(pool.map(one, shards))

    print(f"machine: {machine()}")
    print(f"U-Net features={args.features} depth=4 block={args.block}, batch {args.batch_size}, "
          f"{args.size}x{args.size}, {len(shards)} shard(s) on {len(shards)} thread(s), median of {args.repeats}")
    counts = ", ".join(f"{sum(len(s[name]) for s in shards)} {name}" for name in PASSES)
    print(f"products replayed per step: {counts}")
    floor = {}
    for name in PASSES:
        floor[name], _ = median_ms(lambda name=name: replay((name,)), args.repeats)
        print(f"  {name:16s} products: {floor[name]:7.1f} ms")
    all_ms, _ = median_ms(lambda: replay(PASSES), args.repeats)
    print(f"  every product     : {all_ms:7.1f} ms  (the three apart: {sum(floor.values()):.1f} ms)")
    step_ms, _ = tinyunet_step(args.batch_size, args.size, args.repeats, False, args.threads, args.features,
                               args.block)
    print(f"tinyunet step       : {step_ms:7.1f} ms  (products {all_ms / step_ms:.0%} of it, "
          f"the rest {step_ms - all_ms:.1f} ms)")
    torch = torch_or_none()
    if torch is None:
        print("PyTorch not importable: no comparison (pip install torch to compare)")
        return
    for name, torch_ms in torch_steps(torch, args.batch_size, args.size, args.repeats, "cpu", args.features,
                                      args.block).items():
        print(f"ratio products alone / {name} step: {all_ms / torch_ms:.2f}; "
              f"tinyunet step / {name} step: {step_ms / torch_ms:.2f}")


if __name__ == "__main__":
    main()
