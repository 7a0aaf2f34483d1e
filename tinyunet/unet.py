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

from tinyunet.backend import as_array, get_backend
from tinyunet.layers import Concatenate, Conv2D, Conv2DTranspose, Dropout, MaxPooling2D, ReLU, sigmoid
from tinyunet.layers import Sigmoid  # study mode: the summary's last row


class DoubleConv:
    """conv3x3 -> ReLU -> conv3x3 -> ReLU: the two convolutions at every level."""

    def __init__(self, c_in: int, c_out: int, rng, dtype, xp):
        self.conv1 = Conv2D(c_in, c_out, 3, rng=rng, dtype=dtype, xp=xp)
        self.relu1 = ReLU()
        self.conv2 = Conv2D(c_out, c_out, 3, rng=rng, dtype=dtype, xp=xp)
        self.relu2 = ReLU()
        self.layers = [self.conv1, self.relu1, self.conv2, self.relu2]

    def named_layers(self):
        return [("conv1", self.conv1), ("conv2", self.conv2)]

    def forward(self, x, train: bool = False):
        for layer in self.layers:
            x = layer.forward(x, train=train)
        return x

    def backward(self, dout, input_grad: bool = True):
        for layer in reversed(self.layers[1:]):
            dout = layer.backward(dout)
        return self.conv1.backward(dout, input_grad=input_grad)

    def named_steps(self):
        """(name, layer) for all four layers in forward order, ReLUs included (study mode)."""
        return list(zip(("conv1", "relu1", "conv2", "relu2"), self.layers))


class EncoderBlock:
    """Two convs, then max-pool and dropout. Returns (to the level below, skip to the decoder)."""

    def __init__(self, c_in: int, c_out: int, rate: float, rng, dtype, xp):
        self.convs = DoubleConv(c_in, c_out, rng, dtype, xp)
        self.pool = MaxPooling2D(2)
        self.dropout = Dropout(rate, xp=xp)

    def named_layers(self):
        return self.convs.named_layers()

    def forward(self, x, train: bool = False):
        skip = self.convs.forward(x, train)  # (N, H, W, F)
        down = self.dropout.forward(self.pool.forward(skip), train)  # (N, H/2, W/2, F)
        return down, skip

    def backward(self, ddown, dskip, input_grad: bool = True):
        dconv_out = self.pool.backward(self.dropout.backward(ddown)) + dskip  # both paths meet
        return self.convs.backward(dconv_out, input_grad)


class DecoderBlock:
    """Up-conv 2x2 stride 2, concat [upsampled, skip], dropout, two convs."""

    def __init__(self, c_in: int, c_out: int, rate: float, rng, dtype, xp):
        self.up = Conv2DTranspose(c_in, c_out, 2, 2, rng=rng, dtype=dtype, xp=xp)
        self.concat = Concatenate()
        self.dropout = Dropout(rate, xp=xp)
        self.convs = DoubleConv(2 * c_out, c_out, rng, dtype, xp)

    def named_layers(self):
        return [("up", self.up)] + self.convs.named_layers()

    def forward(self, x, skip, train: bool = False):
        up = self.up.forward(x, train)  # (N, 2H, 2W, F)
        joined = self.dropout.forward(self.concat.forward(up, skip), train)  # (N, 2H, 2W, 2F)
        return self.convs.forward(joined, train)  # (N, 2H, 2W, F)

    def backward(self, dout):
        dup, dskip = self.concat.backward(self.dropout.backward(self.convs.backward(dout)))
        return self.up.backward(dup), dskip


