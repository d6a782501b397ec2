"""Image attacks: DLG, iDLG, Inverting Gradients (all on textleak's shared loop), the analytic FC inversion, labels.

Dummy images are optimised in the data set's normalised space, as in the papers (so learning rates and the
N(0, 1) initialisation mean the same); the model is fed ``mean + std * z`` and normalises it back. The box
constraint keeps ``z`` inside the normalised image of [0, 1]. Results are pixel images in [0, 1], on the CPU;
the optimisation runs on the model's device (the dummies are drawn on the CPU, so a seed means the same start).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional

from image_support.models import ImageClassifier
from image_support.progress import SnapshotRecorder
from textleak.attacks.base import Progress, check_requirements
from textleak.attacks.loop import LoopConfig, match_gradients
from textleak.attacks.optimization import cosine_distance, l2_distance
from textleak.errors import CapabilityError
from textleak.update import Update

DISTANCES = {"cosine": cosine_distance, "l2": l2_distance}
LABEL_MODES = ("auto", "known", "inferred", "soft")


@dataclass
class ImageReconstruction:
    """An image attack's answer: images [B, C, H, W] in [0, 1], labels, the optimisation curve and timings."""

    attack: str
    images: torch.Tensor
    labels: list[int]
    loss_curve: list[float] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields; the images are summarised by their shape (save them with ``save_grid``)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "images"}
        return {**data, "image_shape": list(self.images.shape)}


def _last_linear(model: ImageClassifier) -> tuple[str, nn.Linear]:
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise CapabilityError("label recovery needs a final linear layer; the model has none")
    return linears[-1]


def recover_labels(update: Update, model: ImageClassifier) -> list[int]:
    """Labels from the last layer's gradient (iDLG for one image; counts for a batch), sorted.

    With mean cross-entropy the bias gradient is ``mean_b softmax_b - counts / B``. One image: the only negative
    entry is its label. A batch: counts = B * (mean softmax - gradient), the mean softmax estimated from the model
    on random inputs (the attacker has the model), rounded to B labels by largest remainder.
    """
    name, layer = _last_linear(model)
    batch = update.metadata.batch_size
    if layer.bias is not None and f"{name}.bias" in update.gradients:
        signal = update.gradients[f"{name}.bias"].double()
    elif f"{name}.weight" in update.gradients and batch == 1:
        signal = update.gradients[f"{name}.weight"].double().sum(dim=1)  # features >= 0 after sigmoid/ReLU
    else:
        raise CapabilityError(f"label recovery needs the gradient of {name}.bias (or {name}.weight for one image)")
    if batch == 1:
        return [int(signal.argmin())]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        probe = model.mean + model.std * torch.randn(64, *model.shape, generator=generator).to(model.mean.device)
        mean_softmax = model(probe).softmax(dim=1).mean(dim=0).double().cpu()
    counts = (batch * (mean_softmax - signal)).clamp_min(0)
    whole = counts.floor()
    order = torch.argsort(counts - whole, descending=True).tolist()
    while whole.sum() < batch:
        whole[order.pop(0)] += 1
    while whole.sum() > batch:
        whole[int(torch.argmax(whole))] -= 1
    return sorted(c for c in range(len(whole)) for _ in range(int(whole[c])))


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels (Inverting Gradients' image prior)."""
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().mean()
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
    return dx + dy


def _flat_cosine(
    flat_target: torch.Tensor, target_norm: torch.Tensor
) -> Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor]], torch.Tensor]:
    """``cosine_distance`` against a fixed target, on the concatenated gradients (one dot product, one norm).

    The per-tensor sums of ``textleak``'s version launch a few kernels per parameter, forward and backward, which
    bounds an attack on a GPU by launch overhead; the value is the same up to summation order."""

    def distance(dummy: Sequence[torch.Tensor], target: Sequence[torch.Tensor]) -> torch.Tensor:
        flat = torch.cat([d.reshape(-1) for d in dummy])
        return 1 - (flat @ flat_target) / (flat.norm() * target_norm).clamp_min(1e-30)

    return distance


class _SignedGradient(torch.autograd.Function):
    """Identity whose backward passes the sign of the gradient: Inverting Gradients' signed Adam steps."""

    @staticmethod
    def forward(ctx: Any, leaf: torch.Tensor) -> torch.Tensor:
        return leaf.view_as(leaf)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.sign()


