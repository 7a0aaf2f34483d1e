"""Blocks: small containers of layers (and of other blocks) that state their wiring once.

A block names its children once, in ``__init__``, as an ordered mapping name -> layer or block, and
writes its diagram once, in :meth:`Block.wiring`, as calls ``run(name, *inputs)``. Everything else
is derived from those two by walking the children (as micrograd's ``parameters()`` does):

* ``forward(*inputs, train)``  the wiring with ``run`` = the child's forward;
* ``walk(visit, *inputs)``     the wiring with ``run`` = ``visit(full name, layer, *inputs)`` for
  every layer inside (study mode: the summary passes shapes, the trace passes node names);
* ``named_layers()``, ``params``, ``grads``, ``buffers``  every layer's state under its full name,
  e.g. ``enc1.conv1.W``, in declaration order (the order of the forward pass).

``backward`` stays explicit in every block: the wiring in reverse, each merge of two paths (a skip,
a shortcut) adding its two gradients. There is no tape and no hidden registration.

An *inline* block (the conv units below) lends its children's names to its parent: the seed's
encoder holds ``conv1``, ``relu1``, ``conv2``, ``relu2``, ``pool``, ``dropout`` (so its parameters
are ``enc1.conv1.W`` ...), though the two convs are one block that the residual kind replaces.

The conv units, chosen by the model's ``block`` setting:

    "double"     conv3x3 -> ReLU -> conv3x3 -> ReLU                       (the seed recipe)
    "double_bn"  conv3x3 -> BN -> ReLU -> conv3x3 -> BN -> ReLU             (no conv bias before a BN)
    "residual"   relu( BN(conv3x3(relu(BN(conv3x3(x))))) + shortcut(x) )     shortcut: x itself when the
                 channels agree, else a 1x1 conv (no bias: bn2's beta already shifts the sum)
"""

from __future__ import annotations

from tinyunet.layers import (Add, BatchNormalization, Concatenate, Conv2D, Conv2DTranspose, Dropout, MaxPooling2D,
                             ReLU)

BLOCKS = ("double", "double_bn", "residual")  # the conv units a U-Net level can be built from


class Block:
    """A container: ``children`` (name -> layer or Block, in forward order) and one :meth:`wiring`."""

    def __init__(self, children: dict, inline: bool = False):
        self.children = dict(children)  # name -> layer or Block, in forward order
        self.inline = inline  # True: the children's names join the parent's (enc1.conv1, not enc1.convs.conv1)
        names = [name for name, _ in self.named_layers()]  # an inline child's names join this block's
        if len(set(names)) != len(names):
            raise ValueError(f"{type(self).__name__}: two children share a name in {names}")

    def __getattr__(self, name: str):
        """``block.conv1`` for ``block.children["conv1"]``."""
        children = self.__dict__.get("children", {})
        if name in children:
            return children[name]
        raise AttributeError(f"{type(self).__name__} has no attribute or child {name!r}")

    def wiring(self, run, *inputs):
        """The block's diagram, stated once: ``run(name, *inputs)`` applies child ``name``."""
        raise NotImplementedError(f"{type(self).__name__} must state its wiring")

    # --- derived from children and wiring ------------------------------------------------------------

    def _prefix(self, prefix: str, name: str, child: Block) -> str:
        return prefix if child.inline else f"{prefix}{name}."

    def forward(self, *inputs, train: bool = False):
        return self.wiring(lambda name, *xs: self.children[name].forward(*xs, train=train), *inputs)

    def walk(self, visit, *inputs, prefix: str = ""):
        """The wiring with every layer handed to ``visit(full_name, layer, *inputs) -> output``.

        The layers are not called here: ``visit`` decides what flows (shapes, arrays or node names).
        """
        def run(name, *xs):
            child = self.children[name]
            if isinstance(child, Block):
                return child.walk(visit, *xs, prefix=self._prefix(prefix, name, child))
            return visit(prefix + name, child, *xs)

        return self.wiring(run, *inputs)

    def named_layers(self, prefix: str = ""):
        """(full name, layer) for every layer inside, in forward order."""
        named = []
        for name, child in self.children.items():
            if isinstance(child, Block):
                named += child.named_layers(self._prefix(prefix, name, child))
            else:
                named.append((prefix + name, child))
        return named

    def _state(self, kind: str) -> dict:
        return {f"{name}.{key}": value for name, layer in self.named_layers()
                for key, value in getattr(layer, kind).items()}

    @property
    def params(self) -> dict:
        """full name -> parameter array, e.g. ``"enc1.conv1.W"``; the layers' own arrays, not copies."""
        return self._state("params")

    @property
    def grads(self) -> dict:
        """full name -> gradient array from the last backward, the same keys as :attr:`params`."""
        return self._state("grads")

    @property
    def buffers(self) -> dict:
        """full name -> state that is not trained, e.g. ``"enc1.bn1.moving_mean"``."""
        return self._state("buffers")

    def layers_of(self, kind: type) -> list:
        """Every layer of class ``kind`` inside, in forward order (e.g. the Dropout layers)."""
        return [layer for _, layer in self.named_layers() if isinstance(layer, kind)]


