"""The U-Net, wired like its diagram (depth 4, features 8 shown; sizes for a 128 x 128 input):

    input (N,128,128,1)
    enc1: conv3x3-ReLU x2 -> x1 (128,128,8)  --------------------------------- skip ----+
          maxpool 2x2, dropout 0.25 -> (64,64,8)                                         |
    enc2: conv3x3-ReLU x2 -> x2 (64,64,16)   ----------------------- skip ----+          |
          maxpool, dropout 0.3 -> (32,32,16)                                  |          |
    enc3: conv3x3-ReLU x2 -> x3 (32,32,32)   ------------- skip ----+         |          |
          maxpool, dropout 0.4 -> (16,16,32)                        |         |          |
    enc4: conv3x3-ReLU x2 -> x4 (16,16,64)   --- skip ----+         |         |          |
          maxpool, dropout 0.5 -> (8,8,64)                |         |         |          |
    bridge: conv3x3-ReLU x2 -> (8,8,128)                  |         |         |          |
    dec4: up-conv 2x2/2 -> (16,16,64), concat [up, x4] <--+, dropout 0.5, conv-ReLU x2 (64)
    dec3: up-conv -> (32,32,32),  concat [up, x3] <-----------------+, dropout 0.4, conv x2 (32)
    dec2: up-conv -> (64,64,16),  concat [up, x2] <---------------------------+, dropout 0.3 ...
    dec1: up-conv -> (128,128,8), concat [up, x1] <--------------------------------------+ ...
    head: conv 1x1 -> logits (N,128,128,1); sigmoid -> probabilities

Backward runs the same path in reverse: each decoder block returns the gradient for the block
below *and* for its skip, and each encoder block adds its skip gradient to the one from below.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tinyunet.backend import as_array, get_backend, map_batches
from tinyunet.blocks import BLOCKS, Block, DecoderBlock, EncoderBlock, conv_unit
from tinyunet.fold import fold_batchnorm
from tinyunet.layers import BatchNormalization, Conv2D, Dropout, sigmoid
from tinyunet.layers import Sigmoid  # study mode: the summary's last row

DROPOUT = (0.25, 0.3, 0.4, 0.5)  # the recipe's dropout per level, top level first
MAX_DEPTH = 8  # levels: the image is halved at every one
MAX_WIDTH = 2048  # the bridge's filters, features * 2**depth (the seed's: 128); its 3x3 conv is 151 MB in float32


def default_dropout(depth: int) -> tuple[float, ...]:
    """The recipe's rates fitted to ``depth`` levels: cut, or extended with its last rate (0.5)."""
    return tuple(DROPOUT[min(level, len(DROPOUT) - 1)] for level in range(depth))


