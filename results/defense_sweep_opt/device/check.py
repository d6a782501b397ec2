"""Device self-check: each optimisation attack runs on the device; time per iteration at B=1 and B=4 (no defense).

python check.py MODEL_FOLDER [DEVICE]   # DEVICE: cuda (default) or cpu
"""

import sys
import time

import torch

from textleak.attacks import get_attack
from textleak.data import read_cola
from textleak.defenses.client import defended_client
from textleak.models import load_model

torch.set_num_threads(1)
device = sys.argv[2] if len(sys.argv) > 2 else "cuda"
sentences, labels = read_cola(".devdata_text/cola/dev.tsv")
target = load_model(sys.argv[1], head="classification", seed=0)
for b in (1, 4):
    update, _ = defended_client(
        target, sentences[:b], task="classification", labels=labels[:b], seed=0, reveal=("lengths", "labels")
    )
    for name, iterations in (("tag", 30), ("cosine", 30), ("dlg", 3)):
        get_attack(name, iterations=2, device=device).reconstruct(update, target)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = get_attack(name, iterations=iterations, device=device).reconstruct(update, target)
        per = (time.perf_counter() - start) / iterations * 1000
        print(f"B={b} {name}: {per:.1f} ms/iteration ({iterations} its) {result.texts[0][:50]!r}", flush=True)
