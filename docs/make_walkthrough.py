"""Regenerate docs/walkthrough.md and its pictures: one real image from PNG to RLE string.

    python docs/make_walkthrough.py                 # runs/latest's best.npz, an image it never trained on
    python docs/make_walkthrough.py --model runs/study/best.npz --data /path/to/tgs-salt --image-id a266a2a9df
    python docs/make_walkthrough.py --relink        # only re-point the code links at their lines

Every number in the walkthrough is computed here, by the package's own functions, and every code link
is found by a text anchor (so a link points at the line that holds it; the anchor is the link's
title). Prose lives here too, so numbers and words cannot drift apart: edit this file, not the .md.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "walkthrough.md"
IMAGES = ROOT / "docs" / "images"
DPI = 80  # the pictures' resolution: legible, and each under 300 KB
LINK = re.compile(r"\]\(\.\./(?P<path>[^)#\s]+)#L(?P<line>\d+) \"(?P<anchor>[^\"]+)\"\)")


# --------------------------------------------------------------------------------------------
# Code links: found by an anchor text, checked to be unique
# --------------------------------------------------------------------------------------------

def line_of(path: str, anchor: str) -> int:
    lines = (ROOT / path).read_text().splitlines()
    hits = [i for i, line in enumerate(lines, start=1) if anchor in line]
    if len(hits) != 1:
        raise SystemExit(f"error: anchor {anchor!r} occurs {len(hits)} times in {path}; "
                         "update the anchor in docs/make_walkthrough.py")
    return hits[0]


def link(label: str, path: str, anchor: str) -> str:
    """A Markdown link to the line of ``path`` that holds ``anchor`` (the anchor is the title)."""
    return f'[{label}](../{path}#L{line_of(path, anchor)} "{anchor}")'


def relink(text: str) -> str:
    """``text`` with every code link's line number recomputed from its anchor."""
    return LINK.sub(lambda m: f'](../{m["path"]}#L{line_of(m["path"], m["anchor"])} "{m["anchor"]}")', text)


# --------------------------------------------------------------------------------------------
# Helpers for numbers and tables
# --------------------------------------------------------------------------------------------

def g(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}g}"


def shape(a) -> str:
    return "(" + ", ".join(str(d) for d in a.shape) + ")"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# The pictures of the path itself
# --------------------------------------------------------------------------------------------

def check_size(png: Path, limit: int = 300_000) -> Path:
    """The docs keep each picture under 300 KB: a larger one is stored with a 256-colour palette
    (near-lossless for a picture in one colour map), and refused if that is not enough."""
    if png.stat().st_size >= limit:
        from PIL import Image

        with Image.open(png) as img:
            small = img.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        small.save(png, optimize=True)
    if png.stat().st_size >= limit:
        raise SystemExit(f"error: {png} is {png.stat().st_size:,} bytes, over {limit:,}: draw it smaller")
    return png


def steps_picture(raw, x, logits, probs128, probs101, pred, truth, threshold, out_png):
    from tinyunet.inspect import _figure, _save

    fig = _figure(13.5, 2.9, DPI)
    axes = fig.subplots(1, 6)
    panels = [
        (raw, "gray", 0, 1, f"1. PNG -> [0, 1]\n{raw.shape[0]}x{raw.shape[1]}"),
        (x, "gray", 0, 1, f"2. resized\n{x.shape[0]}x{x.shape[1]} (network input)"),
        (logits, "RdBu_r", -np.abs(logits).max(), np.abs(logits).max(),
         f"3. logits (head)\n{logits.shape[0]}x{logits.shape[1]}, red > 0"),
        (probs128, "viridis", 0, 1, f"4. sigmoid\n{probs128.shape[0]}x{probs128.shape[1]}"),
        (probs101, "viridis", 0, 1, f"5. resized back\n{probs101.shape[0]}x{probs101.shape[1]}"),
    ]
    for ax, (img, cmap, lo, hi, title) in zip(axes, panels):
        ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(title, fontsize=9)
    overlay = np.zeros(pred.shape + (3,))
    overlay[pred & truth] = (1, 1, 1)  # white: both
    overlay[pred & ~truth] = (1, 0.3, 0.1)  # orange: predicted only
    overlay[~pred & truth] = (0.2, 0.5, 1)  # blue: missed
    axes[5].imshow(overlay, interpolation="nearest")
    axes[5].set_title(f"6. p > {threshold:.3f} vs truth\n{pred.shape[0]}x{pred.shape[1]} bool", fontsize=9)
    axes[5].set_xlabel("white: both, orange: predicted\nonly, blue: missed", fontsize=8)
    for ax, img in zip(axes[2:5], (logits, probs128, probs101)):
        ax.set_xlabel(f"{img.min():.3g} .. {img.max():.3g}", fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, out_png)


