"""The simulated victim: a training client that computes the update it would send for a batch of sentences.

The client returns ``(update, truth)``. The update is all an attacker sees; the truth is kept apart and only
the evaluator joins the two.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerBase

from textleak.models import LoadedModel
from textleak.tasks import IGNORE_INDEX, check_task, head_for, task_loss
from textleak.update import Knowledge, Update, UpdateMetadata

REVEALABLE = ("lengths", "labels")
_MAX_MASK_DRAWS = 100


@dataclass(frozen=True)
class ClientBatch:
    """Tensors of one training batch, exactly as the model consumes them."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor
    labels: torch.Tensor
    task: str

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def select(self, index: int) -> ClientBatch:
        """The one-example batch at ``index`` (per-example gradients for DP-SGD)."""
        part = slice(index, index + 1)
        return ClientBatch(
            self.input_ids[part], self.attention_mask[part], self.token_type_ids[part], self.labels[part], self.task
        )


@dataclass(frozen=True)
class GroundTruth:
    """What the client really trained on; for evaluation only, never given to an attack."""

    sentences: tuple[str, ...]
    input_ids: tuple[tuple[int, ...], ...]
    original_ids: tuple[tuple[int, ...], ...]
    labels: tuple[object, ...]


def encode_batch(
    tokenizer: PreTrainedTokenizerBase,
    sentences: Sequence[str],
    *,
    task: str,
    labels: Sequence[int] | None = None,
    seed: int = 0,
    max_length: int | None = None,
    mlm_probability: float = 0.15,
) -> tuple[ClientBatch, torch.Tensor]:
    """Tokenise (pad to the longest, truncate to ``max_length``) and build labels for ``task``.

    Returns the batch and the unmasked input ids. For ``mlm`` the standard Hugging Face collator masks 15% of
    tokens (80% [MASK], 10% random, 10% unchanged) with a seeded generator; a draw that masks nothing carries no
    gradient, so the client draws again from the same generator, as a trainer would skip an empty batch.
    """
    check_task(task)
    if not sentences:
        raise ValueError("the client needs at least one sentence")
    encoded = tokenizer(
        list(sentences),
        padding=True,
        truncation=True,
        max_length=max_length or tokenizer.model_max_length,
        return_tensors="pt",
        return_token_type_ids=True,
    )
    original = encoded["input_ids"]
    attention = encoded["attention_mask"]
    if task == "classification":
        label_list = [0] * len(sentences) if labels is None else list(labels)
        if len(label_list) != len(sentences):
            raise ValueError(f"got {len(label_list)} labels for {len(sentences)} sentences")
        batch_labels = torch.tensor(label_list, dtype=torch.long)
        inputs = original
    elif task == "all-tokens":
        batch_labels = original.masked_fill(attention == 0, IGNORE_INDEX)
        inputs = original
    else:
        inputs, batch_labels = _mask_tokens(tokenizer, original, seed, mlm_probability)
    batch = ClientBatch(inputs, attention, encoded["token_type_ids"], batch_labels, task)
    return batch, original


def _mask_tokens(
    tokenizer: PreTrainedTokenizerBase, original: torch.Tensor, seed: int, mlm_probability: float
) -> tuple[torch.Tensor, torch.Tensor]:
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability, seed=seed)
    collator.create_rng()  # the collator seeds lazily in __call__; we call its masking step directly
    special = torch.tensor(
        [tokenizer.get_special_tokens_mask(row, already_has_special_tokens=True) for row in original.tolist()],
        dtype=torch.bool,
    )
    for _ in range(_MAX_MASK_DRAWS):
        inputs, labels = collator.torch_mask_tokens(original.clone(), special_tokens_mask=special)
        if (labels != IGNORE_INDEX).any():
            return inputs, labels
    raise ValueError(f"MLM masking at p={mlm_probability} selected no token in {_MAX_MASK_DRAWS} draws")


