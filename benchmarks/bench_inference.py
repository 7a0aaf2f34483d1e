"""Inference throughput: images/s predicting 101x101 test images, beside PyTorch's eval mode.

    python -m benchmarks.bench_inference [--images 256] [--batch-size 32] [--repeats 5] [--gpu] [--threads N]
                                         [--features 8] [--block double|double_bn|residual] [--fit resize|pad]
                                         [--no-fold]

tinyunet runs the whole prediction path of predict.py: fit 101 -> network (bilinear resize to 128,
or reflect-pad to 112), forward without dropout (BatchNorm folded into the convs, as predict.py does
it, unless --no-fold), sigmoid, back to 101. PyTorch runs the same network in eval mode under
no_grad with the same fitting (F.interpolate with align_corners=False, or F.pad reflect and a crop),
in NCHW and in channels-last. The ratios of throughputs are printed last.
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks.common import add_network_flags, add_threads_flag, machine, median_ms, torch_or_none, torch_unet
from tinyunet.fold import fold_batchnorm
from tinyunet.parallel import DataParallel
from tinyunet.pipeline import probabilities
from tinyunet.unet import UNet

SIDES = {"resize": 128, "pad": 112}  # the network's input side for 101 x 101 images


def torch_predictor(torch, args, images, channels_last: bool):
    """A function predicting every image with PyTorch, as tinyunet does (fit, sigmoid, back to 101)."""
    device = "cuda" if args.gpu else "cpu"
    net = torch_unet(torch, args.features, block=args.block).to(device).eval()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=layout)
    x = torch.from_numpy(images[:, None]).to(device)
    functional = torch.nn.functional
    before, after = (SIDES["pad"] - 101) // 2, SIDES["pad"] - 101 - (SIDES["pad"] - 101) // 2

    def fit(batch):
        if args.fit == "pad":
            return functional.pad(batch, (before, after, before, after), mode="reflect")
        return functional.interpolate(batch, size=(128, 128), mode="bilinear", align_corners=False)

    def unfit(p):
        if args.fit == "pad":
            return p[:, :, before:before + 101, before:before + 101]
        return functional.interpolate(p, size=(101, 101), mode="bilinear", align_corners=False)

    def predict():
        with torch.no_grad():
            for start in range(0, len(x), args.batch_size):
                batch = fit(x[start:start + args.batch_size]).contiguous(memory_format=layout)
                unfit(torch.sigmoid(net(batch))).contiguous()

    return predict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--images", type=int, default=256, help="images predicted per timed run")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs; the median is shown")
    parser.add_argument("--gpu", action="store_true", help="run on CuPy and PyTorch CUDA")
    parser.add_argument("--fit", choices=sorted(SIDES), default="resize",
                        help="resize 101 -> 128 (the seed recipe) or reflect-pad 101 -> 112 (--recipe best)")
    parser.add_argument("--no-fold", dest="fold", action="store_false",
                        help="keep the BatchNorm layers instead of folding them into the convs")
    add_threads_flag(parser, "predict.py")
    add_network_flags(parser)
    args = parser.parse_args()

    images = np.random.default_rng(0).random((args.images, 101, 101), dtype=np.float32)
    print(f"machine: {machine()}")
    print(f"U-Net features={args.features} block={args.block}: {args.images} images 101x101 -> "
          f"{SIDES[args.fit]} ({args.fit}) -> 101, batch {args.batch_size}, float32, median of {args.repeats} runs")
    model = UNet(features=args.features, block=args.block, gpu=args.gpu)
    folded = fold_batchnorm(model) if args.fold else 0
    net = DataParallel(model, args.threads)
    sync = net.xp.cuda.Device().synchronize if args.gpu else (lambda: None)
    ms, _ = median_ms(lambda: probabilities(net, images, args.fit, SIDES[args.fit], args.batch_size),
                      args.repeats, warmup=1, sync=sync)
    ours = args.images / ms * 1e3
    print(f"tinyunet              : {ours:8.1f} images/s  ({net.threads} thread(s), {folded} BatchNorm folded)")
    torch = torch_or_none()
    if torch is None:
        print("PyTorch not importable: no comparison")
        return
    torch_sync = torch.cuda.synchronize if args.gpu else (lambda: None)
    theirs = {}
    for channels_last, name in ((False, "PyTorch eval NCHW"), (True, "PyTorch eval channels-last")):
        torch_ms, _ = median_ms(torch_predictor(torch, args, images, channels_last), args.repeats, warmup=1,
                                sync=torch_sync)
        theirs[name] = args.images / torch_ms * 1e3
        print(f"{name:22s}: {theirs[name]:8.1f} images/s  (torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads)")
    for name, throughput in theirs.items():
        print(f"ratio tinyunet / {name}: {ours / throughput:.2f}")


if __name__ == "__main__":
    main()
