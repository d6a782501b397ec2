"""Optimisation progress of an image attack: snapshots of the reconstruction every N iterations, saved as a PNG
strip (one column per snapshot, the truth last) and an animated GIF (truth above, reconstruction below).

The shared loop (``textleak.attacks.loop``) only reports ``progress(done, total)``; the attack hands the recorder
its current dummy tensor each time it evaluates the dummies (``watch``), and the recorder copies it out when the
progress callback says a multiple of ``every`` iterations is done. Nothing in the loop changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from textleak.attacks.base import Progress

if TYPE_CHECKING:
    from PIL.Image import Image

ToImage = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SnapshotRecorder:
    """Keeps the reconstruction ([B, C, H, W] in [0, 1], on the CPU) at iteration 0, every ``every`` iterations
    and at the last one; ``steps[i]`` is the iteration count of ``frames[i]`` (counted over all restarts)."""

    every: int
    frames: list[torch.Tensor] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    _leaf: torch.Tensor | None = field(default=None, repr=False)
    _to_image: ToImage | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"snapshot interval must be >= 1, got {self.every}")

    def watch(self, leaf: torch.Tensor, to_image: ToImage) -> None:
        """The attack's current dummy tensor and how to turn it into pixels; the first call records iteration 0."""
        self._leaf, self._to_image = leaf, to_image
        if not self.frames:
            self.capture(0)

    def capture(self, step: int) -> None:
        """Copy the watched reconstruction out now, as iteration ``step``."""
        if self._leaf is None or self._to_image is None:
            return
        with torch.no_grad():
            self.frames.append(self._to_image(self._leaf.detach()).float().cpu().clone())
        self.steps.append(step)

    def step(self, done: int, total: int) -> None:
        """Progress callback: snapshot after every ``every``-th iteration and after the last."""
        if (done % self.every == 0 or done == total) and (not self.steps or self.steps[-1] != done):
            self.capture(done)

    def progress(self, inner: Progress | None = None) -> Progress:
        """A progress callback that records snapshots, then calls ``inner`` (if any)."""

        def callback(done: int, total: int) -> None:
            self.step(done, total)
            if inner is not None:
                inner(done, total)

        return callback

    def reorder(self, order: list[int]) -> None:
        """Reorder the batch in every frame (``order`` from ``evaluate_images``, matching the truth)."""
        self.frames = [frame[order] for frame in self.frames]


def _label(image: Image, text: str, xy: tuple[int, int], fill: int | tuple[int, ...]) -> None:
    from PIL import ImageDraw

    ImageDraw.Draw(image).text(xy, text, fill=fill)


def _tile(images: torch.Tensor, rows: int, cols: int, pad: int) -> torch.Tensor:
    """[rows * cols, C, H, W] -> one [C, H', W'] canvas, row-major, white padding."""
    _, channels, height, width = images.shape
    canvas = torch.ones(channels, rows * (height + pad) + pad, cols * (width + pad) + pad)
    for k, image in enumerate(images):
        top, left = pad + (k // cols) * (height + pad), pad + (k % cols) * (width + pad)
        canvas[:, top : top + height, left : left + width] = image.clamp(0, 1)
    return canvas


def _to_pil(canvas: torch.Tensor, scale: int) -> Image:
    from PIL import Image as PILImage

    array = (canvas.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    image = PILImage.fromarray(array[..., 0] if canvas.shape[0] == 1 else array)
    return image.resize((image.width * scale, image.height * scale), PILImage.Resampling.NEAREST)


def save_progress(
    recorder: SnapshotRecorder,
    stem: str | Path,
    *,
    truth: torch.Tensor | None = None,
    scale: int = 3,
    gif: bool = True,
    frame_ms: int = 250,
) -> list[Path]:
    """Write ``<stem>.png`` (a strip: one row per image of the batch, one column per snapshot, labelled with its
    iteration, the truth as the last column) and, with ``gif``, ``<stem>.gif`` (one frame per snapshot: the truth
    above, the reconstruction below, a bar showing how far the optimisation is). Needs Pillow."""
    from PIL import Image as PILImage

    if not recorder.frames:
        raise ValueError("no snapshots were recorded")
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    pad, band = 2, 12  # band: pixels (after scaling) for the iteration labels
    frames = torch.stack(recorder.frames)  # [T, B, C, H, W]
    count, batch, channels, height, width = frames.shape
    columns = frames.transpose(0, 1)  # [B, T, ...]: one row per image
    if truth is not None:
        columns = torch.cat([columns, truth[:, None].float().cpu()], dim=1)
    strip = _to_pil(_tile(columns.reshape(-1, channels, height, width), batch, columns.shape[1], pad), scale)
    mode = "L" if channels == 1 else "RGB"
    white = 255 if channels == 1 else (255, 255, 255)
    black = 0 if channels == 1 else (0, 0, 0)
    labelled = PILImage.new(mode, (strip.width, strip.height + band), white)
    labelled.paste(strip, (0, band))
    names = [str(s) for s in recorder.steps] + (["truth"] if truth is not None else [])
    for k, name in enumerate(names):
        _label(labelled, name, ((pad + k * (width + pad)) * scale, 0), black)
    paths = [stem.with_suffix(".png")]
    labelled.save(paths[0])
    if gif:
        total = max(recorder.steps[-1], 1)
        images = []
        for frame, step in zip(recorder.frames, recorder.steps, strict=True):
            rows = torch.cat([truth.float().cpu(), frame]) if truth is not None else frame
            grid = _to_pil(_tile(rows, 2 if truth is not None else 1, batch, pad), scale)
            image = PILImage.new(mode, (grid.width, grid.height + band + 4), white)
            image.paste(grid, (0, 0))
            bar = round(grid.width * step / total)  # also keeps consecutive frames distinct (GIF merges equal ones)
            if bar:
                image.paste(black, (0, image.height - 3, bar, image.height))
            _label(image, f"iter {step}", (2, grid.height), black)
            images.append(image)
        paths.append(stem.with_suffix(".gif"))
        durations = [frame_ms] * (len(images) - 1) + [frame_ms * 6]
        images[0].save(paths[1], save_all=True, append_images=images[1:], duration=durations, loop=0)
    return paths