# --------------------------------------------------------------------------------------------
# The walkthrough
# --------------------------------------------------------------------------------------------

def generate(args) -> str:
    from PIL import Image

    from tinyunet import inspect as ins
    from tinyunet.models import load_model
    from tinyunet.conv import tap_groups, tap_offsets
    from tinyunet.data import coverage, coverage_class, read_image, read_mask
    from tinyunet.layers import Conv2D, Conv2DTranspose, sigmoid
    from tinyunet.metrics import image_scores, iou
    from tinyunet.pipeline import binarize, from_network, probabilities, to_network
    from tinyunet.rle import rle_encode
    from tinyunet.runs import RunError, latest_model
    from tinyunet.config import config_from_args
    from tinyunet.prepare import prepare_data
    from tinyunet.unet import UNet

    try:
        model_path = Path(args.model) if args.model else latest_model(ROOT / "runs")
    except RunError as err:
        raise SystemExit(f"error: {err}") from None
    model, ckpt = load_model(model_path)
    meta = ckpt.meta
    fit, size = meta.get("fit", "resize"), meta.get("input_size", 128)
    depth = model.config["depth"]
    threshold = meta.get("best_threshold")
    threshold = 0.5 if threshold is None else float(threshold)
    data = Path(args.data or meta.get("data", {}).get("path") or ROOT / "data" / "tgs-salt")

    # Which images the run trained on (its own subset and split), so the example is an unseen one.
    config = config_from_args(meta.get("args"), model_path)
    prep = prepare_data(config, data, np, np.float32)
    seen = {prep.ids[i] for i in prep.train_idx}
    with open(data / "train.csv", newline="") as f:
        truth_csv = {row["id"]: row["rle_mask"] for row in csv.DictReader(f)}

    def csv_coverage(rle: str) -> float:
        return sum(int(n) for n in rle.split()[1::2]) / (101 * 101)

    if args.image_id:
        image_id = args.image_id
    else:  # the first id (sorted) with a quarter to three quarters salt that the run never trained on
        image_id = next(i for i in sorted(truth_csv) if i not in seen and 0.25 < csv_coverage(truth_csv[i]) < 0.75)
    image_png, mask_png = data / "train" / "images" / f"{image_id}.png", data / "train" / "masks" / f"{image_id}.png"

    # 1. Read
    with Image.open(image_png) as im:
        png_mode, png_raw = im.mode, np.asarray(im)
    raw = read_image(image_png)  # (101, 101) float32 in [0, 1]
    truth = read_mask(mask_png) > 0
    cov = float(coverage(truth[None])[0])
    cov_class = int(coverage_class(np.array([cov]))[0])
    truth_rle_csv = truth_csv[image_id]

    # 2. Fit
    x, box = to_network(raw[None], fit, size, depth)  # (1, 128, 128, 1)
    y, _ = to_network(truth[None].astype(np.float32), fit, size, depth)

    # 3. Every layer, forward and backward
    rows = ins.trace(model, x, y)
    acts = ins.activations(model, x)
    logits = model.forward(x)  # as pipeline.probabilities computes it
    probs = sigmoid(logits)
    back = from_network(probs, fit, box, raw.shape)  # (1, 101, 101)
    pred = binarize(back, threshold)[0]
    same = probabilities(model, raw[None], fit, size)
    assert np.array_equal(same, back), "the walkthrough's steps differ from pipeline.probabilities"
    rle = rle_encode(pred)
    truth_rle = rle_encode(truth)
    score = float(image_scores(truth[None], pred[None])[0])
    the_iou = float(iou(truth[None], pred[None])[0])

    # the shifted-rows view of enc1.conv1 and of a deep conv
    conv1 = model.encoders[0].convs.conv1
    n, hp, wp, h, w = conv1.grid
    offsets = tap_offsets(3, 3, wp)
    length = n * hp * wp - offsets[-1]
    groups = [list(r) for r in tap_groups(9, conv1.params["W"].shape[2])]
    deep = model.encoders[1].convs.conv2
    deep_groups = len(tap_groups(9, deep.params["W"].shape[2]))

    # the transposed conv is the backward of the conv: checked on enc1.conv2's real weights, float64
    rng = np.random.default_rng(0)
    real = model.encoders[0].convs.conv2
    W64 = real.params["W"].astype(np.float64)  # (3, 3, C, F)
    conv = Conv2D(W64.shape[2], W64.shape[3], 3, dtype=np.float64)
    conv.params = {"W": W64, "b": np.zeros(W64.shape[3])}
    xin = acts["enc1.relu1"].astype(np.float64)
    gout = rng.normal(size=xin.shape[:3] + (W64.shape[3],))
    yout = conv.forward(xin)
    dx = conv.backward(gout)
    flipped = Conv2D(W64.shape[3], W64.shape[2], 3, dtype=np.float64)
    flipped.params = {"W": np.ascontiguousarray(W64[::-1, ::-1].transpose(0, 1, 3, 2)), "b": np.zeros(W64.shape[2])}
    diff_flip = float(np.abs(flipped.forward(gout) - dx).max())
    inner_y, inner_x = float((yout * gout).sum()), float((xin * dx).sum())

    up = model.decoders[-1].up
    up_in = acts["dec2.relu2"].astype(np.float64)
    up64 = Conv2DTranspose(up.params["W"].shape[3], up.params["W"].shape[2], 2, 2, dtype=np.float64)
    up64.params = {"W": up.params["W"].astype(np.float64), "b": np.zeros(up.params["W"].shape[2])}
    up_out = up64.forward(up_in)
    gup = rng.normal(size=up_out.shape)
    dup = up64.backward(gup)
    up_inner_y, up_inner_x = float((up_out * gup).sum()), float((up_in * dup).sum())

    # dropout in training, for the record
    drop = model.encoders[0].dropout
    drop.reseed(0)
    pooled = acts["enc1.pool"]
    dropped = drop.forward(pooled, train=True)
    kept = float((drop.mask > 0).mean())
    scale = float(drop.mask.max())
    drop.forward(pooled, train=False)

    shares = ins.skip_shares(model, x, values=acts)

    # how far training moved each layer's kernel from its initial (seeded) value
    init = UNet(**meta["model"], seed=config.seed).params
    moved = {name[:-2]: float(np.linalg.norm(value - init[name]) / np.linalg.norm(init[name]))
             for name, value in model.params.items() if name.endswith(".W")}
    most_moved, least_moved = max(moved, key=moved.get), min(moved, key=moved.get)
    grad_w = {r.name: r.grad_params["W"] for r in rows if "W" in r.grad_params}
    top_grad, low_grad = max(grad_w, key=grad_w.get), min(grad_w, key=grad_w.get)

    # pictures
    IMAGES.mkdir(parents=True, exist_ok=True)
    for png in (
        steps_picture(raw, x[0, ..., 0], logits[0, ..., 0], probs[0, ..., 0], back[0], pred, truth, threshold,
                      IMAGES / "walkthrough_steps.png"),
        ins.feature_maps(model, x, ["enc1.relu2", "enc3.relu2", "bridge.relu2", "dec2.relu2", "dec1.relu2"],
                         IMAGES / "walkthrough_feature_maps.png", max_channels=8, dpi=DPI),
        ins.first_layer_kernels(model, IMAGES / "walkthrough_kernels.png"),
        ins.skip_contribution(model, x, IMAGES / "walkthrough_skips.png", dpi=DPI),
    ):
        check_size(png)

    by = {r.name: r for r in rows}
    summary = model.summary(input_size=x.shape[1:3])
    trace_rows = []
    for r in rows:
        gp = r.grad_params
        trace_rows.append([f"`{r.name}`", r.kind, shape_tuple(r.shape), g(r.min), g(r.mean), g(r.max),
                           f"{100 * r.zeros:.1f}%", "" if r.grad_out is None else f"{r.grad_out:.3e}",
                           f"{gp['W']:.3e}" if "W" in gp else "", f"{gp['b']:.3e}" if "b" in gp else ""])
    share_rows = [[f"dec{s['level']}", f"{s['up'].shape[0]}x{s['up'].shape[1]}",
                   f"{s['up'].shape[2]} + {s['up'].shape[2]}", g(s["norm_up"]), g(s["norm_skip"]),
                   f"{100 * s['share']:.0f}%"] for s in shares]
    seen_word = "was" if image_id in seen else "was not"
    if image_id not in set(prep.ids):
        subset_note = " (it is outside the run's subset of the data)"
    elif image_id not in seen:
        subset_note = " (it is one of the validation images)"
    else:
        subset_note = ""
    history_csv = model_path.parent / "history.csv"  # the whole run; best.npz holds the history up to itself
    epochs_run = (len(history_csv.read_text().strip().splitlines()) - 1 if history_csv.is_file()
                  else len(meta.get("history") or []))
    if meta.get("best_threshold") is None:
        threshold_note = "the run has no swept threshold yet, so this page uses 0.5."
    else:
        threshold_note = (f"its best probability threshold, swept on the validation set after training, is "
                          f"{threshold:.4f}, with a validation score of {g(meta.get('val_score') or float('nan'))}.")
    history = meta.get("history") or []
    best_epoch = meta.get("epoch")
    best_row = next((h for h in history if h.get("epoch") == best_epoch), {})
    salt_pred = int(pred.sum())
    rle_pairs = len(rle.split()) // 2
    relu_zero = [(r.name, r.zeros) for r in rows if r.kind == "ReLU"]
    most_silent = max(relu_zero, key=lambda t: t[1])
    least_silent = min(relu_zero, key=lambda t: t[1])
    enc_skip_grad = by[f"enc1.relu2"].grad_out
    dlogit_norm = by["head"].grad_out
    widths = [model.config["features"] * 2 ** level for level in range(depth + 1)]

    L = link  # short
    lay, unet, cv, pipe, dat = "tinyunet/layers.py", "tinyunet/unet.py", "tinyunet/conv.py", "tinyunet/pipeline.py", "tinyunet/data.py"
    doc = f"""# One seismic image through tinyunet, from PNG to RLE string

This page follows one real {raw.shape[0]}x{raw.shape[1]} image of the TGS Salt Identification Challenge,
`{image_id}`, through every step of tinyunet: reading, resizing, each of the U-Net's {len(rows) - 2} layers
forward and backward, back to {raw.shape[0]}x{raw.shape[1]}, the threshold and the run-length encoding
that goes into `submission.csv`. Every number on this page was computed by
[`docs/make_walkthrough.py`](make_walkthrough.py) with the package's own functions; regenerate the
page (numbers, tables and the four pictures in `docs/images/`) with

```
python docs/make_walkthrough.py [--model RUN/best.npz] [--data DATA] [--image-id ID]
```

(default: the model named by `runs/latest`, the data it was trained on, and the first image with
salt that the run never trained on). If only code moved, `python docs/make_walkthrough.py --relink`
re-points the code links: each link's title is the text of the line it points at, and
`tests/test_inspect.py` checks that they still agree. To look at any other image the same way, use
`python -m tinyunet.inspect --model RUN/best.npz --image some.png`.

**The model** here: `{model_path.relative_to(ROOT) if model_path.is_relative_to(ROOT) else model_path}`, a
U-Net with features={model.config['features']}, depth={depth} ({model.count_params():,} parameters), trained
by `train.py` on {len(prep.ids)} real training images ({len(prep.train_idx)} for training, doubled by
left-right flips, {len(prep.val_idx)} for validation) for {epochs_run} of the recipe's {config.epochs} epochs. Its
best epoch, {best_epoch}, had validation loss {g(best_row.get('val_loss', float('nan')))} and validation
competition score {g(best_row.get('val_score', float('nan')))} at threshold 0.5; {threshold_note}
It is a small model, briefly trained: the point of this page is the path, not the score.
**The image** `{image_id}` {seen_word} among the images it trained on{subset_note}.

![the path of one image](images/walkthrough_steps.png)

## The shapes at every step

| step | what | shape | code |
|---|---|---|---|
| read | PNG, mode `{png_mode}`, {png_raw.dtype} values {int(png_raw.min())}..{int(png_raw.max())} | {shape(png_raw)} | {L("read_image", dat, "def read_image(")} |
| scale | float32 in [0, 1]: min {g(raw.min())}, mean {g(raw.mean())}, max {g(raw.max())} | {shape(raw)} | {L("divide by 255", dat, "return decoded.raw / np.float32(decoded.full)")} |
| fit | bilinear resize {raw.shape[0]} -> {x.shape[1]} (`fit="{fit}"`), a batch of one with one channel | {shape(x)} | {L("to_network", pipe, "def to_network(")}, {L("_resize_axis", dat, "def _resize_axis(")} |
| network | {len(rows) - 2} layers, listed below | {shape(x)} -> {shape(logits)} | {L("UNet.forward", unet, "# dec4 takes x4, ..., dec1 takes x1")} |
| logits | the head's output z: min {g(logits.min())}, max {g(logits.max())} | {shape(logits)} | {L("head", unet, "# logits (N, H, W, 1)")} |
| sigmoid | p = 1 / (1 + exp(-z)): min {g(probs.min())}, max {g(probs.max())} | {shape(probs)} | {L("sigmoid", lay, "def sigmoid(x):")} |
| back | bilinear resize {x.shape[1]} -> {raw.shape[0]}, channel dropped | {shape(back)} | {L("from_network", pipe, "def from_network(")} |
| threshold | p > {threshold:.4f}: {salt_pred} salt pixels (truth: {int(truth.sum())}) | {shape(pred)} bool | {L("binarize", pipe, "def binarize(")} |
| encode | column-major runs, {rle_pairs} `start length` pair(s), {len(rle)} characters | str | {L("rle_encode", "tinyunet/rle.py", "def rle_encode(")} |

These steps are exactly what {L("pipeline.probabilities", pipe, "def probabilities(")} and `predict.py` do:
the script checks that its probabilities equal `probabilities(model, image)` bit for bit.

## 1. Reading: PNG -> floats in [0, 1]

The PNG is stored as mode `{png_mode}` ({'gray stored as RGB, so one channel is taken' if png_mode == 'RGB' else 'one channel'}); {L("read_image", dat, "def read_image(")}
divides by the mode's full scale (255), giving a float32 {shape(raw)} array in [0, 1] (here {g(raw.min())} to {g(raw.max())}).
The mask is read by {L("read_mask", dat, "def read_mask(")}, where any value > 0 is salt: {int(truth.sum())} of
{truth.size} pixels, coverage {100 * cov:.1f}%, coverage class {cov_class} (`ceil(coverage * 10)`).

## 2. Fitting the network: 101 -> 128

The U-Net halves the image {depth} times, so its side must be divisible by 2**{depth} = {2 ** depth}. The seed recipe
resizes {raw.shape[0]} -> {x.shape[1]} bilinearly ({L("resize", dat, "def resize(")}: pixel centres at half-integers,
the edges repeat) and adds the batch and channel axes: {shape(raw)} -> {shape(x)}, values still in
[{g(x.min())}, {g(x.max())}]. The mask goes through the same function and becomes a soft target in [0, 1]
(mean {g(y.mean())}). Arrays are channels-last, (N, H, W, C), as in Keras.

## 3. The network, layer by layer

{model.count_params():,} parameters in {len(model.params) // 2} layers with weights. The table from
{L("UNet.summary", unet, "def summary(self, input_size=(128, 128), batch_size: int = 1) -> str:")}
(shapes alone, no forward pass; FLOPs are multiply-adds x 2, e.g. 2*N*H*W*KH*KW*C*F for a conv):

```
{summary}
```

### The layers' forward and backward, in plain notation

Notation: x the layer's input, y its output, dy = dL/dy the gradient arriving from above, dx = dL/dx the
gradient it passes down, W and b its weights; sums run over the indices that appear only on the right.

**Conv2D, 3x3 'same'** ({L("class Conv2D", lay, "class Conv2D:")}): 
`y[n, r, c, f] = b[f] + sum_(i, j, k) xpad[n, r + i, c + j, k] * W[i, j, k, f]` with one pixel of zero padding
on each side. Backward:
`dW[i, j, k, f] = sum_(n, r, c) xpad[n, r + i, c + j, k] * dy[n, r, c, f]`, `db[f] = sum_(n, r, c) dy[n, r, c, f]`,
`dxpad[n, r + i, c + j, k] += dy[n, r, c, f] * W[i, j, k, f]` for every tap (i, j) (then the padding is cut off).

How the code computes it ({L("conv.py", cv, "def tap_offsets(")}): the padded input is flattened to rows,
(N*Hp*Wp, C). Tap (i, j) then reads every pixel moved by the constant row offset i*Wp + j, so each tap is
one matrix product on a contiguous slice of rows. For `enc1.conv1` on this image: Hp = Wp = {hp}, the nine
offsets are {offsets}, each slice has L = N*Hp*Wp - {offsets[-1]} = {length} rows, and {h * w} of the {hp * wp}
rows per image are kept ({L("valid", cv, "def valid(")}); the rest ran past the right or bottom edge. With
C = 1 a single-column GEMM would crawl, so taps are grouped: {groups} (a ({length}, 8) then a ({length}, 1)
product); from C = 8 on, every tap is its own group ({deep_groups} GEMMs for `enc2.conv2`).
Forward: {L("out += cols @ W", cv, "product = xp.matmul(cols, W_group, out=product)")} ({L("shifted_conv", cv, "def shifted_conv(")});
backward: {L("dW = cols^T @ d_rows", cv, "dW_rows[group.start * c:group.stop * c] = cols.T @ d_rows[:length]")} and
{L("dx_rows[off:off + L] += d_rows @ W^T", cv, "dx_rows[off:off + length] += product")} ({L("its transpose", cv, "def shifted_conv_transpose(")}).

**Why the input gradient is a transposed convolution.** A convolution is linear in x: y = A x for a big sparse
matrix A whose rows hold the kernel, shifted once per output pixel. The gradient of a linear map is the
transpose: dx = A^T dy. Each row of A^T gathers, for one input pixel, every output that read it, each
weighted by the tap that read it: that is a convolution of dy with the kernel flipped 180 degrees and its
in/out channels swapped, the "transposed convolution". The code builds A^T dy from the same shifted rows as
the forward: where the forward *reads* `x_rows[off : off + L]`, the backward *adds into* `dx_rows[off : off + L]`.
Checked on this model's `enc1.conv2` weights in float64, for this image's `enc1.relu1` output and a random dy:

- `Conv2D.backward(dy)` and a 'same' conv of dy with `W[::-1, ::-1].transpose(0, 1, 3, 2)` differ by at most
  {diff_flip:.1e};
- the adjoint identity <A x, dy> = <x, A^T dy>: {inner_y:.12g} vs {inner_x:.12g}.

**Conv2DTranspose, 2x2 stride 2** ({L("class Conv2DTranspose", lay, "class Conv2DTranspose:")}), the decoders'
up-convolution: every input pixel paints its own 2x2 block,
`y[n, 2r + i, 2c + j, f] = b[f] + sum_k x[n, r, c, k] * W[i, j, f, k]` (Keras's (KH, KW, F, C) layout), one GEMM
(N*H*W, C) @ (C, 4F) ({L("forward", lay, "rows = x2d @ self._w_rows()")}). Backward:
`dx[n, r, c, k] = sum_(i, j, f) dy[n, 2r + i, 2c + j, f] * W[i, j, f, k]`, a 2x2 stride-2 *convolution* of dy
({L("backward", lay, "dx = drows @ self._w_rows().T")}), and `dW[i, j, f, k] = sum_(n, r, c) x[n, r, c, k] * dy[n, 2r + i, 2c + j, f]`.
So the two are each other's backward: a conv's input gradient is a transposed conv, and a transposed conv's
input gradient is a conv. On `dec1.up` (float64, this image's `dec2.relu2` output, random dy):
<up(x), dy> = {up_inner_y:.12g}, <x, up.backward(dy)> = {up_inner_x:.12g}.

**ReLU** ({L("class ReLU", lay, "class ReLU:")}): `y = max(x, 0)`; `dx = dy where x > 0, else 0`. The fraction of
zeros after each ReLU is in the trace below: from {100 * least_silent[1]:.0f}% (`{least_silent[0]}`) to
{100 * most_silent[1]:.0f}% (`{most_silent[0]}`) of the values on this image; their gradient stops there.

**MaxPooling2D, 2x2** ({L("class MaxPooling2D", lay, "class MaxPooling2D:")}): `y[n, r, c, k] = max_(i, j) x[n, 2r + i, 2c + j, k]`;
backward sends dy to the one input that won its window (the first, on ties) and 0 to the other three.

**Dropout** ({L("class Dropout", lay, "class Dropout:")}): in training `y = x * mask`, `mask = keep / (1 - rate)`,
`keep ~ Bernoulli(1 - rate)`, and `dx = dy * mask`; at inference y = x (what this page runs). It acts in two
places ({L("encoder", "tinyunet/blocks.py", "# (N, H/2, W/2, F)")}: after each pool,
on the way down; {L("decoder", "tinyunet/blocks.py", "# (N, 2H, 2W, 2F): [upsampled, skip]")}:
after each concat), with rates {model.config['dropout']} from the top level down. Note what it does *not*
touch: the skip leaves the encoder *before* the pool and its dropout, so a decoder receives the encoder's full
features, and only the concatenated tensor is dropped. For the record, `enc1.dropout` in training mode on this
image's pooled features (seed 0) kept {100 * kept:.2f}% of the values (rate {drop.rate}) and scaled them by
{scale:.4f} = 1 / (1 - {drop.rate}).

**Concatenate** ({L("class Concatenate", lay, "class Concatenate:")}): `y = [up, skip]` on the channel axis;
backward splits dy into the two slices. This is where the skips enter.

**Head and sigmoid**: a 1x1 conv from {model.config['features']} channels to one logit per pixel, then
`p = 1 / (1 + exp(-z))`, computed from exp(-|z|) only so it never overflows ({L("sigmoid", lay, "def sigmoid(x):")}).
Training never runs the sigmoid as a layer: the loss takes the logits
({L("binary_crossentropy", "tinyunet/losses.py", "def binary_crossentropy(")}),
`L = mean(max(z, 0) - z*y + log(1 + exp(-|z|)))` and `dL/dz = (sigmoid(z) - y) / (number of pixels)`.

### Where the skips act

The wiring is in {L("UNet.forward", unet, "# dec4 takes x4, ..., dec1 takes x1")}: encoder
level k keeps its two-conv output x_k ({L("skip", "tinyunet/blocks.py", "skip = run(")}),
and decoder level k concatenates it after its up-conv. Widths on the way down: {widths}. In backward a skip
tensor gets two gradients, one through the pool below it and one through the decoder's concat, and they are
added ({L("both paths meet", "tinyunet/blocks.py", "dconv_out = self.pool.backward(self.dropout.backward(ddown)) + dskip")});
for `enc1.relu2` the sum has norm {enc_skip_grad:.3e}.

How much does each decoder use its skip? The first conv of a decoder level reads [up, skip], so its weights
split into the half acting on the upsampled channels and the half acting on the skip channels; by linearity
`conv1([up, skip]) = conv(up, W[:, :, :F]) + conv(skip, W[:, :, F:]) + b`
({L("skip_shares", "tinyunet/inspect.py", "def skip_shares(")}). On this image:

{md_table(["level", "size", "channels up + skip", "norm of the up part", "norm of the skip part", "skip share"], share_rows)}

![skip contribution](images/walkthrough_skips.png)

### Every layer on this image: values forward, gradients backward

From {L("tinyunet.inspect.trace", "tinyunet/inspect.py", "def trace(")}, which calls each layer's forward and
backward itself, in {L("UNet.walk", "tinyunet/blocks.py", "def walk(self, visit, *inputs, prefix: str = ")}'s order (that of `UNet.forward`), and
checks its logits against `model.forward`'s. The target is the true mask fitted like the image; the binary
cross-entropy of this image is {rows.loss:.6f}, and dL/dlogits = (p - y) / {logits.size} has norm
{dlogit_norm:.3e}. `|dL/dout|` is the norm of the gradient arriving at the layer's output (for `input`: at the
image itself); `|dL/dW|`, `|dL/db|` those of its weights. Dropout rows equal the rows before them: at inference
it is the identity. On this image the largest weight gradient is that of `{top_grad}` ({grad_w[top_grad]:.3e}),
the smallest that of `{low_grad}` ({grad_w[low_grad]:.3e}).

{md_table(["layer", "type", "output shape", "min", "mean", "max", "zeros", "dL/dout", "dL/dW", "dL/db"], trace_rows)}

### Feature maps and first-layer kernels

Channels of a few layers for this image (each tile scaled to its own range; for layers with more than 8
channels, the 8 with the largest mean):

![feature maps](images/walkthrough_feature_maps.png)

The first layer's nine-weight kernels, the only ones that look at the pixels themselves. Training moved
them by {100 * moved['enc1.conv1']:.0f}% of their initial norm (||W - W0|| / ||W0||, W0 the seeded Glorot
initialisation); across all layers the change ranges from {100 * moved[least_moved]:.0f}% (`{least_moved}`) to
{100 * moved[most_moved]:.0f}% (`{most_moved}`).

![first-layer kernels](images/walkthrough_kernels.png)

## 4. Back to 101 x 101, threshold, RLE

The logits (1, {x.shape[1]}, {x.shape[2]}, 1) become probabilities by the sigmoid, are resized back to
{raw.shape[0]}x{raw.shape[1]} by the same bilinear resize ({L("from_network", pipe, "def from_network(")}), and
thresholded at the checkpoint's best threshold {threshold:.4f} (swept on the validation set). The result: {salt_pred}
salt pixels against {int(truth.sum())} true ones, IoU {the_iou:.4f}, and a competition score of {score:.2f} for this image
(precision averaged over IoU thresholds 0.50 ... 0.95, {L("image_scores", "tinyunet/metrics.py", "def image_scores(")}).

Run-length encoding numbers the pixels column by column from 1 (down the first column, then the second) and
writes each run of salt as `start length` ({L("rle_encode", "tinyunet/rle.py", "def rle_encode(")}). This image's line of
`submission.csv`:

```
id,rle_mask
{image_id},{rle}
```

The true mask encodes to the same string as the image's row in `train.csv`: {'yes' if truth_rle == truth_rle_csv else 'NO'}
({len(truth_rle.split()) // 2} runs).
"""
    return doc


def shape_tuple(t) -> str:
    return "(" + ", ".join(str(d) for d in t) + ")"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint (default: runs/<runs/latest>/best.npz)")
    parser.add_argument("--data", help="data folder in Kaggle's layout (default: the one the model was trained on)")
    parser.add_argument("--image-id", help="training image id (default: the first with salt the run never trained on)")
    parser.add_argument("--relink", action="store_true", help="only recompute the code links' line numbers")
    args = parser.parse_args(argv)
    if args.relink:
        DOC.write_text(relink(DOC.read_text()))
        print(f"relinked {DOC}")
        return 0
    DOC.write_text(generate(args))
    print(f"wrote {DOC} and docs/images/walkthrough_*.png")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
