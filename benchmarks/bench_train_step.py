"""Time one training step (forward + BCE + backward + Adam) of a U-Net, beside the same one in PyTorch.

    python -m benchmarks.bench_train_step [--batch-size 8] [--size 128] [--repeats 10] [--gpu] [--threads N]
                                          [--features 8] [--block double|double_bn|residual]

Prints ms/step, images/s and GFLOP/s (FLOPs of every conv and up-conv, counted from the layers;
backward counted as twice the forward), then PyTorch's eager step on the same device in NCHW and
channels-last when PyTorch is importable, and the ratio tinyunet / PyTorch last.
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks.common import (add_network_flags, add_step_flags, add_threads_flag, machine, median_ms, torch_or_none,
                               torch_unet)
from tinyunet.backend import as_array
from tinyunet.losses import binary_crossentropy
from tinyunet.optim import Adam
from tinyunet.parallel import DataParallel
from tinyunet.unet import UNet


def tinyunet_step(batch_size: int, size: int, repeats: int, gpu: bool, threads: int | None = None,
                  features: int = 8, block: str = "double") -> tuple[float, float]:
    """Median ms per step and FLOPs per step of tinyunet, the batch shared by ``threads`` threads."""
    model = UNet(features=features, depth=4, block=block, gpu=gpu)
    net = DataParallel(model, threads)
    xp = model.xp
    rng = np.random.default_rng(0)
    x = as_array(rng.random((batch_size, size, size, 1), dtype=np.float32), xp)
    y = as_array((rng.random((batch_size, size, size, 1)) > 0.5).astype(np.float32), xp)
    opt = Adam(model.params, lr=1e-3)

    def step():
        loss, dlogits = binary_crossentropy(net.forward(x, train=True), y)
        net.backward(dlogits, input_grad=False)  # as training does: no gradient for the images
        opt.step(model.grads)

    sync = xp.cuda.Device().synchronize if gpu else (lambda: None)
    ms, _ = median_ms(step, repeats, sync=sync)
    return ms, 3 * sum(row["flops"] for row in model.layer_table(size, batch_size))


def torch_step(torch, batch_size: int, size: int, repeats: int, channels_last: bool,
               device: str, features: int = 8, block: str = "double") -> float:
    net = torch_unet(torch, features, block=block).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, eps=1e-7)
    x = torch.rand(batch_size, 1, size, size, device=device)
    y = (torch.rand(batch_size, 1, size, size, device=device) > 0.5).float()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        opt.step()

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return median_ms(step, repeats, sync=sync)[0]


def torch_steps(torch, batch_size: int, size: int, repeats: int, device: str, features: int = 8,
                block: str = "double") -> dict[str, float]:
    """PyTorch's median ms per step in NCHW, then channels-last, each printed as it is measured.

    Always in this order: the NCHW runs warm PyTorch's threads and allocator up before channels-last
    is timed (on the CPU its channels-last step measured first, right after tinyunet's, ran 17-50 %
    slower in session 13)."""
    results = {}
    for channels_last in (False, True):
        name = "PyTorch channels-last" if channels_last else "PyTorch NCHW"
        results[name] = torch_step(torch, batch_size, size, repeats, channels_last, device, features, block)
        print(f"{name:22s}: {results[name]:8.1f} ms/step  {batch_size / results[name] * 1e3:7.1f} images/s  "
              f"(torch {torch.__version__}, {torch.get_num_threads()} threads)")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_step_flags(parser, repeats=10)
    parser.add_argument("--gpu", action="store_true", help="run on CuPy and PyTorch CUDA")
    add_threads_flag(parser, "training")
    add_network_flags(parser)
    args = parser.parse_args()

    print(f"machine: {machine()}")
    print(f"U-Net features={args.features} depth=4 block={args.block}, batch {args.batch_size}, "
          f"{args.size}x{args.size}, float32, "
          f"median of {args.repeats} steps")
    ms, flops = tinyunet_step(args.batch_size, args.size, args.repeats, args.gpu, args.threads, args.features,
                              args.block)
    per_image = flops / args.batch_size / 1e9
    print(f"tinyunet  : {ms:8.1f} ms/step  {args.batch_size / ms * 1e3:7.1f} images/s  "
          f"{flops / ms / 1e6:6.1f} GFLOP/s  ({per_image:.2f} GFLOP per image per step, "
          f"{1 if args.gpu else args.threads} thread(s))")
    torch = torch_or_none()
    if torch is None:
        print("PyTorch not importable: no comparison (pip install torch to compare)")
        return
    results = torch_steps(torch, args.batch_size, args.size, args.repeats, "cuda" if args.gpu else "cpu",
                          args.features, args.block)
    for name, torch_ms in results.items():
        print(f"ratio tinyunet / {name}: {ms / torch_ms:.2f}")


if __name__ == "__main__":
    main()
