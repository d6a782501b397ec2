"""Optimisation attacks on dummy input embeddings: DLG (L2), TAG (L2 + L1) and cosine (Inverting Gradients).

The attacks differ only in their distance and optimiser defaults; the dummy construction, the model call, the
loop and the decoding are shared. Dummy embeddings stand in for word-embedding rows at the non-special positions
(the tokenizer's [CLS]/[SEP]/[PAD] layout is fixed); when labels are unknown, soft labels are optimised too.

``device`` (default ``cpu``) is where the attacker optimises: the matching problem (a copy of the model, the target
gradients, the layout) moves there; the dummies are drawn on the CPU first, so a seed means the same start on every
device, and decoding runs on the CPU against the original table.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from textleak.attacks.base import Progress, Reconstruction, check_requirements
from textleak.attacks.decode import METRICS, allowed_tokens, nearest_tokens
from textleak.attacks.layout import LENGTH_MODES, Layout, resolve_lengths
from textleak.attacks.leakage import label_bag, labelled_slot_count, single_label
from textleak.attacks.loop import LoopConfig, match_gradients
from textleak.errors import CapabilityError
from textleak.models import LoadedModel
from textleak.tasks import task_loss
from textleak.update import Update

LABEL_MODES = ("auto", "known", "inferred", "unknown")
WORD_EMBEDDINGS = "word_embeddings.weight"


def l2_distance(dummy: Sequence[torch.Tensor], target: Sequence[torch.Tensor]) -> torch.Tensor:
    """DLG: squared Euclidean distance summed over all matched tensors."""
    return sum(((d - t) ** 2).sum() for d, t in zip(dummy, target, strict=True))  # type: ignore[return-value]


def tag_distance(alpha: float):  # noqa: ANN201 - returns a Distance
    """TAG: squared L2 plus ``alpha`` times L1, which weights the small entries of deep layers more."""

    def distance(dummy: Sequence[torch.Tensor], target: Sequence[torch.Tensor]) -> torch.Tensor:
        l1 = sum((d - t).abs().sum() for d, t in zip(dummy, target, strict=True))
        return l2_distance(dummy, target) + alpha * l1

    return distance


def cosine_distance(dummy: Sequence[torch.Tensor], target: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inverting Gradients: one minus the cosine similarity of the whole concatenated gradients."""
    dot = sum((d * t).sum() for d, t in zip(dummy, target, strict=True))
    dummy_norm = torch.sqrt(sum((d * d).sum() for d in dummy))  # type: ignore[arg-type]
    target_norm = torch.sqrt(sum((t * t).sum() for t in target))  # type: ignore[arg-type]
    return 1 - dot / (dummy_norm * target_norm).clamp_min(1e-30)


DISTANCES = ("l2", "tag", "cosine")


