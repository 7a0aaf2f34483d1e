"""One model loader: a checkpoint file -> the U-Net it describes, with its weights and buffers.

    model, checkpoint = load_model("runs/<name>/best.npz")        # or gpu=True

Every reader of a trained model goes through :func:`load_model`: predict.py, study mode
(``tinyunet.inspect``) and the walkthrough script. It checks, with a one-line CheckpointError each,
that the file records how to build the model (``meta["model"]``) and how images meet it (``fit``,
``input_size``), that its arrays are one float dtype, finite, and have exactly the names and shapes
those settings give (parameters and buffers alike).
"""

from __future__ import annotations

import os

import numpy as np

from tinyunet.checkpoint import Checkpoint, CheckpointError, check_compatible, load_checkpoint
from tinyunet.ensemble import Ensemble, split_members
from tinyunet.fold import fold_batchnorm
from tinyunet.parallel import DataParallel
from tinyunet.pipeline import FITS, MAX_INPUT_SIZE
from tinyunet.transforms import MAX_CHANNELS
from tinyunet.unet import MAX_DEPTH, MAX_WIDTH, UNet

_DAMAGED = "the file is damaged or was edited: use another checkpoint or train again"

MODEL_KEYS = ("features", "depth", "dropout", "in_channels", "block")  # UNet settings kept in meta["model"]


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_model_settings(config: dict, where) -> None:
    """CheckpointError unless ``meta["model"]`` describes a U-Net of sane size, checked before any is built
    (a file claiming features=3000 must not ask for gigabytes)."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{where} records no model settings (meta['model']): it was not saved "
                              "by train.py; pass the best.npz of a training run")
    features, depth = config.get("features", 8), config.get("depth", 4)
    if not (_whole(features) and _whole(depth) and features >= 1 and 1 <= depth <= MAX_DEPTH
            and features * 2 ** depth <= MAX_WIDTH):
        raise CheckpointError(f"{where} records features={features!r}, depth={depth!r}: expected whole numbers, "
                              f"depth 1..{MAX_DEPTH} and features * 2**depth at most {MAX_WIDTH}; {_DAMAGED}")
    in_channels, dropout = config.get("in_channels", 1), config.get("dropout")
    if not (_whole(in_channels) and 1 <= in_channels <= MAX_CHANNELS):
        raise CheckpointError(f"{where} records in_channels={in_channels!r}, not a whole number of image channels "
                              f"(1..{MAX_CHANNELS}); {_DAMAGED}")
    if dropout is not None and not (isinstance(dropout, list) and len(dropout) == depth and all(
            isinstance(rate, (int, float)) and not isinstance(rate, bool) and 0 <= rate < 1 for rate in dropout)):
        raise CheckpointError(f"{where} records dropout={dropout!r}, not one rate in [0, 1) per level "
                              f"(depth={depth}); {_DAMAGED}")


def build_model(config: dict, where, dtype=np.float32, gpu: bool = False) -> UNet:
    """The U-Net of a checkpoint's ``meta["model"]`` (fresh weights); CheckpointError when it builds none."""
    check_model_settings(config, where)
    try:
        return UNet(**{k: config[k] for k in MODEL_KEYS if k in config}, dtype=dtype, gpu=gpu)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where} records model settings {config} that do not build a "
                              f"U-Net ({err})") from None


def float_dtype(ckpt: Checkpoint) -> np.dtype:
    """The one float dtype of the checkpoint's arrays (float32 when it holds none); integer, complex or
    mixed arrays are a CheckpointError, for predict and resume alike."""
    dtypes = {a.dtype for a in (*ckpt.params.values(), *ckpt.buffers.values())}
    if len(dtypes) > 1 or not all(np.issubdtype(d, np.floating) for d in dtypes):
        raise CheckpointError(f"{ckpt.path} holds parameters of dtypes {sorted(map(str, dtypes))}; "
                              "expected one float dtype; pass the best.npz of a training run")
    return dtypes.pop() if dtypes else np.dtype(np.float32)


