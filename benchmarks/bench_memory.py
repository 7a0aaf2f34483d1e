"""Peak memory of batch-8 training, tinyunet beside PyTorch, each in a fresh process.

    python -m benchmarks.bench_memory [--batch-size 8] [--steps 3] [--threads N]

Each framework runs a few training steps (forward + BCE + backward + Adam) of the features=8 U-Net
at 128x128 in its own subprocess (tinyunet with its batch shared by --threads threads, as training
runs it); the peak resident memory (ru_maxrss) is read after the steps and
after the imports alone, and the difference is what training itself needed. The ratio is printed
last.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from benchmarks.common import add_threads_flag

TINYUNET = """
import json, resource, numpy as np
from tinyunet.unet import UNet
from tinyunet.losses import binary_crossentropy
from tinyunet.optim import Adam
from tinyunet.parallel import DataParallel
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = DataParallel(UNet(), THREADS); opt = Adam(model.params)
rng = np.random.default_rng(0)
x = rng.random((BATCH, 128, 128, 1), dtype=np.float32)
y = (rng.random((BATCH, 128, 128, 1)) > 0.5).astype(np.float32)
for _ in range(STEPS):
    loss, d = binary_crossentropy(model.forward(x, train=True), y)
    model.backward(d, input_grad=False); opt.step(model.grads)
print(json.dumps([base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss]))
"""

TORCH = """
import json, resource, torch
from benchmarks.common import torch_unet
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
net = torch_unet(torch); opt = torch.optim.Adam(net.parameters(), lr=1e-3, eps=1e-7)
x = torch.rand(BATCH, 1, 128, 128); y = (torch.rand(BATCH, 1, 128, 128) > 0.5).float()
loss_fn = torch.nn.BCEWithLogitsLoss()
for _ in range(STEPS):
    opt.zero_grad(set_to_none=True); loss_fn(net(x), y).backward(); opt.step()
print(json.dumps([base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss]))
"""


def peak_mb(code: str, batch: int, steps: int, threads: int = 1) -> tuple[float, float]:
    """(peak RSS after imports, peak RSS after training) in MiB, from a fresh interpreter."""
    code = code.replace("BATCH", str(batch)).replace("STEPS", str(steps)).replace("THREADS", str(threads))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    base, peak = json.loads(out.stdout.strip().splitlines()[-1])
    return base / 1024, peak / 1024  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8, help="images per step (default 8)")
    parser.add_argument("--steps", type=int, default=3, help="training steps before reading the peak")
    add_threads_flag(parser, "training")
    args = parser.parse_args()
    base, peak = peak_mb(TINYUNET, args.batch_size, args.steps, args.threads)
    print(f"tinyunet: peak {peak:7.1f} MiB, after imports {base:6.1f} MiB, training {peak - base:7.1f} MiB "
          f"({args.threads} thread(s))")
    try:
        import torch  # noqa: F401  (only to know whether the comparison can run)
    except ImportError:
        print("PyTorch not importable: no comparison")
        return
    tbase, tpeak = peak_mb(TORCH, args.batch_size, args.steps)
    print(f"PyTorch : peak {tpeak:7.1f} MiB, after imports {tbase:6.1f} MiB, "
          f"training {tpeak - tbase:7.1f} MiB")
    print(f"ratio tinyunet / PyTorch peak: {peak / tpeak:.2f}; training memory: "
          f"{(peak - base) / (tpeak - tbase):.2f}")


if __name__ == "__main__":
    main()
