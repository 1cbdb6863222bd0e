"""``python -m mtbert.compare RUN_DIR...``: the comparison of runs (mtbert/report/compare.py).
An entry point beside ``train.py``, so the command users type stays short."""

import sys

from mtbert.report.compare import main

if __name__ == "__main__":
    sys.exit(main())