def check_device(device: str) -> torch.device:
    """The torch device a ``device`` option names; a clear ValueError if it is unknown or not usable here."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must name a torch device such as 'cpu' or 'cuda', got {device!r}") from error
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif resolved.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"device {device!r} requested but MPS is not available on this machine")
    elif resolved.type != "cpu":
        raise ValueError(f"device must be 'cpu', 'cuda[:N]' or 'mps', got {device!r}")
    return resolved


@dataclass(frozen=True, kw_only=True)
class TextAttackConfig(LoopConfig):
    """Options of the embedding-optimisation attacks; every option is recorded with the result."""

    distance: str = "l2"
    alpha: float = 0.01
    params: str = "no-word-embeddings"
    labels: str = "auto"
    length: str = "auto"
    decode: str = "cosine"
    candidates: tuple[int, ...] | None = None
    init_scale: float = 1.0
    device: str = "cpu"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, value, allowed in (
            ("distance", self.distance, DISTANCES),
            ("labels", self.labels, LABEL_MODES),
            ("length", self.length, LENGTH_MODES),
            ("decode", self.decode, METRICS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.alpha < 0 or self.init_scale <= 0:
            raise ValueError("alpha must be >= 0 and init_scale > 0")
        check_device(self.device)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def select_parameters(update: Update, model: torch.nn.Module, selection: str) -> list[str]:
    """Names of the gradients to match.

    ``no-word-embeddings`` (default): every sent gradient except the word-embedding table, whose lookup part
    cannot be imitated with continuous dummy embeddings. ``all``: every sent gradient. Otherwise a comma-separated
    list of substrings; a gradient is matched if its name contains any of them (e.g. ``layer.0.,layer.1.``).
    """
    params = dict(model.named_parameters())
    names = [n for n in update.gradients if n in params]
    if selection == "no-word-embeddings":
        chosen = [n for n in names if not n.endswith(WORD_EMBEDDINGS)]
    elif selection == "all":
        chosen = names
    else:
        parts = [p.strip() for p in selection.split(",") if p.strip()]
        chosen = [n for n in names if any(p in n for p in parts)]
    if not chosen:
        raise CapabilityError(f"parameter selection {selection!r} matches no gradient in the update")
    return chosen


@dataclass(frozen=True)
class LabelPlan:
    """How labels enter the dummy loss: fixed hard labels, or soft labels over ``classes`` (None = all)."""

    hard: torch.Tensor | None
    classes: torch.Tensor | None
    source: str
    slots: int | None = None  # mlm: estimated number of masked tokens (soft rows then include "not masked")


def soft_labels(
    logits: torch.Tensor, plan: LabelPlan, layout: Layout, task: str, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dummy label distributions (restricted to ``plan.classes`` when given) and the slots that count.

    all-tokens: special positions are labelled with their own (known) token, free positions softly.
    mlm: which positions were masked is unknown, so every free position gets a soft label; with an estimated
    masked count, each row has an extra "not masked" entry whose mass is dropped.
    """
    probs = logits.softmax(-1)
    if plan.slots is not None:
        probs = probs[..., :-1]
    if plan.classes is not None:
        full = torch.zeros(*probs.shape[:-1], num_classes, dtype=probs.dtype, device=probs.device)
        probs = full.scatter(-1, plan.classes.expand(*probs.shape[:-1], len(plan.classes)), probs)
    if task == "classification":
        return probs, None
    if task == "mlm":
        return probs, layout.free
    one_hot = torch.nn.functional.one_hot(layout.fixed_ids, num_classes).to(probs.dtype)
    return torch.where(layout.free[..., None], probs, one_hot), layout.attention_mask.bool()