class UNet:
    """The seed U-Net: ``depth`` levels down and up, ``features`` filters at the top level,
    doubling per level down. 485,673 parameters at features=8, depth=4.

    ``forward(x, train)`` maps images (N, H, W, in_channels) to logits (N, H, W, 1); H and W must
    be divisible by 2**depth. ``predict(x)`` gives probabilities. ``backward(dlogits)`` fills
    ``grads`` and returns dL/dx. ``params`` and ``grads`` are ordered name -> array mappings in
    forward order (first encoder conv first, head last), sharing the layers' own arrays.
    """

    def __init__(self, features: int = 8, depth: int = 4,
                 dropout: Sequence[float] = (0.25, 0.3, 0.4, 0.5), in_channels: int = 1,
                 seed: int = 0, dtype=np.float32, gpu: bool = False):
        if depth < 1 or features < 1:
            raise ValueError(f"UNet needs depth >= 1 and features >= 1, got depth={depth}, "
                             f"features={features}")
        dropout = tuple(dropout)
        if len(dropout) != depth:
            raise ValueError(f"UNet needs one dropout rate per level: depth={depth}, got {dropout}")
        self.config = {"features": features, "depth": depth, "dropout": list(dropout),
                       "in_channels": in_channels}
        self.xp = xp = get_backend(gpu)
        self.dtype = np.dtype(dtype)
        rng = np.random.default_rng(seed)  # initial weights: drawn on the host, same on any device
        widths = [features * 2 ** level for level in range(depth + 1)]  # e.g. 8, 16, 32, 64, 128
        self.encoders = [EncoderBlock(c_in, c_out, rate, rng, dtype, xp)
                         for c_in, c_out, rate in zip([in_channels] + widths[:-2], widths, dropout)]
        self.bridge = DoubleConv(widths[-2], widths[-1], rng, dtype, xp)
        # decoders[0] is the deepest: it takes the bridge's output and the last encoder's skip
        self.decoders = [DecoderBlock(widths[level + 1], widths[level], dropout[level], rng, dtype, xp)
                         for level in reversed(range(depth))]
        self.head = Conv2D(features, 1, 1, rng=rng, dtype=dtype, xp=xp)
        self.reseed_dropout(seed)

    # --- the parameters, in forward order ---------------------------------------------------------

    def named_layers(self):
        """(name, layer) for every layer with parameters, in forward order."""
        named = []
        for level, block in enumerate(self.encoders, start=1):
            named += [(f"enc{level}.{name}", layer) for name, layer in block.named_layers()]
        named += [(f"bridge.{name}", layer) for name, layer in self.bridge.named_layers()]
        for block, level in zip(self.decoders, reversed(range(1, len(self.decoders) + 1))):
            named += [(f"dec{level}.{name}", layer) for name, layer in block.named_layers()]
        return named + [("head", self.head)]

    @property
    def params(self) -> dict:
        """name -> parameter array, e.g. ``"enc1.conv1.W"``; the layers' own arrays, not copies."""
        return {f"{name}.{key}": value for name, layer in self.named_layers()
                for key, value in layer.params.items()}

    @property
    def grads(self) -> dict:
        """name -> gradient array from the last :meth:`backward`, same keys as :attr:`params`."""
        return {f"{name}.{key}": value for name, layer in self.named_layers()
                for key, value in layer.grads.items()}

    def count_params(self) -> int:
        return sum(int(p.size) for p in self.params.values())

    def load_params(self, params) -> None:
        """Copy values into the model's arrays (names and shapes must match exactly)."""
        own = self.params
        if list(params) != list(own):
            raise ValueError("parameter names differ from this model's")
        for name, value in params.items():
            if tuple(value.shape) != own[name].shape:
                raise ValueError(f"{name}: shape {tuple(value.shape)}, model has {own[name].shape}")
            own[name][...] = as_array(value, self.xp)

    def replica(self) -> UNet:
        """A UNet that shares this one's parameter arrays (so it sees every update) but keeps its own
        gradients, forward caches and dropout streams: one per thread in :mod:`tinyunet.parallel`."""
        twin = UNet(**self.config, dtype=self.dtype, gpu=self.xp is not np)
        for (_, mine), (_, its) in zip(self.named_layers(), twin.named_layers()):
            its.params = mine.params
        return twin

    @property
    def dropouts(self) -> list[Dropout]:
        return [block.dropout for block in self.encoders + self.decoders]

    def reseed_dropout(self, seed) -> None:
        """Restart every dropout layer's mask stream from ``seed`` (an int or a tuple of ints)."""
        seeds = np.random.SeedSequence(seed).spawn(len(self.dropouts))
        for layer, s in zip(self.dropouts, seeds):
            layer.reseed(int(s.generate_state(1)[0]))

    # --- forward and backward ------------------------------------------------------------------------

    def forward(self, x, train: bool = False):
        """Logits (N, H, W, 1) for images ``x`` (N, H, W, in_channels)."""
        n, h, w, c = x.shape
        step = 2 ** len(self.encoders)
        if h % step or w % step or c != self.config["in_channels"]:
            raise ValueError(f"UNet(depth={len(self.encoders)}, in_channels="
                             f"{self.config['in_channels']}) needs (N, H, W, "
                             f"{self.config['in_channels']}) with H and W divisible by {step}; "
                             f"got {x.shape} (resize or pad the images)")
        skips = []
        for encoder in self.encoders:  # x1 ... x4, each kept for its decoder
            x, skip = encoder.forward(x, train)
            skips.append(skip)
        x = self.bridge.forward(x, train)
        for decoder, skip in zip(self.decoders, reversed(skips)):
            x = decoder.forward(x, skip, train)
        return self.head.forward(x, train)

    def backward(self, dlogits, input_grad: bool = True):
        """Fill :attr:`grads` from dL/dlogits (N, H, W, 1); return dL/dx.

        Training passes ``input_grad=False``: the gradient for the images themselves is not needed,
        so the first convolution skips it and None is returned.
        """
        d = self.head.backward(dlogits)
        dskips = []
        for decoder in reversed(self.decoders):  # shallowest first, the reverse of forward
            d, dskip = decoder.backward(d)
            dskips.append(dskip)  # dskips[0] belongs to enc1
        d = self.bridge.backward(d)
        for encoder, dskip in zip(reversed(self.encoders), reversed(dskips)):  # deepest first
            d = encoder.backward(d, dskip, input_grad or encoder is not self.encoders[0])
        return d

    def predict(self, x, batch_size: int = 32):
        """Probabilities (N, H, W, 1), computed ``batch_size`` images at a time without dropout."""
        xp = self.xp
        out = xp.empty(x.shape[:3] + (1,), dtype=self.dtype)
        for start in range(0, x.shape[0], batch_size):
            batch = as_array(x[start:start + batch_size], xp).astype(self.dtype, copy=False)
            out[start:start + batch_size] = sigmoid(self.forward(batch, train=False))
        return out

    # --- study mode: every layer in forward order, and the Keras-style summary ------------------------

    def walk(self, x, visit):
        """Thread ``x`` through ``visit(name, layer, *inputs) -> output`` for every layer, in the
        order and with the wiring of :meth:`forward`; returns the head's output.

        The layers are not called here: ``visit`` decides what flows. :meth:`summary` passes shapes
        and calls ``layer.output_shape``; ``tinyunet.inspect.trace`` passes arrays and calls
        ``layer.forward``, recording each output. Names are ``enc1.conv1``, ``enc1.relu1``, ...,
        ``enc1.pool``, ``enc1.dropout``, ``bridge.conv1``, ..., ``dec4.up``, ``dec4.concat``,
        ``dec4.dropout``, ``dec4.conv1``, ..., ``head``.
        """
        skips = []
        for level, encoder in enumerate(self.encoders, start=1):  # x1 ... x4, each kept
            for name, layer in encoder.convs.named_steps():
                x = visit(f"enc{level}.{name}", layer, x)
            skips.append(x)
            x = visit(f"enc{level}.pool", encoder.pool, x)
            x = visit(f"enc{level}.dropout", encoder.dropout, x)
        for name, layer in self.bridge.named_steps():
            x = visit(f"bridge.{name}", layer, x)
        levels = reversed(range(1, len(self.decoders) + 1))  # dec4 (deepest) ... dec1
        for decoder, skip, level in zip(self.decoders, reversed(skips), levels):
            x = visit(f"dec{level}.up", decoder.up, x)
            x = visit(f"dec{level}.concat", decoder.concat, x, skip)  # [upsampled, skip]
            x = visit(f"dec{level}.dropout", decoder.dropout, x)
            for name, layer in decoder.convs.named_steps():
                x = visit(f"dec{level}.{name}", layer, x)
        return visit("head", self.head, x)

    def layer_table(self, input_size=(128, 128), batch_size: int = 1) -> list[dict]:
        """One row per layer from shapes alone (no forward pass): name, type, output shape,
        parameters, FLOPs (multiply-adds x 2) and activation memory (output values x itemsize).

        The first row is the input, the last the sigmoid that :meth:`predict` applies to the logits.
        """
        h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        step = 2 ** len(self.encoders)
        if h % step or w % step:
            raise ValueError(f"UNet(depth={len(self.encoders)}) needs H and W divisible by {step}; "
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
        add("sigmoid", Sigmoid(), self.walk(x, add))
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
