"""Study mode: the summary's numbers, the layer-by-layer trace, the pictures and the inspect command."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tinyunet.checkpoint import save_checkpoint
from tinyunet.inspect import (activations, first_layer_kernels, format_trace, main, network_input, skip_shares,
                              trace)
from tinyunet.layers import Conv2D, Conv2DTranspose
from tinyunet.losses import binary_crossentropy
from tinyunet.pipeline import to_network
from tinyunet.unet import UNet

ROOT = Path(__file__).resolve().parents[1]


def _tiny(dtype=np.float64, seed=3):
    return UNet(features=2, depth=2, dropout=(0.25, 0.5), dtype=dtype, seed=seed)


# --- the summary ---------------------------------------------------------------------------------

def test_summary_of_the_seed_model_at_101_to_128():
    model = UNet(features=8, depth=4)
    x, _ = to_network(np.zeros((1, 101, 101), np.float32), "resize", 128, 4)  # as training fits it
    rows = {r["name"]: r for r in model.layer_table(x.shape[1:3])}
    assert rows["input"]["shape"] == (1, 128, 128, 1)
    assert rows["enc1.relu2"]["shape"] == (1, 128, 128, 8)
    assert rows["enc4.pool"]["shape"] == (1, 8, 8, 64)
    assert rows["bridge.relu2"]["shape"] == (1, 8, 8, 128)
    assert rows["dec4.up"]["shape"] == (1, 16, 16, 64)
    assert rows["dec4.concat"]["shape"] == (1, 16, 16, 128)
    assert rows["dec1.relu2"]["shape"] == (1, 128, 128, 8)
    assert rows["head"]["shape"] == (1, 128, 128, 1)
    assert rows["enc1.conv1"]["params"] == 3 * 3 * 1 * 8 + 8
    assert rows["dec4.up"]["params"] == 2 * 2 * 128 * 64 + 64
    assert rows["enc1.conv2"]["flops"] == 2 * 128 * 128 * 3 * 3 * 8 * 8
    assert rows["enc1.relu2"]["bytes"] == 128 * 128 * 8 * 4  # float32
    assert sum(r["params"] for r in rows.values()) == 485_673
    text = model.summary(input_size=(128, 128))
    assert "Total params: 485,673" in text
    assert re.search(r"bridge\.relu2 \(ReLU\)\s+\(1, 8, 8, 128\)", text)


def test_summary_walks_any_depth_and_refuses_bad_sizes():
    model = UNet(features=3, depth=3, dropout=(0.1, 0.2, 0.3))
    rows = model.layer_table((16, 24), batch_size=2)
    assert [r["name"] for r in rows][:3] == ["input", "enc1.conv1", "enc1.relu1"]
    assert rows[-2]["name"] == "head" and rows[-2]["shape"] == (2, 16, 24, 1)
    assert {r["name"] for r in rows if r["type"] == "Conv2DTranspose"} == {"dec3.up", "dec2.up", "dec1.up"}
    assert "Total params: " + f"{model.count_params():,}" in model.summary((16, 24))
    with pytest.raises(ValueError, match="divisible by 8"):
        model.summary((20, 24))


def _direct_conv_macs(x, W, b):
    """A 'same' stride-1 conv by plain loops over the zero-padded input, counting multiply-adds."""
    n, h, w, c = x.shape
    kh, kw, _, f = W.shape
    top, left = (kh - 1) // 2, (kw - 1) // 2
    xpad = np.pad(x, ((0, 0), (top, kh - 1 - top), (left, kw - 1 - left), (0, 0)))
    out, macs = np.zeros((n, h, w, f)), 0
    for i in np.ndindex(n, h, w, f):
        acc = b[i[3]]
        for di, dj, ci in np.ndindex(kh, kw, c):
            acc += xpad[i[0], i[1] + di, i[2] + dj, ci] * W[di, dj, ci, i[3]]
            macs += 1
        out[i] = acc
    return out, macs


def test_conv_flops_are_twice_a_direct_count_of_multiply_adds(rng):
    layer = Conv2D(2, 3, 3, rng=0, dtype=np.float64)
    layer.params["b"][...] = rng.normal(size=3)
    x = rng.normal(size=(2, 4, 5, 2))
    out, macs = _direct_conv_macs(x, layer.params["W"], layer.params["b"])
    np.testing.assert_allclose(layer.forward(x), out, rtol=1e-12, atol=1e-12)
    assert layer.output_shape(x.shape) == out.shape
    assert layer.flops(x.shape) == 2 * macs == 2 * 2 * 4 * 5 * 3 * 3 * 2 * 3


def test_up_conv_flops_are_twice_a_direct_count_of_multiply_adds(rng):
    layer = Conv2DTranspose(3, 2, 2, 2, rng=0, dtype=np.float64)
    x = rng.normal(size=(1, 3, 2, 3))
    W = layer.params["W"]  # (KH, KW, F, C)
    out, macs = np.zeros((1, 6, 4, 2)), 0
    for n, y, xx, c in np.ndindex(x.shape):  # each input pixel paints its own 2x2 block
        for i, j, f in np.ndindex(2, 2, 2):
            out[n, 2 * y + i, 2 * xx + j, f] += x[n, y, xx, c] * W[i, j, f, c]
            macs += 1
    np.testing.assert_allclose(layer.forward(x), out, rtol=1e-12, atol=1e-12)
    assert layer.output_shape(x.shape) == out.shape
    assert layer.flops(x.shape) == 2 * macs


def test_summary_flops_and_shapes_match_a_real_forward(rng):
    model = UNet(features=3, depth=3, dropout=(0.1, 0.2, 0.3))
    x = rng.random((2, 16, 24, 1)).astype(np.float32)
    acts = activations(model, x)  # runs every layer on x; the FLOPs below come from the outputs it gave
    ran = 0
    for name, layer in model.named_layers():
        if isinstance(layer, Conv2D):  # every output pixel: KH*KW*C multiply-adds per filter
            kh, kw, c, f = layer.params["W"].shape
            ran += 2 * int(np.prod(acts[name].shape[:3])) * kh * kw * c * f
        elif isinstance(layer, Conv2DTranspose):  # every output pixel: C multiply-adds per filter
            _, _, f, c = layer.params["W"].shape
            ran += 2 * int(np.prod(acts[name].shape[:3])) * c * f
    rows = model.layer_table((16, 24), batch_size=2)
    assert sum(r["flops"] for r in rows) == ran
    for r in rows:
        assert acts[r["name"]].shape == r["shape"], r["name"]


# --- the trace -----------------------------------------------------------------------------------

def test_trace_logits_and_gradients_match_forward_and_backward(rng):
    model = _tiny()
    image, target = rng.random((13, 11)), (rng.random((13, 11)) > 0.5).astype(np.float64)
    rows = trace(model, image, target, input_size=8)
    x, y = network_input(model, image, "resize", 8), network_input(model, target, "resize", 8)
    logits = model.forward(x)
    np.testing.assert_allclose(rows.logits, logits, rtol=1e-12, atol=1e-12)
    loss, dlogits = binary_crossentropy(logits, y)
    assert rows.loss == pytest.approx(float(loss), rel=1e-12)
    dx = model.backward(dlogits)
    by_name = {row.name: row for row in rows}
    for name, layer in model.named_layers():
        for key in layer.params:
            assert by_name[name].grad_params[key] == pytest.approx(np.linalg.norm(model.grads[f"{name}.{key}"]),
                                                                    rel=1e-9), f"{name}.{key}"
    assert by_name["input"].grad_out == pytest.approx(np.linalg.norm(dx), rel=1e-9)
    assert by_name["head"].grad_out == pytest.approx(np.linalg.norm(dlogits), rel=1e-12)
    assert "binary cross-entropy" in format_trace(rows) and "|dL/dW|" in format_trace(rows)


def test_trace_forward_statistics(rng):
    model = _tiny()
    image = rng.random((8, 8))
    rows = trace(model, image, input_size=8)
    acts = activations(model, image, input_size=8)
    assert [row.name for row in rows] == list(acts)
    relu = next(row for row in rows if row.name == "enc1.relu1")
    a = acts["enc1.relu1"]
    assert (relu.min, relu.max, relu.shape) == (0.0, pytest.approx(a.max()), (1, 8, 8, 2))
    assert relu.zeros == pytest.approx((a == 0).mean())
    assert all(row.grad_out is None for row in rows) and rows.loss is None
    assert "|dL/dout|" not in format_trace(rows)


def test_skip_shares_split_the_first_decoder_conv(rng):
    model = _tiny()
    image = rng.random((8, 8))
    shares = skip_shares(model, image, input_size=8)  # checks up + skip + b = conv1 itself
    assert [s["level"] for s in shares] == [2, 1]
    assert shares[1]["up"].shape == (8, 8, 2)
    values = activations(model, image, "resize", 8)
    for share, decoder in zip(shares, model.decoders):  # the skip's part, computed on its own
        W = decoder.convs.conv1.params["W"]  # (3, 3, 2F, F): [up, skip] channels
        f = W.shape[2] // 2
        half = Conv2D(f, W.shape[3], 3, use_bias=False)
        half.params["W"] = W[:, :, f:]
        from_skip = half.forward(values[f"enc{share['level']}.relu2"])[0]
        np.testing.assert_allclose(share["skip"], from_skip, rtol=1e-5, atol=1e-6)
        norms = np.linalg.norm(share["up"]), np.linalg.norm(from_skip)
        assert share["share"] == pytest.approx(norms[1] / sum(norms), rel=1e-5)


# --- pictures and the command line ---------------------------------------------------------------

def _png_ok(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        return img.size


def test_first_layer_kernels_png(tmp_path):
    assert _png_ok(first_layer_kernels(_tiny(np.float32), tmp_path / "k.png"))[0] > 100


@pytest.fixture
def tiny_run(tmp_path, rng):
    """A tiny checkpoint, and an image with its mask in Kaggle's layout."""
    model = _tiny(np.float32)
    meta = {"model": model.config, "fit": "resize", "input_size": 16, "epoch": 1}
    ckpt = save_checkpoint(tmp_path / "best.npz", model.params, meta)
    for folder, pixels in (("images", rng.integers(0, 256, (11, 11))), ("masks", (rng.random((11, 11)) > 0.5) * 255)):
        (tmp_path / "train" / folder).mkdir(parents=True)
        Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "train" / folder / "abc.png")
    return ckpt, tmp_path / "train" / "images" / "abc.png"


