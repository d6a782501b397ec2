"""Image classifiers of the gradient-inversion papers, built from a spec like ``"image:lenet:mnist"``.

A spec names the architecture and the input: a known data set (its shape, classes and mean/std) or ``CxHxW``.
Every model takes images in [0, 1] and normalises them itself (mean/std are buffers, not parameters), so attacks
optimise in pixel space and the box constraint is simply [0, 1]. Weights come from a seeded initialisation or a
state-dict file read with ``torch.load(weights_only=True)`` (never unpickled code).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from image_support.datasets import STATS
from textleak.errors import ModelLoadError, unknown_name
from textleak.models import ModelSource

PREFIX = "image:"
#: input shape and number of classes of each known data set
SHAPES: dict[str, tuple[tuple[int, int, int], int]] = {
    "mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
    "cifar100": ((3, 32, 32), 100),
    "lfw": ((3, 32, 32), 50),
}


class LeNet(nn.Module):
    """DLG's LeNet: three strided 5x5 convolutions with sigmoid (twice differentiable everywhere), one linear."""

    def __init__(self, channels: int, size: int, classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 12, 5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, padding=2, stride=1),
            nn.Sigmoid(),
        )
        side = (size + 1) // 2
        side = (side + 1) // 2
        self.fc = nn.Linear(12 * side * side, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


class ConvNet(nn.Module):
    """A plain ReLU ConvNet (Inverting Gradients' baseline family) without batch norm, ``width`` channels wide."""

    def __init__(self, channels: int, size: int, classes: int, width: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
        )
        self.fc = nn.Linear(4 * width * 16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


class BasicBlock(nn.Module):
    """ResNet basic block; the shortcut is a 1x1 convolution when the shape changes (option B)."""

    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride=stride, bias=False), nn.BatchNorm2d(outputs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """He et al.'s CIFAR ResNet (6n+2 layers: 16/32/64 channels); n=3 is ResNet-20, n=5 ResNet-32."""

    def __init__(self, channels: int, classes: int, blocks: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        layers: list[nn.Module] = []
        inputs = 16
        for stage, outputs in enumerate((16, 32, 64)):
            for block in range(blocks):
                layers.append(BasicBlock(inputs, outputs, 2 if stage > 0 and block == 0 else 1))
                inputs = outputs
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(torch.relu(self.bn(self.conv(x))))
        return self.fc(out.mean(dim=(2, 3)))


class MLP(nn.Module):
    """Flatten, a fully connected layer with bias (what ``analytic-fc`` inverts), ReLU, a linear classifier."""

    def __init__(self, channels: int, size: int, classes: int, hidden: int = 128) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels * size * size, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


ARCHITECTURES: dict[str, Callable[[int, int, int], nn.Module]] = {
    "convnet": ConvNet,
    "lenet": LeNet,
    "mlp": MLP,
    "resnet20": lambda c, s, k: ResNet(c, k, 3),
    "resnet32": lambda c, s, k: ResNet(c, k, 5),
}


class ImageClassifier(nn.Module):
    """A network with its input normalisation; takes [B, C, H, W] images in [0, 1] and returns logits."""

    def __init__(self, net: nn.Module, shape: tuple[int, int, int], mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.net = net
        self.shape = shape
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images - self.mean) / self.std)


@dataclass(frozen=True)
class ImageSpec:
    """A parsed spec: architecture, input shape, classes, normalisation, optional weights file."""

    arch: str
    shape: tuple[int, int, int]
    classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    weights: Path | None


def parse_spec(spec: str, num_labels: int | None = None) -> ImageSpec:
    """``image:<arch>:<dataset or CxHxW>[@weights.pt]``; ``num_labels`` overrides the data set's class count."""
    body, _, weights = spec.removeprefix(PREFIX).partition("@")
    arch, _, data = body.partition(":")
    if not spec.startswith(PREFIX) or not data:
        raise ModelLoadError(
            f"image model spec must look like 'image:lenet:mnist' or 'image:mlp:3x32x32', got {spec!r}"
        )
    if arch not in ARCHITECTURES:
        raise unknown_name("image architecture", arch, ARCHITECTURES)
    if data in SHAPES:
        shape, classes = SHAPES[data]
        mean, std = STATS[data]
    else:
        try:
            c, h, w = (int(p) for p in data.split("x"))
        except ValueError as error:
            raise ModelLoadError(f"input {data!r} in {spec!r} is neither {sorted(SHAPES)} nor CxHxW") from error
        if h != w:
            raise ModelLoadError(f"image models take square inputs, got {data!r} in {spec!r}")
        shape, classes = (c, h, w), 10
        mean, std = (0.5,) * c, (0.5,) * c
    return ImageSpec(arch, shape, num_labels or classes, mean, std, Path(weights) if weights else None)


def _dlg_init(module: nn.Module) -> None:
    """DLG's initialisation: every weight and bias uniform in [-0.5, 0.5] (larger gradients, easier matching)."""
    for param in module.parameters():
        nn.init.uniform_(param, -0.5, 0.5)


def image_source(
    arch: str, data: str, *, seed: int = 0, num_labels: int | None = None, weights: str | Path | None = None
) -> ModelSource:
    """The ``ModelSource`` of an image model: spec ``image:<arch>:<data>``, head ``classification``."""
    spec = f"{PREFIX}{arch}:{data}" + (f"@{weights}" if weights else "")
    parsed = parse_spec(spec, num_labels)
    return ModelSource(spec=spec, head="classification", seed=seed, num_labels=parsed.classes, dropout=False)


def load_image_model(source: ModelSource) -> ImageClassifier:
    """Build the model a source describes: seeded init (DLG's uniform init for LeNet), or its state-dict file.

    The model is returned in eval mode (batch norm uses its running statistics, as in the inversion papers).
    """
    spec = parse_spec(source.spec, source.num_labels)
    channels, size, _ = spec.shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(source.seed)
        net = ARCHITECTURES[spec.arch](channels, size, spec.classes)
        if spec.arch == "lenet":
            _dlg_init(net)
    model = ImageClassifier(net, spec.shape, spec.mean, spec.std)
    if spec.weights is not None:
        if not spec.weights.is_file():
            raise ModelLoadError(f"weights file {spec.weights} does not exist")
        try:
            state = torch.load(spec.weights, map_location="cpu", weights_only=True)
            model.net.load_state_dict(state)
        except (RuntimeError, OSError) as error:
            raise ModelLoadError(f"could not load {spec.weights} into {spec.arch}: {error}") from error
    return model.eval()
