"""Image data sets from local folders (no downloads): MNIST idx files, CIFAR python batches, image-folder trees.

Every loader returns an ``ImageDataset`` whose images are float tensors in [0, 1], shaped [C, H, W]; the
per-data-set mean/std (``STATS``) is applied by the model, not here, so metrics compare pixels directly.
"""

from __future__ import annotations

import gzip
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from textleak.errors import TextleakError, unknown_name

#: (mean, std) per channel; MNIST and CIFAR as torchvision's examples use, LFW/folders centred at 0.5
STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "lfw": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm")


class DatasetError(TextleakError):
    """A data folder is missing or does not have the expected layout."""


@dataclass
class ImageDataset:
    """Labelled images read on demand: ``dataset[i]`` is ``(image [C, H, W] in [0, 1], label)``."""

    name: str
    labels: list[int]
    classes: list[str]
    read: Callable[[int], torch.Tensor]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is out of range for {self.name} ({len(self)} images)")
        return self.read(index), self.labels[index]

    def batch(self, start: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``size`` consecutive images from ``start`` (wrapping around) as [B, C, H, W] and labels [B]."""
        items = [self[(start + i) % len(self)] for i in range(size)]
        return torch.stack([image for image, _ in items]), torch.tensor([label for _, label in items])


def _from_array(name: str, images: np.ndarray, labels: list[int], classes: list[str]) -> ImageDataset:
    """A data set over uint8 images [N, C, H, W] held in memory."""
    return ImageDataset(name, labels, classes, lambda i: torch.from_numpy(images[i].astype(np.float32) / 255.0))


# --- MNIST idx -------------------------------------------------------------------------------------------------

MNIST_LAYOUT = "t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz] (or the train-* pair)"


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzip or raw): magic 0x0000 0x08 (uint8) <ndim>, big-endian int32 sizes, then the data."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetError(f"{path} is not a uint8 idx file (header {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    shape = tuple(int(s) for s in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DatasetError(f"{path} header says shape {shape} but holds {data.size} values (truncated?)")
    return data.reshape(shape)


def _find(root: Path, stem: str) -> Path | None:
    return next((p for p in (root / f"{stem}.gz", root / stem) if p.is_file()), None)


def load_mnist(root: str | Path, *, split: str = "test") -> ImageDataset:
    """MNIST from a folder holding the idx pair of ``split`` (``test`` = t10k, or ``train``)."""
    root = Path(root)
    prefix = "t10k" if split == "test" else "train"
    images_path, labels_path = _find(root, f"{prefix}-images-idx3-ubyte"), _find(root, f"{prefix}-labels-idx1-ubyte")
    if images_path is None or labels_path is None:
        raise DatasetError(f"no MNIST {split} files in {root}; expected {MNIST_LAYOUT}")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetError(f"MNIST files in {root} disagree: images {images.shape}, labels {labels.shape}")
    return _from_array("mnist", images[:, None], labels.tolist(), [str(d) for d in range(10)])


# --- CIFAR python batches ------------------------------------------------------------------------------------------

CIFAR_LAYOUT = {
    "cifar10": "cifar-10-batches-py/ with test_batch or data_batch_1..5 (+ batches.meta)",
    "cifar100": "cifar-100-python/ with test or train (+ meta)",
}


def _unpickle(path: Path) -> dict:
    # The CIFAR python batches exist only as pickles (torchvision's layout); we read them only from a local data
    # folder the user points at, a trusted data set. Untrusted inputs (update files) are never unpickled.
    try:
        with path.open("rb") as handle:
            return pickle.load(handle, encoding="bytes")  # noqa: S301
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise DatasetError(f"{path} is not a CIFAR python batch: {error}") from error


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def load_cifar(root: str | Path, *, name: str = "cifar10", split: str = "test") -> ImageDataset:
    """CIFAR-10/100 from torchvision's python batches; ``root`` may be the batches folder or its parent."""
    if name not in CIFAR_LAYOUT:
        raise unknown_name("CIFAR variant", name, CIFAR_LAYOUT)
    root = Path(root)
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder = folder if folder.is_dir() else root
    if name == "cifar10":
        files = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
        meta_file, label_key, names_key = "batches.meta", b"labels", b"label_names"
    else:
        files, meta_file, label_key, names_key = [split], "meta", b"fine_labels", b"fine_label_names"
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise DatasetError(f"no {name} {split} batch {missing[0]!r} in {folder}; expected {CIFAR_LAYOUT[name]}")
    arrays, labels = [], []
    for file in files:
        batch = _unpickle(folder / file)
        if b"data" not in batch or label_key not in batch:
            raise DatasetError(f"{folder / file} lacks {b'data'!r} or {label_key!r}; expected {CIFAR_LAYOUT[name]}")
        arrays.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(int(v) for v in batch[label_key])
    count = 10 if name == "cifar10" else 100
    classes = [str(i) for i in range(count)]
    if (folder / meta_file).is_file():
        classes = [_text(v) for v in _unpickle(folder / meta_file).get(names_key, classes)]
    return _from_array(name, np.concatenate(arrays), labels, classes)


# --- image folders (LFW, the CIFAR-10 JPEG copy, anything class/ or person/ shaped) --------------------------------

FOLDER_LAYOUT = "<root>/<class or person>/<image>.jpg|png (one sub-folder per label, sorted by name)"


def _read_image(path: Path, size: int | None, channels: int) -> torch.Tensor:
    try:
        from PIL import Image
    except ImportError as error:  # Pillow is needed only for image folders
        raise DatasetError("reading image folders needs Pillow: pip install pillow") from error
    with Image.open(path) as image:
        image = image.convert("L" if channels == 1 else "RGB")
        if size is not None and image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array)
    return tensor[None] if channels == 1 else tensor.permute(2, 0, 1).contiguous()


