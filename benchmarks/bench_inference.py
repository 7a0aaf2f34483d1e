"""Inference throughput: images/s predicting 101x101 test images, beside PyTorch's eval mode.

    python -m benchmarks.bench_inference [--images 256] [--batch-size 32] [--repeats 5] [--gpu] [--threads N]
                                         [--features 8] [--block double|double_bn|residual]

tinyunet runs the whole prediction path of predict.py (resize 101 -> 128, forward without dropout,
sigmoid, resize back to 101); PyTorch runs the same network in eval mode under no_grad with the same
bilinear resizes (F.interpolate, align_corners=False). The ratio of throughputs is printed last.
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks.common import add_network_flags, add_threads_flag, machine, median_ms, torch_or_none, torch_unet
from tinyunet.parallel import DataParallel
from tinyunet.pipeline import probabilities
from tinyunet.unet import UNet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--images", type=int, default=256, help="images predicted per timed run")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs; the median is shown")
    parser.add_argument("--gpu", action="store_true", help="run on CuPy and PyTorch CUDA")
    add_threads_flag(parser, "predict.py")
    add_network_flags(parser)
    args = parser.parse_args()

    images = np.random.default_rng(0).random((args.images, 101, 101), dtype=np.float32)
    print(f"machine: {machine()}")
    print(f"U-Net features={args.features} block={args.block}: {args.images} images 101x101 -> 128 -> 101, "
          f"batch {args.batch_size}, float32, "
          f"median of {args.repeats} runs")
    net = DataParallel(UNet(features=args.features, block=args.block, gpu=args.gpu), args.threads)
    sync = net.xp.cuda.Device().synchronize if args.gpu else (lambda: None)
    ms, _ = median_ms(lambda: probabilities(net, images, "resize", 128, args.batch_size),
                      args.repeats, warmup=1, sync=sync)
    ours = args.images / ms * 1e3
    print(f"tinyunet         : {ours:8.1f} images/s  ({net.threads} thread(s))")
    torch = torch_or_none()
    if torch is None:
        print("PyTorch not importable: no comparison")
        return
    device = "cuda" if args.gpu else "cpu"
    net = torch_unet(torch, args.features, block=args.block).to(device).eval()
    x = torch.from_numpy(images[:, None]).to(device)
    interpolate = torch.nn.functional.interpolate

    def torch_predict():
        with torch.no_grad():
            for start in range(0, len(x), args.batch_size):
                batch = interpolate(x[start:start + args.batch_size], size=(128, 128),
                                    mode="bilinear", align_corners=False)
                interpolate(torch.sigmoid(net(batch)), size=(101, 101), mode="bilinear",
                            align_corners=False)

    torch_sync = torch.cuda.synchronize if args.gpu else (lambda: None)
    torch_ms, _ = median_ms(torch_predict, args.repeats, warmup=1, sync=torch_sync)
    theirs = args.images / torch_ms * 1e3
    print(f"PyTorch eval NCHW: {theirs:8.1f} images/s  (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)")
    print(f"ratio tinyunet / PyTorch throughput: {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
