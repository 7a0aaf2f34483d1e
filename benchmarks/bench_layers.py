"""Where a training step's time goes: every layer's forward and backward, beside PyTorch's convs.

    python -m benchmarks.bench_layers [--batch-size 8] [--size 128] [--repeats 5]

Each layer instance of the features=8 U-Net is timed inside real training steps (median over the
steps), then grouped by kind. When PyTorch is importable, each convolution shape is also timed in
PyTorch (channels-last, forward + backward of that conv alone) and the ratio is printed last.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import numpy as np

from benchmarks.common import machine, torch_or_none
from tinyunet.layers import Conv2D
from tinyunet.losses import binary_crossentropy
from tinyunet.optim import Adam
from tinyunet.unet import UNet


def layers_by_name(model: UNet) -> dict:
    """Every layer instance of the model under a readable name, in forward order."""
    named = {}
    blocks = [(f"enc{i}", b) for i, b in enumerate(model.encoders, 1)] + [("bridge", model.bridge)]
    blocks += [(f"dec{len(model.decoders) - i}", b) for i, b in enumerate(model.decoders)]
    for name, block in blocks:
        convs = getattr(block, "convs", block)
        for attr in ("up", "concat", "dropout", "pool"):
            if hasattr(block, attr):
                named[f"{name}.{attr}"] = getattr(block, attr)
        for attr in ("conv1", "relu1", "conv2", "relu2"):
            named[f"{name}.{attr}"] = getattr(convs, attr)
    named["head"] = model.head
    return named


def time_layers(model: UNet, steps: int, x, y) -> dict[str, dict[str, float]]:
    """Median forward and backward milliseconds of every layer over ``steps`` training steps."""
    times: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for name, layer in layers_by_name(model).items():
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
        logits = model.forward(x, train=True)  # every layer times itself
        start = time.perf_counter()
        loss, dlogits = binary_crossentropy(logits, y)
        times["loss"]["forward"].append((time.perf_counter() - start) * 1e3)
        model.backward(dlogits, input_grad=False)
        start = time.perf_counter()
        opt.step(model.grads)
        times["adam"]["step"].append((time.perf_counter() - start) * 1e3)
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
    parser.add_argument("--batch-size", type=int, default=8, help="images per step (default 8)")
    parser.add_argument("--size", type=int, default=128, help="image side (default 128)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps; medians are shown")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.random((args.batch_size, args.size, args.size, 1), dtype=np.float32)
    y = (rng.random(x.shape) > 0.5).astype(np.float32)
    model = UNet()
    per_layer = time_layers(model, args.repeats, x, y)

    print(f"machine: {machine()}")
    print(f"batch {args.batch_size}, {args.size}x{args.size}, median of {args.repeats} steps (ms)")
    print(f"{'layer':16s} {'forward':>8s} {'backward':>9s}")
    kinds: dict[str, float] = defaultdict(float)
    for name, t in per_layer.items():
        total = sum(t.values())
        kind = name.split(".")[-1].rstrip("0123456789") if "." in name else name
        kinds[kind] += total
        print(f"{name:16s} {t.get('forward', t.get('step', 0)):8.2f} {t.get('backward', 0):9.2f}")
    step = sum(kinds.values())
    print("\nby kind: " + ", ".join(f"{k} {v:.1f} ms ({v / step:.0%})"
                                    for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])))
    print(f"sum of layers + loss + Adam: {step:.1f} ms")

    torch = torch_or_none()
    if torch is None:
        print("PyTorch not importable: no per-conv comparison")
        return
    print("\nconvolutions, forward + backward (ms): tinyunet vs PyTorch channels-last, same shape")
    ours_total = theirs_total = 0.0
    for name, layer in layers_by_name(model).items():
        if not isinstance(layer, Conv2D):
            continue
        n, _, _, h, w = layer.grid
        kh, _, c, f = layer.params["W"].shape
        ours = sum(per_layer[name].values())
        theirs = torch_conv_ms(torch, (n, h, w, c), f, kh, args.repeats)
        ours_total, theirs_total = ours_total + ours, theirs_total + theirs
        print(f"{name:16s} {str((h, w, c, f)):20s} {ours:7.2f} {theirs:7.2f}  x{ours / theirs:.2f}")
    print(f"ratio tinyunet / PyTorch over all convs: {ours_total / theirs_total:.2f}")


if __name__ == "__main__":
    main()
