"""Device stand-in for the packaged MiniLM: the fp16-rounded weights upcast to /tmp/minilm (the real folder exceeds
the transfer limit)."""
from pathlib import Path


def get_model_path() -> Path:
    return Path("/tmp/minilm")