class UNet(Block):
    """The U-Net: ``depth`` levels down and up, ``features`` filters at the top level, doubling per
    level down; each level's two convolutions are a conv unit of kind ``block`` (see
    :mod:`tinyunet.blocks`: the seed's "double", "double_bn", "residual"). 485,673 parameters at
    features=8, depth=4, block="double".

    ``forward(x, train)`` maps images (N, H, W, in_channels) to logits (N, H, W, 1); H and W must
    be divisible by 2**depth. ``predict(x)`` gives probabilities. ``backward(dlogits)`` fills
    ``grads`` and returns dL/dx. ``params``, ``grads`` and ``buffers`` are ordered name -> array
    mappings in forward order (first encoder conv first, head last), sharing the layers' own arrays.
    ``dropout=None`` takes the recipe's rates for the depth (:func:`default_dropout`).
    """

    def __init__(self, features: int = 8, depth: int = 4, dropout: Sequence[float] | None = None,
                 in_channels: int = 1, block: str = "double", seed: int = 0, dtype=np.float32,
                 gpu: bool = False):
        if depth < 1 or features < 1:
            raise ValueError(f"UNet needs depth >= 1 and features >= 1, got depth={depth}, "
                             f"features={features}")
        dropout = default_dropout(depth) if dropout is None else tuple(dropout)
        if len(dropout) != depth:
            raise ValueError(f"UNet needs one dropout rate per level: depth={depth}, got {dropout}")
        if block not in BLOCKS:
            raise ValueError(f"UNet block must be one of {', '.join(BLOCKS)}, got {block!r}")
        self.config = {"features": features, "depth": depth, "dropout": list(dropout),
                       "in_channels": in_channels}
        if block != "double":  # the seed's config (and its checkpoints' metadata) stays as it was
            self.config["block"] = block
        self.xp = xp = get_backend(gpu)
        self.dtype = np.dtype(dtype)
        self.folded = False  # BatchNorm folded into the convs (tinyunet.fold): for inference only
        self.depth = depth
        rng = np.random.default_rng(seed)  # initial weights: drawn on the host, same on any device
        widths = [features * 2 ** level for level in range(depth + 1)]  # e.g. 8, 16, 32, 64, 128
        children = {}
        for level, (c_in, c_out, rate) in enumerate(zip([in_channels] + widths[:-2], widths, dropout), start=1):
            children[f"enc{level}"] = EncoderBlock(block, c_in, c_out, rate, rng, dtype, xp)
        children["bridge"] = conv_unit(block, widths[-2], widths[-1], rng, dtype, xp, inline=False)  # bridge.conv1
        for level in reversed(range(1, depth + 1)):  # dec4 (the deepest) first: forward order
            children[f"dec{level}"] = DecoderBlock(block, widths[level], widths[level - 1], dropout[level - 1],
                                                   rng, dtype, xp)
        children["head"] = Conv2D(features, 1, 1, rng=rng, dtype=dtype, xp=xp)
        super().__init__(children)
        self.reseed_dropout(seed)

    def wiring(self, run, x):
        skips = []
        for level in range(1, self.depth + 1):  # x1 ... x4, each kept for its decoder
            x, skip = run(f"enc{level}", x)
            skips.append(skip)
        x = run("bridge", x)
        for level in reversed(range(1, self.depth + 1)):  # dec4 takes x4, ..., dec1 takes x1
            x = run(f"dec{level}", x, skips.pop())
        return run("head", x)  # logits (N, H, W, 1)

    @property
    def encoders(self) -> list[EncoderBlock]:
        return [self.children[f"enc{level}"] for level in range(1, self.depth + 1)]

    @property
    def decoders(self) -> list[DecoderBlock]:
        """The decoder blocks in forward order: decoders[0] is the deepest (dec4 at depth 4)."""
        return [self.children[f"dec{level}"] for level in reversed(range(1, self.depth + 1))]

    # --- the parameters and buffers --------------------------------------------------------------

    def count_params(self) -> int:
        return sum(int(p.size) for p in self.params.values())

    def load_params(self, params, buffers=None) -> None:
        """Copy values into the model's arrays (names and shapes must match exactly); ``buffers``
        likewise for the state that is not trained (BatchNorm's moving statistics)."""
        if buffers is None and self.buffers:
            raise ValueError("this model has buffers (BatchNorm statistics) but none were given")
        for what, own, given in (("parameter", self.params, params), ("buffer", self.buffers, buffers or {})):
            if list(given) != list(own):
                raise ValueError(f"{what} names differ from this model's")
            for name, value in given.items():
                if tuple(value.shape) != own[name].shape:
                    raise ValueError(f"{name}: shape {tuple(value.shape)}, model has {own[name].shape}")
                own[name][...] = as_array(value, self.xp)

    def replica(self) -> UNet:
        """A UNet that shares this one's parameter and buffer arrays (so it sees every update) but keeps
        its own gradients, forward caches and dropout streams: one per thread in :mod:`tinyunet.parallel`.
        Its BatchNorm layers normalise with their own shard's statistics but leave the moving
        statistics to this model (shard 0), as PyTorch's DataParallel keeps device 0's."""
        twin = UNet(**self.config, dtype=self.dtype, gpu=self.xp is not np)
        if self.folded:  # the same layers as this one, before they share its arrays
            fold_batchnorm(twin)
        for (_, mine), (_, its) in zip(self.named_layers(), twin.named_layers()):
            its.params, its.buffers = mine.params, mine.buffers
            if isinstance(its, BatchNormalization):
                its.updates_moving = False
        return twin

    @property
    def dropouts(self) -> list[Dropout]:
        return self.layers_of(Dropout)

    def reseed_dropout(self, seed) -> None:
        """Restart every dropout layer's mask stream from ``seed`` (an int or a tuple of ints)."""
        seeds = np.random.SeedSequence(seed).spawn(len(self.dropouts))
        for layer, s in zip(self.dropouts, seeds):
            layer.reseed(int(s.generate_state(1)[0]))

    # --- forward and backward ------------------------------------------------------------------------

    def forward(self, x, train: bool = False):
        """Logits (N, H, W, 1) for images ``x`` (N, H, W, in_channels)."""
        n, h, w, c = x.shape
        step = 2 ** self.depth
        if h % step or w % step or c != self.config["in_channels"]:
            raise ValueError(f"UNet(depth={self.depth}, in_channels="
                             f"{self.config['in_channels']}) needs (N, H, W, "
                             f"{self.config['in_channels']}) with H and W divisible by {step}; "
                             f"got {x.shape} (resize or pad the images)")
        return super().forward(x, train=train)

    def backward(self, dlogits, input_grad: bool = True):
        """Fill :attr:`grads` from dL/dlogits (N, H, W, 1); return dL/dx: the wiring in reverse.

        Training passes ``input_grad=False``: the gradient for the images themselves is not needed,
        so the first convolution skips it and None is returned.
        """
        d = self.head.backward(dlogits)
        dskips = {}
        for level in range(1, self.depth + 1):  # dec1 (the shallowest) first, the reverse of forward
            d, dskips[level] = self.children[f"dec{level}"].backward(d)
        d = self.bridge.backward(d)
        for level in reversed(range(1, self.depth + 1)):  # deepest first, adding each skip's gradient
            d = self.children[f"enc{level}"].backward(d, dskips[level], input_grad or level > 1)
        return d

    def predict(self, x, batch_size: int = 32):
        """Probabilities (N, H, W, 1), computed ``batch_size`` images at a time without dropout."""
        return map_batches(lambda batch: sigmoid(self.forward(batch, train=False)), x, batch_size, self.xp, self.dtype)

    # --- study mode: every layer in forward order, and the Keras-style summary ------------------------

    def layer_table(self, input_size=(128, 128), batch_size: int = 1) -> list[dict]:
        """One row per layer from shapes alone (no forward pass): name, type, output shape,
        parameters, FLOPs (multiply-adds x 2) and activation memory (output values x itemsize).

        The first row is the input, the last the sigmoid that :meth:`predict` applies to the logits.
        """
        h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        step = 2 ** self.depth
        if h % step or w % step:
            raise ValueError(f"UNet(depth={self.depth}) needs H and W divisible by {step}; "
                             f"got {h}x{w}")
        rows = []

        def add(name, layer, *input_shapes):
            shape = tuple(layer.output_shape(*input_shapes)) if layer else input_shapes[0]
            rows.append({
                "name": name,
                "type": type(layer).__name__ if layer else "Input",
                "shape": shape,
                "params": sum(int(p.size) for p in layer.params.values()) if layer else 0,
                "flops": int(layer.flops(*input_shapes)) if layer else 0,
                "bytes": int(np.prod(shape)) * self.dtype.itemsize,
            })
            return shape

        x = add("input", None, (batch_size, h, w, self.config["in_channels"]))
        add("sigmoid", Sigmoid(), self.walk(add, x))
        return rows

    def summary(self, input_size=(128, 128), batch_size: int = 1) -> str:
        """A Keras-style table of every layer for ``batch_size`` images of ``input_size`` (an int
        or (H, W), divisible by 2**depth), with totals; from shapes alone, no forward pass."""
        rows = self.layer_table(input_size, batch_size)
        header = ("Layer (type)", "Output shape", "Params", "FLOPs", "Memory")
        table = [(f"{r['name']} ({r['type']})", str(r["shape"]), f"{r['params']:,}", f"{r['flops']:,}",
                  _kib(r["bytes"])) for r in rows]
        widths = [max(len(line[i]) for line in table + [header]) for i in range(5)]

        def line(cells):
            return "  ".join(c.ljust(wd) if i < 2 else c.rjust(wd)
                             for i, (c, wd) in enumerate(zip(cells, widths))).rstrip()

        rule = "=" * len(line(header))
        config = ", ".join(f"{k}={v}" for k, v in self.config.items())
        flops = sum(r["flops"] for r in rows)
        memory = sum(r["bytes"] for r in rows)
        h, w = rows[0]["shape"][1:3]
        return "\n".join([
            f"UNet({config}), {self.dtype.name}",
            rule, line(header), rule, *map(line, table), rule,
            f"Total params: {self.count_params():,}",
            f"Total FLOPs: {flops:,} ({flops / 1e9:.3g} GFLOPs) per forward of {batch_size} "
            f"image(s) of {h}x{w}: multiply-adds x 2 of the convs and up-convs",
            f"Activation memory: {_kib(memory)} (the sum of every layer's output, values x "
            f"{self.dtype.itemsize} bytes)",
            "forward returns the logits (head); predict applies the sigmoid",
        ])


def _kib(n_bytes: int) -> str:
    """A byte count as KiB or MiB, for the summary."""
    return f"{n_bytes / 2 ** 20:,.1f} MiB" if n_bytes >= 2 ** 20 else f"{n_bytes / 2 ** 10:,.1f} KiB"
