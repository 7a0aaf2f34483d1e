"""Where a training step's time goes: every layer's forward and backward, beside PyTorch's convs.

    python -m benchmarks.bench_layers [--features 8] [--block double|double_bn|residual] [--size 128]
                                      [--batch-size 8] [--repeats 5] [--threads N] [--dropout R,R,R,R]

Each layer instance of the U-Net is timed inside real training steps run as train.py runs them (the batch
shared by ``--threads`` threads, BLAS on one thread per shard); the times are shard 0's, i.e. one core's
while the other cores do the same work on their shards (medians over the steps), then grouped by kind. When
PyTorch is importable, each convolution shape of that shard is also timed in PyTorch (channels-last,
forward + backward of that conv alone, on as many threads as the shards) and the ratio is printed last.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import numpy as np

from benchmarks.common import add_network_flags, add_step_flags, add_threads_flag, machine, torch_or_none
from tinyunet.layers import Conv2D
from tinyunet.losses import binary_crossentropy
from tinyunet.optim import Adam
from tinyunet.parallel import DataParallel
from tinyunet.unet import UNet


def time_layers(model: UNet, net: DataParallel, steps: int, x, y) -> dict[str, dict[str, float]]:
    """Median forward and backward milliseconds of every layer of shard 0 over ``steps`` training steps."""
    times: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for name, layer in model.named_layers():
        for method in ("forward", "backward"):
            inner = getattr(layer, method)

            def timed(*args, _inner=inner, _name=name, _method=method, **kwargs):
                start = time.perf_counter()
                out = _inner(*args, **kwargs)
                times[_name][_method].append((time.perf_counter() - start) * 1e3)
                return out

            setattr(layer, method, timed)  # an instance attribute: the class stays untouched
    opt = Adam(model.params)
    for _ in range(steps + 1):
        start = time.perf_counter()
        logits = net.forward(x, train=True)  # every layer of shard 0 times itself
        loss, dlogits = binary_crossentropy(logits, y)
        net.backward(dlogits, input_grad=False)
        opt.step(model.grads)
        times["step"]["whole"].append((time.perf_counter() - start) * 1e3)
    return {name: {m: statistics.median(v[1:]) for m, v in by_method.items()}  # first step: warm-up
            for name, by_method in times.items()}


def torch_conv_ms(torch, shape: tuple[int, ...], c_out: int, k: int, repeats: int) -> float:
    """Forward + backward of one PyTorch conv (channels-last), median ms."""
    n, h, w, c = shape
    conv = torch.nn.Conv2d(c, c_out, k, padding=k // 2).to(memory_format=torch.channels_last)
    x = torch.rand(n, c, h, w).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    g = torch.rand(n, c_out, h, w).contiguous(memory_format=torch.channels_last)
    runs = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        conv(x).backward(g)
        runs.append((time.perf_counter() - start) * 1e3)
    return statistics.median(runs[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_step_flags(parser, repeats=5)
    parser.add_argument("--dropout", default=None,
                        help="the levels' dropout rates, comma-separated (default: the seed's; --recipe best: 0,0,0,0)")
    add_threads_flag(parser, "training")
    add_network_flags(parser)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.random((args.batch_size, args.size, args.size, 1), dtype=np.float32)
    y = (rng.random(x.shape) > 0.5).astype(np.float32)
    dropout = None if args.dropout is None else [float(rate) for rate in args.dropout.split(",")]
    model = UNet(features=args.features, depth=4, block=args.block, dropout=dropout)
    net = DataParallel(model, args.threads)
    per_layer = time_layers(model, net, args.repeats, x, y)
    layers = dict(model.named_layers())

    print(f"machine: {machine()}")
    print(f"U-Net features={args.features} depth=4 block={args.block}, batch {args.batch_size}, "
          f"{args.size}x{args.size}, {len(net.splits)} shard(s) on as many threads; shard 0's layers, "
          f"median of {args.repeats} steps (ms)")
    print(f"{'layer':20s} {'forward':>8s} {'backward':>9s}")
    kinds: dict[str, float] = defaultdict(float)
    for name, layer in layers.items():
        t = per_layer.get(name, {})
        kinds[type(layer).__name__] += sum(t.values())
        print(f"{name:20s} {t.get('forward', 0):8.2f} {t.get('backward', 0):9.2f}")
    in_layers = sum(kinds.values())
    step = per_layer["step"]["whole"]
    print("\nby kind: " + ", ".join(f"{k} {v:.1f} ms ({v / step:.0%})"
                                    for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])))
    print(f"shard 0's layers: {in_layers:.1f} ms of the {step:.1f} ms step; the rest ({step - in_layers:.1f} ms): "
          f"the blocks' own gradient sums (skips, shortcuts), loss, Adam, joining the shards")

    torch = torch_or_none()
    if torch is None:
        print("PyTorch not importable: no per-conv comparison")
        return
    print(f"\nconvolutions, forward + backward (ms): tinyunet's shard 0 on one core beside the other shards, "
          f"PyTorch channels-last on the whole batch with {torch.get_num_threads()} threads, same shape")
    ours_total = theirs_total = 0.0
    for name, layer in layers.items():
        if not isinstance(layer, Conv2D):
            continue
        _, _, _, h, w = layer.grid
        kh, _, c, f = layer.params["W"].shape
        ours = sum(per_layer[name].values())
        theirs = torch_conv_ms(torch, (args.batch_size, h, w, c), f, kh, args.repeats)
        ours_total, theirs_total = ours_total + ours, theirs_total + theirs
        print(f"{name:20s} {str((h, w, c, f)):20s} {ours:7.2f} {theirs:7.2f}  x{ours / theirs:.2f}")
    print(f"ratio tinyunet / PyTorch over all convs: {ours_total / theirs_total:.2f}")


if __name__ == "__main__":
    main()
