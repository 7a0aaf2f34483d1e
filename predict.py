"""Turn a trained tinyunet model into a Kaggle submission, or score it on a labelled set (python predict.py --help).

    python predict.py                         # runs/<runs/latest>/best.npz on its own data's test/
    python predict.py --model runs/x/best.npz --data tgs-salt-identification-challenge.zip --tta
    python predict.py --evaluate --data held_out/   # score the labelled train/ part; no submission

The work is :func:`tinyunet.prediction.predict`; this file is its command line (:mod:`tinyunet.cli`),
the same as the ``tinyunet-predict`` command.

Mistakes a user can make (no model, a bad checkpoint or data folder, ``--gpu`` without a GPU, a flag
out of range, an output folder that cannot be written) end with one line ``error: ...`` on stderr
and exit status 2; ``--debug`` shows the traceback instead.
"""

import sys

from tinyunet.cli import predict_main

if __name__ == "__main__":
    sys.exit(predict_main())