def batch_loss(model: torch.nn.Module, batch: ClientBatch) -> torch.Tensor:
    """The training loss of ``batch`` under ``model`` (the same function the attacker imitates)."""
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, token_type_ids=batch.token_type_ids
    ).logits
    return task_loss(logits, batch.labels)


def batch_gradients(model: torch.nn.Module, batch: ClientBatch) -> dict[str, torch.Tensor]:
    """Gradients of the batch loss for every trainable parameter, without touching ``.grad`` on the model."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(batch_loss(model, batch), [p for _, p in named], allow_unused=True)
    return {name: (torch.zeros_like(p) if g is None else g.detach()) for (name, p), g in zip(named, grads, strict=True)}


def check_request(target: LoadedModel, task: str, reveal: Sequence[str]) -> None:
    """Refuse a client set-up that cannot run: unknown revealed facts, or a task the model's head cannot train."""
    unknown = set(reveal) - set(REVEALABLE)
    if unknown:
        raise ValueError(f"cannot reveal {sorted(unknown)}; revealable: {REVEALABLE}")
    if target.source.head != head_for(task):
        raise ValueError(
            f"task {task!r} trains a {head_for(task)} head but the model was loaded with head "
            f"{target.source.head!r}; load it with head={head_for(task)!r}"
        )


def package_update(
    target: LoadedModel,
    sentences: Sequence[str],
    batch: ClientBatch,
    original: torch.Tensor,
    gradients: dict[str, torch.Tensor],
    *,
    seed: int,
    reveal: Sequence[str],
) -> tuple[Update, GroundTruth]:
    """The update carrying ``gradients`` computed on ``batch`` (encoded from ``sentences``), and the ground truth."""
    lengths = tuple(int(n) for n in batch.attention_mask.sum(1))
    label_values = tuple(tuple(row) if isinstance(row, list) else row for row in batch.labels.tolist())
    knowledge = Knowledge(
        lengths=lengths if "lengths" in reveal else None,
        labels=label_values if "labels" in reveal else None,
    )
    metadata = UpdateMetadata(
        model=target.source,
        task=batch.task,
        batch_size=len(batch),
        seq_len=int(batch.input_ids.shape[1]),
        knowledge=knowledge,
        client_seed=seed,
    )
    truth = GroundTruth(
        sentences=tuple(sentences),
        input_ids=tuple(tuple(row[:n]) for row, n in zip(batch.input_ids.tolist(), lengths, strict=True)),
        original_ids=tuple(tuple(row[:n]) for row, n in zip(original.tolist(), lengths, strict=True)),
        labels=label_values,
    )
    return Update(gradients, metadata), truth


def encode_request(
    target: LoadedModel,
    sentences: Sequence[str],
    *,
    task: str,
    labels: Sequence[int] | None,
    seed: int,
    max_length: int | None,
    mlm_probability: float,
    reveal: Sequence[str],
) -> tuple[ClientBatch, torch.Tensor]:
    """Check a client request, then encode its batch: the first step of every client, defended or not."""
    check_request(target, task, reveal)
    return encode_batch(
        target.tokenizer,
        sentences,
        task=task,
        labels=labels,
        seed=seed,
        max_length=max_length,
        mlm_probability=mlm_probability,
    )


def simulate_client(
    target: LoadedModel,
    sentences: Sequence[str],
    *,
    task: str = "mlm",
    labels: Sequence[int] | None = None,
    seed: int = 0,
    max_length: int | None = None,
    mlm_probability: float = 0.15,
    reveal: Sequence[str] = ("lengths",),
) -> tuple[Update, GroundTruth]:
    """Compute the gradient update a client sends for ``sentences``, and the ground truth kept apart.

    ``reveal`` lists what the attacker is assumed to know besides the gradients: ``lengths`` and/or ``labels``.
    """
    batch, original = encode_request(
        target,
        sentences,
        task=task,
        labels=labels,
        seed=seed,
        max_length=max_length,
        mlm_probability=mlm_probability,
        reveal=reveal,
    )
    gradients = batch_gradients(target.model, batch)
    return package_update(target, sentences, batch, original, gradients, seed=seed, reveal=reveal)
