"""Evaluation harness from a script: the same code and options as ``textleak evaluate``.

    python scripts/evaluate.py --data cola --data-root ../shared/data/text --models random:bert-tiny \
        --attacks span tag:iterations=5 --sentences 2 --out results/smoke
"""

from __future__ import annotations

import sys

from textleak.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
