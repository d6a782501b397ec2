"""textleak's image backend: local data sets, the inversion papers' models, an image client, attacks, metrics.

Registries are plain dicts: ``DATASETS`` (name -> loader), ``ARCHITECTURES`` (name -> model builder),
``IMAGE_ATTACKS`` (name -> attack class). Updates are ``textleak.update.Update`` objects, so textleak's
defenses and save/load apply unchanged.
"""

from image_support.attacks import IMAGE_ATTACKS, ImageAttackConfig, ImageReconstruction, recover_labels
from image_support.client import ImageTruth, capture_image_update
from image_support.datasets import DATASETS, STATS, DatasetError, ImageDataset, load_dataset
from image_support.metrics import evaluate_images, mse, psnr, save_grid, ssim
from image_support.models import ARCHITECTURES, ImageClassifier, image_source, load_image_model
from image_support.progress import SnapshotRecorder, save_progress

__all__ = [
    "ARCHITECTURES",
    "DATASETS",
    "IMAGE_ATTACKS",
    "STATS",
    "DatasetError",
    "ImageAttackConfig",
    "ImageClassifier",
    "ImageDataset",
    "ImageReconstruction",
    "ImageTruth",
    "SnapshotRecorder",
    "capture_image_update",
    "evaluate_images",
    "image_source",
    "load_dataset",
    "load_image_model",
    "mse",
    "psnr",
    "recover_labels",
    "save_grid",
    "save_progress",
    "ssim",
]
