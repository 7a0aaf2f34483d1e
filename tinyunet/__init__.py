"""tinyunet: a U-Net for binary segmentation written from scratch on NumPy (CuPy on a GPU)."""

__version__ = "0.1.0"