@dataclass(frozen=True, kw_only=True)
class ImageAttackConfig(LoopConfig):
    """Options of the optimisation attacks on images; recorded with every result."""

    distance: str = "l2"
    labels: str = "auto"
    tv: float = 0.0
    signed: bool = False
    box: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.distance not in DISTANCES:
            raise ValueError(f"distance must be one of {sorted(DISTANCES)}, got {self.distance!r}")
        if self.labels not in LABEL_MODES:
            raise ValueError(f"labels must be one of {LABEL_MODES}, got {self.labels!r}")
        if self.tv < 0:
            raise ValueError(f"tv must be >= 0, got {self.tv}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class GradientInversion:
    """Optimise dummy images (and soft labels) until their gradient matches the update's."""

    name: ClassVar[str] = "gradient-inversion"
    requires: ClassVar[tuple[str, ...]] = ("gradient_update",)
    defaults: ClassVar[dict[str, Any]] = {}
    auto_labels: ClassVar[str] = "soft"

    def __init__(self, **options: Any) -> None:
        self.config = ImageAttackConfig(**{**self.defaults, **options})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    def _labels(self, update: Update, model: ImageClassifier) -> tuple[torch.Tensor | None, str]:
        mode = self.config.labels
        if mode == "auto":
            mode = "known" if update.metadata.knowledge.labels is not None else self.auto_labels
        if mode == "known":
            if update.metadata.knowledge.labels is None:
                raise CapabilityError(f"attack {self.name!r} with labels='known': the update does not carry labels")
            return torch.tensor(update.metadata.knowledge.labels, dtype=torch.long), mode
        if mode == "inferred":
            return torch.tensor(recover_labels(update, model)), mode
        return None, mode

    def reconstruct(
        self,
        update: Update,
        model: ImageClassifier,
        *,
        progress: Progress | None = None,
        snapshots: SnapshotRecorder | None = None,
    ) -> ImageReconstruction:
        """Reconstruct the client's batch from ``update`` using the same ``model`` (on its device);
        ``snapshots`` records the reconstruction every few iterations."""
        check_requirements(self.name, update, self.requires)
        config = self.config
        device = model.mean.device
        hard, label_source = self._labels(update, model)
        params = dict(model.named_parameters())
        names = [n for n in update.gradients if n in params]
        matched = [params[n] for n in names]
        target = [update.gradients[n].to(device=device, dtype=params[n].dtype) for n in names]
        batch, classes = update.metadata.batch_size, _last_linear(model)[1].out_features
        low, high = (0 - model.mean) / model.std, (1 - model.mean) / model.std
        distance = DISTANCES[config.distance]
        if config.distance == "cosine":  # the same formula on one flat vector: a few kernels instead of hundreds
            flat_target = torch.cat([t.reshape(-1) for t in target])
            distance = _flat_cosine(flat_target, flat_target.norm())
        hard_on_device = hard.to(device) if hard is not None else None

        def to_image(z: torch.Tensor) -> torch.Tensor:
            return (model.mean + model.std * torch.maximum(torch.minimum(z, high), low)).clamp(0, 1)

        def init(generator: torch.Generator) -> list[torch.Tensor]:
            leaves = [torch.randn(batch, *model.shape, generator=generator).to(device)]
            if hard is None:
                leaves.append(torch.randn(batch, classes, generator=generator).to(device))
            return leaves

        def dummy_gradients(leaves: list[torch.Tensor]) -> Sequence[torch.Tensor]:
            if config.box:  # project the previous step back into the box before evaluating this one
                with torch.no_grad():
                    leaves[0].copy_(torch.maximum(torch.minimum(leaves[0], high), low))
            if snapshots is not None:
                snapshots.watch(leaves[0], to_image)
            z = _SignedGradient.apply(leaves[0]) if config.signed else leaves[0]
            labels = hard_on_device if hard_on_device is not None else leaves[1].softmax(dim=1)
            loss = functional.cross_entropy(model(model.mean + model.std * z), labels)
            grads = list(torch.autograd.grad(loss, matched, create_graph=True))
            # the prior rides along as one extra entry so a signed step sees the sign of the *total* gradient
            return [*grads, config.tv * total_variation(z)] if config.tv else grads

        def objective(dummy: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
            value = distance(dummy[: len(targets)], targets)
            return value + dummy[-1] if len(dummy) > len(targets) else value

        result = match_gradients(
            init=init,
            dummy_gradients=dummy_gradients,
            target=target,
            distance=objective,
            config=config,
            progress=snapshots.progress(progress) if snapshots is not None else progress,
        )
        labels = hard.tolist() if hard is not None else result.leaves[1].argmax(dim=1).tolist()
        return ImageReconstruction(
            attack=self.name,
            images=to_image(result.leaves[0]).detach().cpu(),
            labels=[int(v) for v in labels],
            loss_curve=result.curve,
            timings=result.timings(),
            config=config.to_dict(),
            warnings=result.warnings,
            details={
                "final_distance": result.loss,
                "restart_distances": result.restart_losses,
                "label_source": label_source,
                "matched_parameters": len(names),
            },
        )


class DLG(GradientInversion):
    """Deep Leakage from Gradients: squared L2 distance, L-BFGS (lr 1), dummy images and soft labels.

    The line search is on by default: without it the loop's L-BFGS overshot and stalled on some seeds.
    """

    name: ClassVar[str] = "dlg"
    defaults: ClassVar[dict[str, Any]] = {
        "distance": "l2",
        "optimizer": "lbfgs",
        "lr": 1.0,
        "iterations": 300,
        "line_search": True,
    }
    auto_labels: ClassVar[str] = "soft"


class IDLG(DLG):
    """iDLG: the label from the last layer's gradient sign, then DLG on the images only."""

    name: ClassVar[str] = "idlg"
    auto_labels: ClassVar[str] = "inferred"


class InvertingGradients(GradientInversion):
    """Geiping et al.: cosine distance + total variation, signed Adam, box constraint, LR drops, restarts."""

    name: ClassVar[str] = "inverting"
    defaults: ClassVar[dict[str, Any]] = {
        "distance": "cosine",
        "optimizer": "adam",
        "lr": 0.1,
        "iterations": 4800,
        "tv": 1e-4,
        "signed": True,
        "box": True,
        "lr_drops": True,
        "restarts": 1,
    }
    auto_labels: ClassVar[str] = "inferred"


class AnalyticFC:
    """Closed-form inversion of a first fully connected layer with bias: x = dL/dW_row / dL/db_row.

    Every row with a non-zero bias gradient gives a candidate: exactly the input when one image activated the row,
    a mixture otherwise. Candidates that agree with many others are pure; the B largest such groups are returned.
    """

    name: ClassVar[str] = "analytic-fc"
    requires: ClassVar[tuple[str, ...]] = ("gradient_update",)

    def __init__(self, *, tolerance: float = 1e-4) -> None:
        self.tolerance = tolerance

    def __repr__(self) -> str:
        return f"AnalyticFC(tolerance={self.tolerance})"

    def reconstruct(
        self,
        update: Update,
        model: ImageClassifier,
        *,
        progress: Progress | None = None,
        snapshots: SnapshotRecorder | None = None,
    ) -> ImageReconstruction:
        """Recover each image of the batch from the first layer's gradients; labels from the last layer.

        Closed form, so ``snapshots`` gets the answer alone, as iteration 0."""
        check_requirements(self.name, update, self.requires)
        start = time.perf_counter()
        name, layer = next((n, m) for n, m in model.named_modules() if any(True for _ in m.parameters(False)))
        flat = int(torch.tensor(model.shape).prod())
        if not isinstance(layer, nn.Linear) or layer.bias is None or layer.in_features != flat:
            raise CapabilityError(
                f"attack 'analytic-fc' needs a first fully connected layer with bias on the "
                f"flattened image ({flat} inputs); the model's first layer is {layer}"
            )
        if f"{name}.weight" not in update.gradients or f"{name}.bias" not in update.gradients:
            raise CapabilityError(f"attack 'analytic-fc' needs the gradients of {name}.weight and {name}.bias")
        grad_w = update.gradients[f"{name}.weight"].double()
        grad_b = update.gradients[f"{name}.bias"].double()
        rows = grad_b.abs() > grad_b.abs().max() * 1e-8
        candidates = grad_w[rows] / grad_b[rows, None]
        weights = grad_b[rows].abs()
        unit = functional.normalize(candidates, dim=1)
        agree = (unit @ unit.T) > 1 - self.tolerance
        chosen, taken = [], torch.zeros(len(candidates), dtype=torch.bool)
        for _ in range(update.metadata.batch_size):
            support = (agree & ~taken[None, :]).sum(dim=1).masked_fill(taken, -1)
            if int(support.max()) <= 0:
                break
            group = agree[int(support.argmax())] & ~taken
            chosen.append((candidates[group] * weights[group, None]).sum(0) / weights[group].sum())
            taken |= group
        warnings = (
            []
            if len(chosen) == update.metadata.batch_size
            else [f"only {len(chosen)} distinct inputs found for a batch of {update.metadata.batch_size}"]
        )
        z = torch.stack(chosen).float().view(-1, *model.shape)
        images = (z * model.std.cpu() + model.mean.cpu()).clamp(0, 1)
        if snapshots is not None:
            snapshots.watch(images, lambda x: x)
        return ImageReconstruction(
            attack=self.name,
            images=images,
            labels=recover_labels(update, model),
            timings={"total_s": time.perf_counter() - start},
            config={"tolerance": self.tolerance},
            warnings=warnings,
            details={"layer": name, "rows_used": int(rows.sum())},
        )


IMAGE_ATTACKS: dict[str, type] = {
    "analytic-fc": AnalyticFC,
    "dlg": DLG,
    "idlg": IDLG,
    "inverting": InvertingGradients,
}
