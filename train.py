"""Train the U-Net: python train.py [--data PATH] [flags]; python train.py --help for every flag.

With no --data, ./data/tgs-salt-identification-challenge.zip or ./data/tgs-salt/ is used when present
(seed-recipe defaults); otherwise the built-in synthetic set, generated once into ./data/synthetic/,
with the QUICK defaults (a few minutes on a laptop CPU). Every flag overrides either set of defaults.

The work is :func:`tinyunet.training.train`; this file is its command line (:mod:`tinyunet.cli`), the same
as the ``tinyunet-train`` command.
"""

import sys

from tinyunet.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
