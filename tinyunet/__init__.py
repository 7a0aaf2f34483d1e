"""tinyunet: a U-Net for binary segmentation written from scratch on NumPy (CuPy on a GPU).

    import tinyunet
    model = tinyunet.UNet(features=8, depth=4)            # the seed recipe's network
    model, ckpt = tinyunet.load_model("models/tgs-salt.npz")
    run = tinyunet.train(config)                          # config = tinyunet.config.build_config({...})
    tinyunet.predict(run / "best.npz", data="tgs-salt-identification-challenge.zip")

The engine (network, layers, losses, optimizer, checkpoints, metrics, run-length codes) loads with
NumPy alone; ``load_model``, ``train`` and ``predict`` import their modules (and with them Pillow,
tqdm, matplotlib where they need them) on first use.
"""

from importlib import import_module

from tinyunet.checkpoint import load_checkpoint, save_checkpoint
from tinyunet.layers import (Add, BatchNormalization, Concatenate, Conv2D, Conv2DTranspose, Dropout, MaxPooling2D,
                             ReLU, Sigmoid)
from tinyunet.losses import LOSSES, bce_lovasz, binary_crossentropy, get_loss, lovasz_hinge, symmetric_lovasz
from tinyunet.metrics import competition_score, threshold_sweep
from tinyunet.optim import Adam
from tinyunet.rle import rle_decode, rle_encode
from tinyunet.unet import UNet

__version__ = "0.1.0"

_LAZY = {"load_model": "tinyunet.models", "train": "tinyunet.training", "predict": "tinyunet.prediction"}

__all__ = ["Adam", "Add", "BatchNormalization", "Concatenate", "Conv2D", "Conv2DTranspose", "Dropout", "LOSSES",
           "MaxPooling2D", "ReLU", "Sigmoid", "UNet", "bce_lovasz", "binary_crossentropy", "competition_score",
           "get_loss", "load_checkpoint", "lovasz_hinge", "rle_decode", "rle_encode", "save_checkpoint",
           "symmetric_lovasz", "threshold_sweep", *_LAZY]


def __getattr__(name: str):
    """``tinyunet.load_model``, ``.train``, ``.predict``: their modules imported on first use."""
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tinyunet' has no attribute {name!r}")
