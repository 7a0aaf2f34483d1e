"""Study mode: look inside the U-Net. A layer-by-layer trace of one image, and three pictures.

From the command line::

    python -m tinyunet.inspect --model runs/RUN/best.npz --image train/images/<id>.png [--out DIR]

prints the model's summary (:meth:`UNet.summary`) and the trace of the image through every layer,
then writes three PNGs into DIR. From Python::

    acts = activations(model, image)               # name -> output array of every layer
    rows = trace(model, image, target)             # forward stats and (with a target) gradient norms
    print(format_trace(rows))
    feature_maps(model, image, ["enc1.relu2", "bridge.relu2"], "maps.png")
    first_layer_kernels(model, "kernels.png")
    skip_contribution(model, image, "skips.png")

``image`` is a 2-D (H, W) picture in [0, 1] as :func:`tinyunet.data.read_image` returns it; it is
fitted to the network as training fits it (:func:`tinyunet.pipeline.to_network`: ``fit`` "resize"
to ``input_size``, or "pad"). A 4-D (1, S, S', C) array is taken as a ready network input.

Nothing here changes the model's weights: the trace calls each layer's ``forward`` and ``backward`` itself, in
the order :meth:`UNet.walk` gives: the wiring :meth:`UNet.forward` runs, stated once in each block
(:mod:`tinyunet.blocks`), so the two cannot drift apart. Everything runs at inference (dropout off).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tinyunet.backend import as_array, as_numpy, get_array_module
from tinyunet.layers import Conv2D, sigmoid
from tinyunet.losses import binary_crossentropy
from tinyunet.pipeline import to_network
from tinyunet.transforms import resize

EXIT_USAGE = 2  # bad input a user can fix: a missing model or image, an unknown layer name
DEFAULT_LAYERS = ("enc1.relu2", "enc2.relu2", "bridge.relu2", "dec2.relu2", "dec1.relu2")


# --------------------------------------------------------------------------------------------
# Every layer's output, recorded on a tape
# --------------------------------------------------------------------------------------------

def network_input(model, image, fit: str = "resize", input_size: int = 128):
    """(1, S, S', C) on the model's device and dtype: a (H, W) image fitted as training fits it,
    or a 4-D network input passed through."""
    image = as_array(image, model.xp).astype(model.dtype, copy=False)
    if image.ndim == 4:
        return image
    if image.ndim != 2:
        raise ValueError(f"expected an (H, W) image or an (N, H, W, C) network input, got shape {image.shape}")
    x, _ = to_network(image[None], fit, input_size, model.config["depth"])  # (1, S, S', 1)
    return x


def _record(model, x):
    """Run ``x`` through every layer (inference), keeping each output.

    Returns ``(values, tape)``: ``values`` maps "input", every layer name of :meth:`UNet.walk`,
    and "sigmoid" to its output; ``tape`` lists ``(name, layer, input names)`` in forward order.
    The node names flow through the walk instead of arrays, so the tape knows who fed whom.
    """
    values = {"input": x}
    tape = []

    def visit(name, layer, *inputs):
        values[name] = layer.forward(*(values[i] for i in inputs), train=False)
        tape.append((name, layer, inputs))
        return name

    head = model.walk(visit, "input")
    values["sigmoid"] = sigmoid(values[head])
    return values, tape


def activations(model, image, fit: str = "resize", input_size: int = 128) -> dict:
    """name -> output array (1, H, W, C) of every layer for one image: "input", "enc1.conv1",
    "enc1.relu1", ..., "head" (the logits), "sigmoid" (the probabilities)."""
    values, _ = _record(model, network_input(model, image, fit, input_size))
    return values


# --------------------------------------------------------------------------------------------
# The trace: statistics forward, gradient norms backward
# --------------------------------------------------------------------------------------------

@dataclass
class LayerTrace:
    """One layer's output for one image, and with a target its gradients."""

    name: str  # "input", "enc1.conv1", ..., "head" (logits), "sigmoid" (probabilities)
    kind: str  # the layer's class, e.g. "Conv2D"
    shape: tuple  # output shape (N, H, W, C)
    min: float
    mean: float
    max: float
    std: float
    zeros: float  # fraction of the output that is exactly 0 (after a ReLU: units silent here)
    params: int  # parameter count
    grad_out: float | None = None  # ||dL/d output||_2 (with a target; None for "sigmoid")
    grad_params: dict = field(default_factory=dict)  # "W", "b" -> ||dL/dW||_2, ||dL/db||_2


class Trace(list):
    """A list of :class:`LayerTrace` in forward order, with the image's ``loss`` (None without a
    target) and its ``logits`` (1, S, S', 1)."""

    loss: float | None = None
    logits = None


def _stats(name: str, kind: str, value, params: int) -> LayerTrace:
    v = value.astype("float64")  # exact means for float32 activations
    return LayerTrace(name=name, kind=kind, shape=tuple(value.shape), min=float(v.min()), mean=float(v.mean()),
                      max=float(v.max()), std=float(v.std()), zeros=float((value == 0).mean()), params=params)


def _norm(a) -> float:
    return float(math.sqrt(float((a.astype("float64") ** 2).sum())))


def trace(model, image, target=None, *, fit: str = "resize", input_size: int = 128) -> Trace:
    """One image through the network, layer by layer; with a ``target`` mask also backward.

    Forward: every layer's output shape and min / mean / max / std / fraction of zeros. Backward
    (``target`` (H, W) in {0, 1}, fitted like the image; or 4-D as the network sees it): the binary
    cross-entropy of the logits, the norm of dL/d(output) of every layer, and of dL/dW, dL/db of
    every layer with parameters. The backward pass calls each layer's ``backward`` in reverse tape
    order and adds the gradients of a tensor used twice (a skip: to the pool and to the decoder),
    as :meth:`UNet.backward` does.

    Like any forward and backward, it overwrites the layers' caches and ``grads`` (not the weights).
    """
    x = network_input(model, image, fit, input_size)
    values, tape = _record(model, x)
    logits = values[tape[-1][0]]
    rows = Trace([_stats("input", "Input", x, 0)])
    for name, layer, _ in tape:
        rows.append(_stats(name, type(layer).__name__, values[name],
                           sum(int(p.size) for p in layer.params.values())))
    rows.append(_stats("sigmoid", "Sigmoid", values["sigmoid"], 0))
    rows.logits = logits

    if target is not None:
        y = network_input(model, target, fit, input_size)
        loss, dlogits = binary_crossentropy(logits, y)
        rows.loss = float(loss)
        by_name = {row.name: row for row in rows}
        grads = {tape[-1][0]: dlogits}  # node name -> dL/d(its output), summed over its consumers
        for name, layer, inputs in reversed(tape):
            dout = grads.pop(name)  # complete: every consumer comes later on the tape
            by_name[name].grad_out = _norm(dout)
            dins = layer.backward(dout)
            by_name[name].grad_params = {key: _norm(g) for key, g in layer.grads.items()}
            for src, d in zip(inputs, dins if isinstance(dins, tuple) else (dins,)):
                grads[src] = grads[src] + d if src in grads else d
        by_name["input"].grad_out = _norm(grads.pop("input"))
    return rows


def format_trace(rows: Sequence[LayerTrace]) -> str:
    """The trace as a table: one line per layer, gradient columns when there was a target."""
    backward = any(row.grad_out is not None for row in rows)
    header = ["Layer", "Output shape", "min", "mean", "max", "zeros"]
    if backward:
        header += ["|dL/dout|", "|dL/dW|", "|dL/db|"]
    table = []
    for row in rows:
        cells = [f"{row.name} ({row.kind})", str(row.shape), f"{row.min:.4g}", f"{row.mean:.4g}",
                 f"{row.max:.4g}", f"{100 * row.zeros:.1f}%"]
        if backward:
            cells += ["" if row.grad_out is None else f"{row.grad_out:.3e}",
                      f"{row.grad_params['W']:.3e}" if "W" in row.grad_params else "",
                      f"{row.grad_params['b']:.3e}" if "b" in row.grad_params else ""]
        table.append(cells)
    widths = [max(len(line[i]) for line in table + [header]) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(header), "-" * len(line(header)), *map(line, table)]
    loss = getattr(rows, "loss", None)
    if loss is not None:
        out.append(f"binary cross-entropy of this image: {loss:.6f}")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# The skip connections' share of each decoder's first convolution
# --------------------------------------------------------------------------------------------

def _partial_conv(conv: Conv2D, x, channels: slice):
    """The response of ``conv`` to the input channels ``channels`` alone (``x`` holds just those),
    without the bias: a conv is linear, so the partial responses of [upsampled, skip] add up to
    the full output minus the bias."""
    xp = get_array_module(x)
    W = conv.params["W"]  # (KH, KW, C, F)
    part = Conv2D(1, 1, conv.kernel_size[0], dtype=W.dtype, xp=xp)  # its own weights replaced below
    part.params = {"W": xp.ascontiguousarray(W[:, :, channels]), "b": xp.zeros(W.shape[3], W.dtype)}
    return part.forward(x)


def skip_shares(model, image, fit: str = "resize", input_size: int = 128,
                values: dict | None = None) -> list[dict]:
    """For each decoder level, deepest first: how much of its first conv's response comes from
    the upsampled channels and how much from the skip.

    The first conv of ``decL`` reads ``[up, skip]`` (2F channels); its weights split into the half
    acting on ``up`` and the half acting on ``skip``, and by linearity
    ``conv1(joined) = conv(up, W_up) + conv(skip, W_skip) + b``. Returns dicts with ``level``,
    ``up`` and ``skip`` (the two partial responses, (H, W, F) NumPy), ``norm_up``, ``norm_skip``
    (their L2 norms) and ``share`` = norm_skip / (norm_up + norm_skip).
    """
    values = values if values is not None else activations(model, image, fit, input_size)
    out = []
    depth = len(model.decoders)
    for decoder, level in zip(model.decoders, reversed(range(1, depth + 1))):
        up, skip = values[f"dec{level}.up"], values[f"enc{level}.relu2"]
        f = up.shape[3]
        conv = decoder.convs.conv1
        from_up = _partial_conv(conv, up, slice(0, f))
        from_skip = _partial_conv(conv, skip, slice(f, 2 * f))
        total = values[f"dec{level}.conv1"]
        bias = conv.params.get("b", 0)  # none where a BatchNormalization follows
        if not get_array_module(total).allclose(from_up + from_skip + bias, total, rtol=1e-3, atol=1e-4):
            raise AssertionError(f"dec{level}: the two partial responses do not add up to conv1's output")
        norm_up, norm_skip = _norm(from_up), _norm(from_skip)
        out.append({"level": level, "up": as_numpy(from_up[0]), "skip": as_numpy(from_skip[0]),
                    "norm_up": norm_up, "norm_skip": norm_skip,
                    "share": norm_skip / (norm_up + norm_skip) if norm_up + norm_skip else float("nan")})
    return out


# --------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------

def _figure(width: float, height: float, dpi: int):
    """A matplotlib Figure on the Agg canvas (no pyplot, no window), as tinyunet.plots draws them."""
    from matplotlib.figure import Figure  # heavy: imported only when a picture is drawn

    return Figure(figsize=(width, height), dpi=dpi, layout="constrained")


def _save(fig, out_png) -> Path:
    from tinyunet.plots import _save as save

    return save(fig, out_png)


def _off(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def feature_maps(model, image, layer_names: Sequence[str], out_png, *, fit: str = "resize",
                 input_size: int = 128, max_channels: int = 16, columns: int = 8, dpi: int = 100) -> Path:
    """A grid per layer: its output channels for one image as tiles, each tile scaled to its own
    min..max (viridis: dark = low). Layers with more than ``max_channels`` channels show the
    ``max_channels`` with the largest mean activation; tiles are labelled with the channel number,
    and a channel that is constant over the image (a silent ReLU) says so.
    """
    values = activations(model, image, fit, input_size)
    unknown = [name for name in layer_names if name not in values]
    if unknown:
        raise ValueError(f"unknown layer {unknown[0]!r}; layers are: {', '.join(values)}")
    picks = []
    for name in layer_names:
        maps = as_numpy(values[name][0]).astype(np.float64)  # (H, W, C)
        c = maps.shape[2]
        order = np.argsort(-maps.mean(axis=(0, 1)), kind="stable")[:max_channels]
        picks.append((name, maps, order if c > max_channels else np.arange(c)))
    grid_rows = [math.ceil(len(order) / columns) for _, _, order in picks]
    fig = _figure(1.25 * columns, sum(1.45 * r + 0.45 for r in grid_rows), dpi)
    subfigs = fig.subfigures(len(picks), 1, height_ratios=[1.45 * r + 0.45 for r in grid_rows], squeeze=False)
    for sub, (name, maps, order), n_rows in zip(subfigs[:, 0], picks, grid_rows):
        h, w, c = maps.shape
        silent = int(sum(np.ptp(maps[..., k]) == 0 for k in range(c)))
        shown = f"all {c} channels" if len(order) == c else f"the {len(order)} most active of {c} channels"
        sub.suptitle(f"{name}: {h}x{w}x{c}, {shown}; {silent} constant over this image",
                     fontsize=10, x=0.01, ha="left")
        axes = sub.subplots(n_rows, columns, squeeze=False)
        for ax in axes.flat:
            ax.set_axis_off()
        for ax, k in zip(axes.flat, order):
            tile = maps[..., k]
            flat = np.ptp(tile) == 0
            ax.imshow(tile, cmap="gray" if flat else "viridis", vmin=tile.min() - flat, vmax=tile.max() + flat,
                      interpolation="nearest")
            ax.set_axis_on()
            _off(ax)
            label = f"c{k}" + (f" = {tile.max():.2g}" if flat else f" [{tile.min():.2g}, {tile.max():.2g}]")
            ax.set_title(label, fontsize=8, pad=2)
    return _save(fig, out_png)


def first_layer_kernels(model, out_png, *, dpi: int = 100) -> Path:
    """The first convolution's learned kernels, one tile per filter (and input channel), each
    weight printed in its cell; one colour scale for all (red > 0 > blue); the bias under each."""
    W = as_numpy(model.encoders[0].convs.conv1.params["W"]).astype(np.float64)  # (KH, KW, C, F)
    b = as_numpy(model.encoders[0].convs.conv1.params.get("b", np.zeros(W.shape[3]))).astype(np.float64)
    kh, kw, c, f = W.shape
    columns = min(f, 8)
    rows = c * math.ceil(f / columns)
    fig = _figure(1.6 * columns + 0.8, 1.9 * rows + 0.7, dpi)
    axes = fig.subplots(rows, columns, squeeze=False)
    vmax = float(np.abs(W).max()) or 1.0
    image = None
    for ax in axes.flat:
        ax.set_axis_off()
    for ci in range(c):
        for fi in range(f):
            ax = axes[ci * math.ceil(f / columns) + fi // columns, fi % columns]
            ax.set_axis_on()
            image = ax.imshow(W[:, :, ci, fi], cmap="RdBu_r", vmin=-vmax, vmax=vmax)
            for i in range(kh):
                for j in range(kw):
                    dark = abs(W[i, j, ci, fi]) > 0.6 * vmax  # white text on the deep colours
                    ax.text(j, i, f"{W[i, j, ci, fi]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")
            _off(ax)
            ax.set_title(f"filter {fi}" + (f", input {ci}" if c > 1 else ""), fontsize=9)
            ax.set_xlabel(f"b = {b[fi]:.3f}\nsum = {W[:, :, ci, fi].sum():.2f}", fontsize=8)
    fig.suptitle(f"enc1.conv1: {f} kernels of {kh}x{kw} over {c} input channel(s), weight W[i, j, c, f] "
                 f"(row i, column j)", fontsize=10)
    fig.colorbar(image, ax=axes, shrink=0.8, label="weight")
    return _save(fig, out_png)


def skip_contribution(model, image, out_png, *, fit: str = "resize", input_size: int = 128,
                      dpi: int = 100) -> Path:
    """For each decoder level (a row): the input image, the per-pixel size ||.||_2 over channels of
    the first conv's response to the upsampled channels and to the skip channels (one colour scale
    per row), and the skip's share of the two per pixel."""
    values = activations(model, image, fit, input_size)
    shares = skip_shares(model, image, values=values)
    picture = as_numpy(values["input"][0, ..., 0])
    fig = _figure(10.5, 2.5 * len(shares) + 0.6, dpi)
    axes = fig.subplots(len(shares), 4, squeeze=False)
    titles = ["input, resized to the level", "response to the upsampled\nchannels (from below)",
              "response to the skip\nchannels (from the encoder)", "skip share per pixel"]
    for row, s in zip(axes, shares):
        level = s["level"]
        up, skip = np.linalg.norm(s["up"], axis=2), np.linalg.norm(s["skip"], axis=2)  # (H, W)
        top = max(float(up.max()), float(skip.max()), 1e-12)
        small = resize(picture[None], up.shape)[0]  # what this level's resolution keeps of the image
        row[0].imshow(small, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        im = None
        for ax, m in ((row[1], up), (row[2], skip)):
            im = ax.imshow(m, cmap="magma", vmin=0, vmax=top, interpolation="nearest")
        fig.colorbar(im, ax=row[1:3], shrink=0.85, label="L2 norm over channels")
        share = skip / np.maximum(up + skip, 1e-12)
        sh = row[3].imshow(share, cmap="coolwarm", vmin=0, vmax=1, interpolation="nearest")
        fig.colorbar(sh, ax=row[3], shrink=0.85, label="skip / (up + skip)")
        for ax, title in zip(row, titles):
            _off(ax)
            ax.set_title(title if level == shares[0]["level"] else "", fontsize=9)
        f = s["up"].shape[2]
        row[0].set_ylabel(f"dec{level}.conv1\n{up.shape[0]}x{up.shape[1]}, {f} up + {f} skip ch", fontsize=9)
        row[1].set_xlabel(f"||up part|| = {s['norm_up']:.3g}", fontsize=9)
        row[2].set_xlabel(f"||skip part|| = {s['norm_skip']:.3g}", fontsize=9)
        row[3].set_xlabel(f"overall skip share {100 * s['share']:.0f}%", fontsize=9)
    fig.suptitle("Where each decoder's first conv gets its response: conv1([up, skip]) = "
                 "conv(up, W[:, :, :F]) + conv(skip, W[:, :, F:]) + b", fontsize=10)
    return _save(fig, out_png)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line and exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {message} (see python -m tinyunet.inspect --help)\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _Parser(prog="python -m tinyunet.inspect", allow_abbrev=False,
                     description="Look inside the U-Net: print its summary and the trace of one image "
                                 "through every layer, and draw feature maps, the first layer's kernels and "
                                 "the skip connections' share of each decoder level (PNG).")
    parser.add_argument("--model", help="checkpoint (a run's best.npz); default: an untrained seed model")
    parser.add_argument("--image", required=True, help="a PNG image (e.g. train/images/<id>.png)")
    parser.add_argument("--mask", help="its mask PNG, for the backward pass (default: ../masks/<same name> "
                        "beside an images/ folder, when present; else forward only)")
    parser.add_argument("--out", default="inspect", help="folder for the PNGs (default: ./inspect)")
    parser.add_argument("--layers", help="comma-separated layers for the feature maps, named as in the summary "
                        f"(e.g. enc1.conv2, dec1.relu2; default: {', '.join(DEFAULT_LAYERS)}, those the model has)")
    parser.add_argument("--features", type=int, default=8, help="untrained model only: top-level filters (default: 8)")
    parser.add_argument("--depth", type=int, default=4, help="untrained model only: levels (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="untrained model only: weight seed (default: 0)")
    parser.add_argument("--input-size", type=int, help="untrained model only: network input side for 'resize' "
                        "(default: 128); a checkpoint uses its own")
    return parser.parse_args(argv)


def _load_model(args):
    """(model, fit, input_size, description) from --model, or the untrained seed model."""
    from tinyunet.ensemble import Ensemble
    from tinyunet.models import load_model
    from tinyunet.unet import UNet

    if args.model is None:
        model = UNet(features=args.features, depth=args.depth, seed=args.seed)  # dropout: inactive at inference
        return model, "resize", args.input_size or 128, (
            f"untrained seed model (no --model given): UNet features={args.features} depth={args.depth} "
            f"seed={args.seed}")
    model, ckpt = load_model(args.model)
    if isinstance(model, Ensemble):
        raise ValueError(f"{args.model} is an ensemble of {len(model.members)} models; study mode looks inside one: "
                         "pass one member's checkpoint (a snapshot<k>.npz or a fold's best.npz)")
    epoch = ckpt.meta.get("epoch")
    text = f"{args.model}" + (f" (epoch {epoch})" if epoch is not None else "")
    return model, ckpt.meta["fit"], ckpt.meta.get("input_size", 128), text


def _mask_path(args) -> Path | None:
    if args.mask:
        return Path(args.mask)
    image = Path(args.image)
    if image.parent.name == "images":
        sibling = image.parent.parent / "masks" / image.name
        if sibling.is_file():
            return sibling
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tinyunet.checkpoint import CheckpointError
    from tinyunet.data import DataError, read_image, read_mask

    try:
        model, fit, input_size, described = _load_model(args)
        if not Path(args.image).is_file():
            raise DataError(f"image {args.image} does not exist or is not a file")
        image = read_image(args.image)
        mask_path = _mask_path(args)
        mask = read_mask(mask_path) if mask_path is not None else None
        known = activations(model, image, fit, input_size)
        if args.layers is None:
            layers = [name for name in DEFAULT_LAYERS if name in known]
        else:
            layers = [name.strip() for name in args.layers.split(",") if name.strip()]
        unknown = [name for name in layers if name not in known]
        if unknown:
            raise ValueError(f"unknown layer {unknown[0]!r} in --layers; layers are: {', '.join(known)}")
    except (CheckpointError, DataError, ValueError, OSError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return EXIT_USAGE

    size = tuple(known["input"].shape[1:3])
    print(f"model: {described}")
    print(f"image: {args.image} {image.shape[0]}x{image.shape[1]} -> network input {size[0]}x{size[1]} ({fit})")
    print(f"target: {mask_path}" if mask is not None else "target: none (forward only; give --mask for gradients)")
    print()
    print(model.summary(input_size=size))
    print()
    print(format_trace(trace(model, image, mask, fit=fit, input_size=input_size)))
    print()
    out = Path(args.out)
    for path in (feature_maps(model, image, layers, out / "feature_maps.png", fit=fit, input_size=input_size),
                 first_layer_kernels(model, out / "first_layer_kernels.png"),
                 skip_contribution(model, image, out / "skip_contribution.png", fit=fit, input_size=input_size)):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
