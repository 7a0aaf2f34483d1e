"""Folding BatchNorm into the convolution before it, for inference.

At inference a BatchNormalization is an affine map per channel with fixed statistics, so the
convolution that feeds it can absorb it. With ``s = gamma / sqrt(moving_variance + epsilon)``:

    BN(conv(x)) = (x * W + b - moving_mean) * s + beta
                = x * (W * s) + ((b - moving_mean) * s + beta)        (b = 0 for a conv without bias)
    W' = W * s        (KH, KW, C, F): every output channel f scaled by s[f]
    b' = (b - moving_mean) * s + beta  =  b * s + shift, with BN's own inference shift
                                         shift = beta - moving_mean * s (BatchNormalization.inference_affine)

    fold_batchnorm(model)        # in place; the BN layers become Identity; returns how many were folded

A folded model computes the same function up to rounding (one multiply-add per value less), runs
one pass over the activations less per BN, and is for inference only: its parameter names differ
(``conv1.b`` appears, ``bn1.gamma`` ... go), so it is neither trained nor saved.
"""

from __future__ import annotations

from tinyunet.backend import get_array_module
from tinyunet.blocks import Block
from tinyunet.layers import BatchNormalization, Conv2D, Identity


def _consumers(model: Block) -> tuple[dict, dict]:
    """Trace the wiring: full layer name -> its input node names, and node -> the layers reading it."""
    inputs: dict[str, tuple] = {}
    readers: dict[str, list] = {}

    def visit(name, layer, *xs):
        inputs[name] = xs
        for x in xs:
            readers.setdefault(x, []).append(name)
        return name  # a layer's output node is named after it

    model.walk(visit, "input")
    return inputs, readers


def _owners(block: Block, prefix: str = "") -> dict:
    """full layer name -> (the block holding it, its key there)."""
    owners = {}
    for key, child in block.children.items():
        if isinstance(child, Block):
            owners.update(_owners(child, block._prefix(prefix, key, child)))
        else:
            owners[prefix + key] = (block, key)
    return owners


def fold_batchnorm(model: Block) -> int:
    """Fold every BatchNormalization whose input is a Conv2D's output read by it alone into that conv
    (module docstring), in place; the BN's place holds an Identity. Returns the number folded."""
    inputs, readers = _consumers(model)
    owners = _owners(model)
    layers = dict(model.named_layers())
    folded = 0
    for name, bn in layers.items():
        if not isinstance(bn, BatchNormalization) or len(inputs[name]) != 1:
            continue
        source = inputs[name][0]
        conv = layers.get(source)
        if not isinstance(conv, Conv2D) or readers[source] != [name]:
            continue
        scale, shift = bn.inference_affine()  # (F,) each: BN(y) = y * scale + shift
        conv.params["W"] = conv.params["W"] * scale  # (KH, KW, C, F) * (F,)
        conv.params["b"] = conv.params["b"] * scale + shift if "b" in conv.params else shift  # (F,)
        conv.grads = {key: get_array_module(value).zeros_like(value) for key, value in conv.params.items()}
        block, key = owners[name]
        block.children[key] = Identity()
        folded += 1
    if folded:
        model.folded = True  # a UNet's replicas fold theirs too (UNet.replica)
    return folded