def load_image_folder(
    root: str | Path, *, name: str = "folder", size: int | None = None, channels: int = 3
) -> ImageDataset:
    """Images under one sub-folder per label; resized to ``size`` x ``size`` when given, read on demand."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist; expected {FOLDER_LAYOUT}")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    files: list[Path] = []
    labels: list[int] = []
    for label, folder in enumerate(class_dirs):
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        files.extend(images)
        labels.extend([label] * len(images))
    if not files:
        found = ", ".join(sorted(p.name for p in root.iterdir())[:5]) or "nothing"
        raise DatasetError(f"no images in sub-folders of {root} (found {found}); expected {FOLDER_LAYOUT}")
    return ImageDataset(name, labels, [p.name for p in class_dirs], lambda i: _read_image(files[i], size, channels))


def load_cifar10_any(root: str | Path, *, split: str = "test") -> ImageDataset:
    """CIFAR-10 from python batches if present, else from a JPEG copy (``<root>/test_jpeg/<class>/NNNN.jpg``)."""
    root = Path(root)
    for folder in (root, root / "cifar-10-batches-py"):
        if (folder / ("test_batch" if split == "test" else "data_batch_1")).is_file():
            return load_cifar(folder, name="cifar10", split=split)
    jpeg = root / f"{split}_jpeg"
    return load_image_folder(jpeg if jpeg.is_dir() else root, name="cifar10", size=32)


DATASETS: dict[str, Callable[[Path], ImageDataset]] = {
    "cifar10": load_cifar10_any,
    "cifar100": lambda root: load_cifar(root, name="cifar100"),
    "folder": lambda root: load_image_folder(root, size=32),
    "lfw": lambda root: load_image_folder(root, name="lfw", size=32),
    "mnist": load_mnist,
}


def load_dataset(name: str, root: str | Path) -> ImageDataset:
    """The test split of data set ``name`` read from ``root`` (LFW and folders resized to 32x32)."""
    if name not in DATASETS:
        raise unknown_name("image data set", name, DATASETS)
    return DATASETS[name](Path(root))