def test_cli_prints_summary_and_trace_and_writes_the_pictures(tiny_run, tmp_path, capsys):
    ckpt, image = tiny_run
    out = tmp_path / "out"
    assert main(["--model", str(ckpt), "--image", str(image), "--out", str(out),
                 "--layers", "enc1.relu2,bridge.conv2"]) == 0
    text = capsys.readouterr().out
    assert "network input 16x16" in text and "masks/abc.png" in text  # the mask found beside images/
    assert f"Total params: {_tiny().count_params():,}" in text
    assert "binary cross-entropy of this image" in text
    for name in ("feature_maps.png", "first_layer_kernels.png", "skip_contribution.png"):
        assert _png_ok(out / name)[0] > 100


def test_cli_without_a_model_uses_the_untrained_seed_model(tiny_run, tmp_path, capsys):
    _, image = tiny_run
    assert main(["--image", str(image), "--out", str(tmp_path / "o"), "--features", "2", "--depth", "2",
                 "--input-size", "16", "--mask", str(image.parent.parent / "masks" / "abc.png")]) == 0
    assert "untrained seed model" in capsys.readouterr().out


@pytest.mark.parametrize("which", ["model", "image", "layer"])
def test_cli_bad_input_is_one_line_and_exit_2(tiny_run, tmp_path, capsys, which):
    ckpt, image = tiny_run
    argv = {"model": ["--model", str(tmp_path / "nope.npz"), "--image", str(image)],
            "image": ["--model", str(ckpt), "--image", str(tmp_path / "nope.png")],
            "layer": ["--model", str(ckpt), "--image", str(image), "--layers", "enc9.conv1"]}[which]
    assert main(argv + ["--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_module_runs_as_a_command_and_fails_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tinyunet.inspect", "--image", str(tmp_path / "x.png")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


# --- the walkthrough's links still point at the lines they name ---------------------------------

def test_walkthrough_links_point_at_their_lines():
    doc = ROOT / "docs" / "walkthrough.md"
    if not doc.exists():
        pytest.skip("docs/walkthrough.md not generated")
    links = re.findall(r"\]\((\.\./[^)#\s]+)#L(\d+) \"([^\"]+)\"\)", doc.read_text())
    assert links, "the walkthrough links no code lines"
    for path, line, anchor in links:
        lines = (doc.parent / path).read_text().splitlines()
        assert int(line) <= len(lines) and anchor in lines[int(line) - 1], (
            f"{path}#L{line} no longer holds {anchor!r}: run python docs/make_walkthrough.py --relink")