def load_into(model: UNet, ckpt: Checkpoint) -> None:
    """Check that ``ckpt`` holds exactly ``model``'s arrays (one float dtype, names, shapes, finite) and
    load them."""
    float_dtype(ckpt)
    settings = {k: model.config[k] for k in ("features", "depth", "block") if k in model.config}
    check_compatible(ckpt, {name: tuple(p.shape) for name, p in model.params.items()}, settings)
    own_buffers = {name: tuple(b.shape) for name, b in model.buffers.items()}
    saved_buffers = {name: tuple(b.shape) for name, b in ckpt.buffers.items()}
    if list(own_buffers.items()) != list(saved_buffers.items()):
        differ = next((f"first difference: {s} {s_shape} in the file, {o} {o_shape} in the model"
                       for (s, s_shape), (o, o_shape) in zip(saved_buffers.items(), own_buffers.items())
                       if (s, s_shape) != (o, o_shape)), "")
        raise CheckpointError(f"{ckpt.path} holds {len(saved_buffers)} buffer arrays (BatchNorm statistics), "
                              f"the model it describes {len(own_buffers)}{'; ' + differ if differ else ''}: "
                              f"{_DAMAGED}")
    arrays = {**ckpt.params, **ckpt.buffers}
    bad = [name for name, a in arrays.items() if not np.isfinite(a).all()]
    if bad:
        raise CheckpointError(f"{ckpt.path} holds NaN or infinite weights (in {bad[0]}"
                              f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}): training "
                              "diverged before it was saved; use an earlier checkpoint or train again")
    model.load_params(ckpt.params, ckpt.buffers)


def _load_one(ckpt: Checkpoint, gpu: bool) -> UNet:
    """The U-Net of ``ckpt.meta["model"]`` with the checkpoint's arrays loaded (float16 ones widened)."""
    where, config = ckpt.path, ckpt.meta.get("model")
    dtype = float_dtype(ckpt)
    model = build_model(config, where, dtype=np.float32 if dtype == np.float16 else dtype, gpu=gpu)
    load_into(model, ckpt)
    return model


def load_model(path: str | os.PathLike, gpu: bool = False) -> tuple[UNet | Ensemble, Checkpoint]:
    """Build the U-Net a checkpoint describes (``meta["model"]``) and load its weights and buffers;
    for an ensemble file (``meta["members"]``, :mod:`tinyunet.ensemble`) an Ensemble of them.

    Raises CheckpointError (one line) when the file is not a usable tinyunet model checkpoint, and
    GPUUnavailableError when ``gpu`` is asked for without CuPy or a CUDA device.
    """
    ckpt = load_checkpoint(path)
    meta, where = ckpt.meta, ckpt.path
    members = meta.get("members")
    if members is None:
        check_model_settings(meta.get("model"), where)
    elif not (isinstance(members, list) and members and all(isinstance(m, dict) for m in members)):
        raise CheckpointError(f"{where} has an invalid 'members' list in its metadata; {_DAMAGED}")
    fit, input_size = meta.get("fit"), meta.get("input_size")
    if fit not in FITS:
        raise CheckpointError(f"{where} records fit={fit!r}, expected one of {FITS}; pass the "
                              "best.npz of a training run")
    if fit == "resize" and not (_whole(input_size) and 1 <= input_size <= MAX_INPUT_SIZE):
        raise CheckpointError(f"{where} records input_size={input_size!r}, expected a whole number from 1 to "
                              f"{MAX_INPUT_SIZE}; pass the best.npz of a training run")
    if members is None:
        return _load_one(ckpt, gpu), ckpt
    models = [_load_one(part, gpu) for part in split_members(ckpt)]
    if len({m.config["depth"] for m in models}) > 1:
        raise CheckpointError(f"{where} holds ensemble members of different depths, which fit images "
                              f"differently; {_DAMAGED}")
    return Ensemble(models), ckpt


def for_inference(model: UNet | Ensemble, threads: int | None = None) -> DataParallel | Ensemble:
    """``model`` (as :func:`load_model` returns it) made ready to predict: every BatchNorm folded into
    the conv before it (:mod:`tinyunet.fold`), and every batch shared by ``threads`` CPU threads
    (:class:`DataParallel`; an ensemble's members one after the other, each on every thread)."""
    members = model.members if isinstance(model, Ensemble) else [model]
    for member in members:
        fold_batchnorm(member)
    parallel = [DataParallel(member, threads) for member in members]
    return Ensemble(parallel) if isinstance(model, Ensemble) else parallel[0]