class Sequence(Block):
    """Children applied one after the other; backward in reverse. The first child is a Conv2D, whose
    input gradient a first layer may skip (``input_grad=False``)."""

    def wiring(self, run, x):
        for name in self.children:
            x = run(name, x)
        return x

    def backward(self, dout, input_grad: bool = True):
        layers = list(self.children.values())
        for layer in reversed(layers[1:]):
            dout = layer.backward(dout)
        return layers[0].backward(dout, input_grad=input_grad)


class DoubleConv(Sequence):
    """conv3x3 -> [BN] -> ReLU, twice: the two convolutions of every level (kinds "double", "double_bn")."""

    def __init__(self, c_in: int, c_out: int, batchnorm: bool, rng, dtype, xp, inline: bool = True):
        children = {}
        for k, width in ((1, c_in), (2, c_out)):
            children[f"conv{k}"] = Conv2D(width, c_out, 3, use_bias=not batchnorm, rng=rng, dtype=dtype, xp=xp)
            if batchnorm:
                children[f"bn{k}"] = BatchNormalization(c_out, dtype=dtype, xp=xp)
            children[f"relu{k}"] = ReLU()
        super().__init__(children, inline)


class ResidualBlock(Block):
    """relu(bn2(conv2(relu1(bn1(conv1(x))))) + shortcut(x)), a ResNet basic block; shortcut = x when
    c_in == c_out, else a 1x1 conv without bias (kind "residual")."""

    def __init__(self, c_in: int, c_out: int, rng, dtype, xp, inline: bool = True):
        children = {
            "conv1": Conv2D(c_in, c_out, 3, use_bias=False, rng=rng, dtype=dtype, xp=xp),
            "bn1": BatchNormalization(c_out, dtype=dtype, xp=xp),
            "relu1": ReLU(),
            "conv2": Conv2D(c_out, c_out, 3, use_bias=False, rng=rng, dtype=dtype, xp=xp),
            "bn2": BatchNormalization(c_out, dtype=dtype, xp=xp),
        }
        if c_in != c_out:
            children["shortcut"] = Conv2D(c_in, c_out, 1, use_bias=False, rng=rng, dtype=dtype, xp=xp)
        children["add"] = Add()
        children["relu2"] = ReLU()
        super().__init__(children, inline)

    def wiring(self, run, x):
        h = run("relu1", run("bn1", run("conv1", x)))  # (N, H, W, F)
        h = run("bn2", run("conv2", h))
        shortcut = run("shortcut", x) if "shortcut" in self.children else x  # (N, H, W, F)
        return run("relu2", run("add", h, shortcut))

    def backward(self, dout, input_grad: bool = True):
        dh, dshortcut = self.add.backward(self.relu2.backward(dout))
        dh = self.conv2.backward(self.bn2.backward(dh))  # dL/d relu1's output
        dx = self.conv1.backward(self.bn1.backward(self.relu1.backward(dh)), input_grad=input_grad)
        if "shortcut" in self.children:
            dshortcut = self.shortcut.backward(dshortcut, input_grad=input_grad)
        return dx + dshortcut if input_grad else None


def conv_unit(block: str, c_in: int, c_out: int, rng, dtype, xp, inline: bool = True) -> Block:
    """The two convolutions of one level, of kind ``block`` (one of :data:`BLOCKS`); inline in the
    level's block, or (the bridge) a level of its own."""
    if block == "residual":
        return ResidualBlock(c_in, c_out, rng, dtype, xp, inline)
    if block in ("double", "double_bn"):
        return DoubleConv(c_in, c_out, block == "double_bn", rng, dtype, xp, inline)
    raise ValueError(f"unknown block {block!r}: choose one of {', '.join(BLOCKS)}")


class EncoderBlock(Block):
    """The level's convs, then max-pool and dropout. Returns (to the level below, skip to the decoder)."""

    def __init__(self, block: str, c_in: int, c_out: int, rate: float, rng, dtype, xp):
        super().__init__({"convs": conv_unit(block, c_in, c_out, rng, dtype, xp),
                          "pool": MaxPooling2D(2), "dropout": Dropout(rate, xp=xp)})

    def wiring(self, run, x):
        skip = run("convs", x)  # (N, H, W, F)
        down = run("dropout", run("pool", skip))  # (N, H/2, W/2, F)
        return down, skip

    def backward(self, ddown, dskip, input_grad: bool = True):
        dconv_out = self.pool.backward(self.dropout.backward(ddown)) + dskip  # both paths meet
        return self.convs.backward(dconv_out, input_grad)


class DecoderBlock(Block):
    """Up-conv 2x2 stride 2, concat [upsampled, skip], dropout, the level's convs."""

    def __init__(self, block: str, c_in: int, c_out: int, rate: float, rng, dtype, xp):
        super().__init__({"up": Conv2DTranspose(c_in, c_out, 2, 2, rng=rng, dtype=dtype, xp=xp),
                          "concat": Concatenate(), "dropout": Dropout(rate, xp=xp),
                          "convs": conv_unit(block, 2 * c_out, c_out, rng, dtype, xp)})

    def wiring(self, run, x, skip):
        up = run("up", x)  # (N, 2H, 2W, F)
        joined = run("dropout", run("concat", up, skip))  # (N, 2H, 2W, 2F): [upsampled, skip]
        return run("convs", joined)  # (N, 2H, 2W, F)

    def backward(self, dout):
        dup, dskip = self.concat.backward(self.dropout.backward(self.convs.backward(dout)))
        return self.up.backward(dup), dskip