@dataclass
class GradientProblem:
    """One update's matching problem: where tokens go, how labels enter, which gradients to match and their targets.

    ``loss`` and ``gradients`` take the full input embeddings (B, L, d) and the label leaves (empty for hard labels);
    ``params`` swaps in parameter tensors (``torch.func.functional_call``) so candidates can be scored under vmap.
    """

    model: torch.nn.Module
    task: str
    layout: Layout
    plan: LabelPlan
    names: list[str]
    matched: list[torch.Tensor]
    target: list[torch.Tensor]
    table: torch.Tensor
    fixed_embeds: torch.Tensor
    warnings: list[str]

    def to(self, device: str | torch.device) -> GradientProblem:
        """The same problem on ``device``: a copy of the model there, every tensor moved (itself if already there)."""
        device = torch.device(device)
        here = next(self.model.parameters()).device
        if here == device or (here.type == device.type and device.index is None and here.index in (None, 0)):
            return self
        model = copy.deepcopy(self.model).to(device)
        params = dict(model.named_parameters())
        layout = Layout(*(t.to(device) for t in (self.layout.fixed_ids, self.layout.free, self.layout.attention_mask)))
        plan = dataclasses.replace(
            self.plan,
            hard=None if self.plan.hard is None else self.plan.hard.to(device),
            classes=None if self.plan.classes is None else self.plan.classes.to(device),
        )
        table = model.get_input_embeddings().weight.detach()
        return dataclasses.replace(
            self,
            model=model,
            layout=layout,
            plan=plan,
            matched=[params[n] for n in self.names],
            target=[t.to(device) for t in self.target],
            table=table,
            fixed_embeds=table[layout.fixed_ids],
            warnings=list(self.warnings),
        )

    def embed(self, free_embeds: torch.Tensor) -> torch.Tensor:
        """Input embeddings: ``free_embeds`` at the free positions, the special tokens' rows elsewhere."""
        return torch.where(self.layout.free[..., None], free_embeds, self.fixed_embeds)

    def init_labels(self, generator: torch.Generator) -> list[torch.Tensor]:
        """Random soft-label logits when labels are not hard-coded (none otherwise)."""
        if self.plan.hard is not None:
            return []
        plan, (batch, seq_len) = self.plan, self.layout.fixed_ids.shape
        classes = self.model.config.num_labels if self.task == "classification" else self.table.shape[0]
        width = (classes if plan.classes is None else len(plan.classes)) + (plan.slots is not None)
        shape = (batch, width) if self.task == "classification" else (batch, seq_len, width)
        return [torch.randn(*shape, generator=generator)]

    def loss(
        self, embeds: torch.Tensor, label_leaves: Sequence[torch.Tensor], params: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The task loss of the dummy batch ``embeds`` under the label plan."""
        mask = self.layout.attention_mask
        kwargs = {"inputs_embeds": embeds, "attention_mask": mask, "token_type_ids": torch.zeros_like(mask)}
        if params is None:
            logits = self.model(**kwargs).logits
        else:
            logits = torch.func.functional_call(self.model, params, (), kwargs).logits
        if self.plan.hard is not None:
            return task_loss(logits, self.plan.hard)
        soft, label_mask = soft_labels(label_leaves[0], self.plan, self.layout, self.task, logits.shape[-1])
        return task_loss(logits, soft, label_mask, self.plan.slots)

    def gradients(
        self, embeds: torch.Tensor, label_leaves: Sequence[torch.Tensor], *, create_graph: bool = True
    ) -> Sequence[torch.Tensor]:
        """Gradients of the matched parameters for the dummy batch (differentiable when ``create_graph``)."""
        return torch.autograd.grad(self.loss(embeds, label_leaves), self.matched, create_graph=create_graph)


class OptimizationAttack:
    """Recover token embeddings (and soft labels) whose gradient matches the update, then decode them."""

    name: ClassVar[str] = "optimization"
    requires: ClassVar[tuple[str, ...]] = ("gradient_update",)
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options: Any) -> None:
        self.config = TextAttackConfig(**{**self.defaults, **options})
        self._check_device_support()

    def _check_device_support(self) -> None:
        """Only the shared ``reconstruct`` below moves the problem to ``device``; a subclass with its own refuses."""
        overridden = type(self).reconstruct is not OptimizationAttack.reconstruct
        if overridden and check_device(self.config.device).type != "cpu":
            raise ValueError(f"attack {self.name!r} runs on the CPU only; device={self.config.device!r} is unsupported")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    def prepare(self, update: Update, target: LoadedModel) -> GradientProblem:
        """The gradient-matching problem an update poses: layout, labels, matched gradients (shared with lamp)."""
        check_requirements(self.name, update, self.requires)
        self._check_device_support()  # also for subclasses with their own __init__
        config, model = self.config, target.model
        lengths, warnings = resolve_lengths(update, config.length)
        layout = Layout.build(target.tokenizer, lengths, update.metadata.seq_len)
        names = select_parameters(update, model, config.params)
        params = dict(model.named_parameters())
        table = model.get_input_embeddings().weight.detach()
        return GradientProblem(
            model=model,
            task=update.metadata.task,
            layout=layout,
            plan=self._label_plan(update),
            names=names,
            matched=[params[n] for n in names],
            target=[update.gradients[n].to(params[n].dtype) for n in names],
            table=table,
            fixed_embeds=table[layout.fixed_ids],
            warnings=warnings,
        )

    def reconstruct(self, update: Update, target: LoadedModel, *, progress: Progress | None = None) -> Reconstruction:
        config, tokenizer = self.config, target.tokenizer
        host = self.prepare(update, target)
        layout, table = host.layout, host.table
        problem = host.to(check_device(config.device))

        def init(generator: torch.Generator) -> list[torch.Tensor]:
            # drawn on the CPU whatever the device, so a seed means the same start everywhere
            scale = float(table.std()) * config.init_scale
            leaves = [
                torch.randn(*layout.fixed_ids.shape, table.shape[1], generator=generator) * scale,
                *host.init_labels(generator),
            ]
            return [leaf.to(problem.table.device) for leaf in leaves]

        def dummy_gradients(leaves: list[torch.Tensor]) -> Sequence[torch.Tensor]:
            return problem.gradients(problem.embed(leaves[0]), leaves[1:])

        result = match_gradients(
            init=init,
            dummy_gradients=dummy_gradients,
            target=problem.target,
            distance=self._distance(),
            config=config,
            progress=progress,
        )
        allowed = allowed_tokens(
            tokenizer, table.shape[0], candidates=config.candidates, allow_mask=problem.task == "mlm"
        )
        free_ids = nearest_tokens(result.leaves[0].cpu(), table, allowed, metric=config.decode)
        token_ids = layout.fill(free_ids)
        texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in token_ids]
        return Reconstruction(
            attack=self.name,
            token_ids=token_ids,
            texts=texts,
            loss_curve=result.curve,
            timings=result.timings(),
            config=config.to_dict(),
            warnings=problem.warnings + result.warnings,
            details={
                "final_distance": result.loss,
                "restart_distances": result.restart_losses,
                "matched_parameters": len(problem.names),
                "labels": problem.plan.source,
            },
        )

    def _distance(self):  # noqa: ANN202 - a Distance
        if self.config.distance == "tag":
            return tag_distance(self.config.alpha)
        return {"l2": l2_distance, "cosine": cosine_distance}[self.config.distance]

    def _label_plan(self, update: Update) -> LabelPlan:
        """Resolve the ``labels`` option: known (revealed), inferred (output-bias leak), or unknown (soft)."""
        mode, known = self.config.labels, update.metadata.knowledge.labels
        if mode == "known" and known is None:
            raise CapabilityError(f"attack {self.name!r}: labels='known' but the update does not reveal labels")
        if mode in ("known", "auto") and known is not None:
            return LabelPlan(torch.tensor(known, dtype=torch.long), None, "known")
        if mode in ("inferred", "auto"):
            single = single_label(update) if update.metadata.task == "classification" else None
            if single is not None and update.metadata.batch_size == 1:
                return LabelPlan(torch.tensor([single]), None, "inferred")
            bag = label_bag(update)
            if bag:
                slots = labelled_slot_count(update) if update.metadata.task == "mlm" else None
                return LabelPlan(None, torch.tensor(bag), "inferred", slots)
            if mode == "inferred":
                raise CapabilityError(f"attack {self.name!r}: labels cannot be inferred (no output-bias gradient)")
        return LabelPlan(None, None, "unknown")


class DLG(OptimizationAttack):
    """Deep Leakage from Gradients (Zhu et al. 2019): L2 gradient distance, L-BFGS with lr 1.

    Each iteration is one L-BFGS step of up to 20 evaluations, as in the paper's code; a strong-Wolfe line search
    is on by default because without it the step overshoots on BERT (set ``line_search=False`` for the original).
    """

    name = "dlg"
    defaults: ClassVar[dict[str, Any]] = {
        "distance": "l2",
        "optimizer": "lbfgs",
        "lr": 1.0,
        "line_search": True,
        "iterations": 50,
    }


class TAG(OptimizationAttack):
    """TAG (Deng et al. 2021): L2 + alpha * L1 distance, Adam, gradient clipping."""

    name = "tag"
    defaults: ClassVar[dict[str, Any]] = {
        "distance": "tag",
        "alpha": 0.01,
        "optimizer": "adam",
        "lr": 0.05,
        "grad_clip": 1.0,
        "iterations": 300,
    }


class CosineAttack(OptimizationAttack):
    """Inverting Gradients' distance (Geiping et al. 2020) on text: cosine, Adam, learning-rate drops."""

    name = "cosine"
    defaults: ClassVar[dict[str, Any]] = {
        "distance": "cosine",
        "optimizer": "adam",
        "lr": 0.05,
        "lr_drops": True,
        "iterations": 300,
    }
