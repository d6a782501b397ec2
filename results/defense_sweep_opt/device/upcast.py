"""Rebuild a float32 MiniLM folder from the fp16-rounded weights carried to the device (rounded, then upcast).

python upcast.py SRC_FOLDER DST_FOLDER   # SRC holds model_fp16.safetensors + config and tokenizer files
"""

import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(parents=True, exist_ok=True)
for file in src.iterdir():
    if file.name != "model_fp16.safetensors":
        shutil.copy(file, dst / file.name)
weights = load_file(src / "model_fp16.safetensors")
upcast = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
save_file(upcast, dst / "model.safetensors", metadata={"format": "pt"})
print("upcast", len(weights), "tensors to", dst)
