"""Image reconstruction metrics: MSE, PSNR, SSIM, label accuracy, Hungarian matching, and PNG grids.

Images are [B, C, H, W] tensors in [0, 1]. SSIM is Wang et al. (2004): an 11x11 Gaussian window (sigma 1.5),
K1 = 0.01, K2 = 0.03, statistics over 'valid' windows, averaged over positions and channels (their MATLAB code).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.nn import functional

from textleak.metrics.matching import hungarian_match


def mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image, [B]."""
    return ((x - y) ** 2).flatten(1).mean(dim=1)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image in dB, [B]; identical images give infinity."""
    return 10 * torch.log10(data_range**2 / mse(x, y))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """A normalised 2-D Gaussian window [size, size]."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    window = g[:, None] * g[None, :]
    return window / window.sum()


def ssim(
    x: torch.Tensor, y: torch.Tensor, *, data_range: float = 1.0, window: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """Structural similarity per image, [B]; the window shrinks (odd) for images smaller than it."""
    size = min(window, x.shape[-1], x.shape[-2])
    size -= 1 - size % 2
    channels = x.shape[1]
    kernel = gaussian_window(size, sigma).to(x.dtype if x.is_floating_point() else torch.float32)
    kernel = kernel.expand(channels, 1, size, size)
    x, y = x.to(kernel.dtype), y.to(kernel.dtype)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return functional.conv2d(t, kernel, groups=channels)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return index.flatten(1).mean(dim=1)


def label_accuracy(predicted: list[int], truth: list[int]) -> float:
    """Fraction of labels recovered as a multiset (order-free, as batch label recovery returns them)."""
    remaining = list(truth)
    hits = 0
    for label in predicted:
        if label in remaining:
            remaining.remove(label)
            hits += 1
    return hits / max(len(truth), 1)


def match_images(recon: torch.Tensor, truth: torch.Tensor) -> list[int]:
    """For each ground-truth image, the index of the reconstruction matched to it (Hungarian on PSNR)."""
    scores = torch.stack([psnr(recon, truth[j : j + 1].expand_as(recon)) for j in range(len(truth))], dim=1)
    scores = scores.clamp(max=1e6)  # identical images give inf; keep the assignment well defined
    pairs = hungarian_match(list(range(len(recon))), list(range(len(truth))), lambda i, j: float(scores[i, j]))
    return [i for i, _ in pairs]


def evaluate_images(
    recon: torch.Tensor,
    truth: torch.Tensor,
    *,
    recon_labels: list[int] | None = None,
    truth_labels: list[int] | None = None,
) -> dict[str, Any]:
    """Per-image and mean MSE/PSNR/SSIM after matching reconstructions to the truth, and label accuracy."""
    order = match_images(recon, truth)
    matched = recon[order].clamp(0, 1)
    per_psnr = [min(float(v), 100.0) for v in psnr(matched, truth)]  # cap at 100 dB so means stay finite
    result: dict[str, Any] = {
        "order": order,
        "mse": [float(v) for v in mse(matched, truth)],
        "psnr": per_psnr,
        "ssim": [float(v) for v in ssim(matched, truth)],
    }
    for key in ("mse", "psnr", "ssim"):
        result[f"mean_{key}"] = sum(result[key]) / len(result[key])
    if recon_labels is not None and truth_labels is not None:
        result["label_accuracy"] = label_accuracy(recon_labels, truth_labels)
    return result


def save_grid(
    truth: torch.Tensor, recon: torch.Tensor, path: str | Path, *, scale: int = 4, columns: int | None = None
) -> Path:
    """A PNG with the ground truth in the top row and the matched reconstructions below, upscaled ``scale`` x;
    with ``columns``, more images wrap into further (truth, reconstruction) row pairs of that many."""
    from PIL import Image

    rows = torch.stack([truth, recon.clamp(0, 1)])  # [2, B, C, H, W]
    _, batch, channels, height, width = rows.shape
    columns = min(columns or batch, batch)
    blocks = -(-batch // columns)
    pad = 2
    canvas = torch.ones(channels, 2 * blocks * (height + pad) + pad, columns * (width + pad) + pad)
    for b in range(batch):
        block, column = divmod(b, columns)
        for r in range(2):
            top, left = pad + (2 * block + r) * (height + pad), pad + column * (width + pad)
            canvas[:, top : top + height, left : left + width] = rows[r, b]
    array = (canvas.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    image = Image.fromarray(array[..., 0] if channels == 1 else array)
    image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
