"""What the benchmarks share: timing by medians, the machine's description, and PyTorch's twin U-Net.

PyTorch is only a yardstick: it is imported when installed and never needed by tinyunet itself.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import numpy as np

from tinyunet.parallel import usable_cores



def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 2,
              sync: Callable[[], None] = lambda: None) -> tuple[float, list[float]]:
    """Median wall time of ``fn`` in milliseconds over ``repeats`` runs, after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), times


def add_step_flags(parser, repeats: int) -> None:
    """``--batch-size``, ``--size`` and ``--repeats`` of the benchmarks that time a training step."""
    parser.add_argument("--batch-size", type=int, default=8, help="images per step (default 8)")
    parser.add_argument("--size", type=int, default=128, help="image height and width (default 128)")
    parser.add_argument("--repeats", type=int, default=repeats,
                        help=f"timed steps; medians are shown (default {repeats})")


def add_threads_flag(parser, used_by: str) -> None:
    """``--threads N``: threads sharing each batch, by default every usable core, as ``used_by`` runs."""
    parser.add_argument("--threads", type=int, default=usable_cores(),
                        help=f"threads sharing each batch (default: every usable core, as {used_by} does)")


def machine() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, " \
           f"NumPy {np.__version__}"


def torch_or_none():
    try:
        import torch
    except ImportError:
        return None
    return torch


def torch_unet(torch, features: int = 8, depth: int = 4, dropout=(0.25, 0.3, 0.4, 0.5), block: str = "double"):
    """The same network in PyTorch (NCHW), layer for layer, for each kind of tinyunet.blocks conv unit
    (BatchNorm as Keras's: momentum 0.99 is PyTorch's 0.01, epsilon 1e-3; no conv bias before a BN)."""
    nn = torch.nn

    def bn(c):
        return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)

    class Residual(nn.Module):
        def __init__(self, c_in, c_out):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), bn(c_out), nn.ReLU(),
                                      nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), bn(c_out))
            self.shortcut = nn.Conv2d(c_in, c_out, 1, bias=False) if c_in != c_out else nn.Identity()

        def forward(self, x):
            return nn.functional.relu(self.body(x) + self.shortcut(x))

    def unit(c_in, c_out):
        if block == "residual":
            return Residual(c_in, c_out)
        if block == "double_bn":
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), bn(c_out), nn.ReLU(),
                                 nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), bn(c_out), nn.ReLU())
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(c_out, c_out, 3, padding=1), nn.ReLU())

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            widths = [features * 2 ** i for i in range(depth + 1)]
            self.enc = nn.ModuleList(unit(a, b) for a, b in zip([1] + widths[:-2], widths))
            self.drop_enc = nn.ModuleList(nn.Dropout(r) for r in dropout)
            self.bridge = unit(widths[-2], widths[-1])
            self.up = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
                                    for i in reversed(range(depth)))
            self.drop_dec = nn.ModuleList(nn.Dropout(dropout[i]) for i in reversed(range(depth)))
            self.dec = nn.ModuleList(unit(2 * widths[i], widths[i]) for i in reversed(range(depth)))
            self.head = nn.Conv2d(features, 1, 1)

        def forward(self, x):
            skips = []
            for conv, drop in zip(self.enc, self.drop_enc):
                x = conv(x)
                skips.append(x)
                x = drop(nn.functional.max_pool2d(x, 2))
            x = self.bridge(x)
            for up, drop, conv, skip in zip(self.up, self.drop_dec, self.dec, reversed(skips)):
                x = conv(drop(torch.cat([up(x), skip], 1)))
            return self.head(x)

    return Net()


def add_network_flags(parser) -> None:
    """``--features`` and ``--block``: which U-Net both sides build (default: the seed's)."""
    from tinyunet.blocks import BLOCKS

    parser.add_argument("--features", type=int, default=8, help="filters at the top level (default 8)")
    parser.add_argument("--block", choices=BLOCKS, default="double",
                        help="each level's conv unit (default: double, the seed's; --recipe best: residual)")
