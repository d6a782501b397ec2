"""Score a batch of reconstructions against the private batch (LAMP/DAGER protocol)."""

from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from textleak.metrics.matching import hungarian_match
from textleak.metrics.rouge import rouge
from textleak.metrics.tokens import bag_of_tokens, exact_match, token_accuracy

METRIC_NAMES = (
    "token_accuracy",
    "bag_precision",
    "bag_recall",
    "bag_f1",
    "rouge1",
    "rouge2",
    "rougeL",
    "exact_match",
)


class Tokenizer(Protocol):
    """The slice of a Hugging Face tokenizer that scoring needs."""

    pad_token_id: int | None
    all_special_ids: list[int]

    def decode(self, token_ids: list[int], **kwargs: Any) -> str: ...


@dataclass(frozen=True)
class BatchScores:
    """Batch means per variant, plus the matched pairs of the without_special variant."""

    with_special: dict[str, float]
    without_special: dict[str, float]
    pairs: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable copy."""
        return asdict(self)


def _strip(batch: Sequence[Sequence[int]], drop: set[int]) -> list[list[int]]:
    return [[int(t) for t in ids if int(t) not in drop] for ids in batch]


def _decode(tokenizer: Tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _score_variant(
    preds: list[list[int]], refs: list[list[int]], tokenizer: Tokenizer
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Hungarian-match on ROUGE-1 F, then score each pair.

    Means are taken over references: a reference left without a prediction
    (fewer predictions than references) leaked nothing and counts as 0.
    """
    pred_texts = [_decode(tokenizer, ids) for ids in preds]
    ref_texts = [_decode(tokenizer, ids) for ids in refs]
    table = [[rouge(p, r) for r in ref_texts] for p in pred_texts]
    matches = hungarian_match(range(len(preds)), range(len(refs)), lambda i, j: table[i][j]["rouge1"])
    pairs = []
    for i, j in matches:
        bag = bag_of_tokens(preds[i], refs[j])
        pairs.append(
            {
                "pred_index": i,
                "ref_index": j,
                "pred_text": pred_texts[i],
                "ref_text": ref_texts[j],
                "token_accuracy": token_accuracy(preds[i], refs[j]),
                "bag_precision": bag["precision"],
                "bag_recall": bag["recall"],
                "bag_f1": bag["f1"],
                "rouge1": table[i][j]["rouge1"],
                "rouge2": table[i][j]["rouge2"],
                "rougeL": table[i][j]["rougeL"],
                "exact_match": exact_match(preds[i], refs[j]),
            }
        )
    means = {name: sum(pair[name] for pair in pairs) / len(refs) for name in METRIC_NAMES}
    return means, pairs


def score_batch(
    pred_ids: Sequence[Sequence[int]],
    ref_ids: Sequence[Sequence[int]],
    tokenizer: Tokenizer,
    *,
    special_ids: Collection[int] | None = None,
    pad_id: int | None = None,
) -> BatchScores:
    """Score reconstructed id sequences against the reference batch.

    ``with_special`` keeps [CLS]/[SEP]/... in the text, as LAMP/DAGER report
    (ROUGE then credits the words "cls"/"sep"); ``without_special`` drops every
    id in ``special_ids`` (default ``tokenizer.all_special_ids``). Pad ids
    (default ``tokenizer.pad_token_id``) are dropped in both variants.
    """
    if not ref_ids:
        raise ValueError("score_batch: the reference batch is empty")
    pad = tokenizer.pad_token_id if pad_id is None else pad_id
    pad_drop = set() if pad is None else {int(pad)}
    specials = tokenizer.all_special_ids if special_ids is None else special_ids
    special_drop = pad_drop | {int(t) for t in specials}

    variants = {}
    for name, drop in (("with_special", pad_drop), ("without_special", special_drop)):
        refs = _strip(ref_ids, drop)
        empty = [j for j, ids in enumerate(refs) if not ids]
        if empty:
            raise ValueError(
                f"score_batch ({name}): references {empty} are empty once pad/special ids are removed"
            )
        variants[name] = _score_variant(_strip(pred_ids, drop), refs, tokenizer)
    return BatchScores(
        with_special=variants["with_special"][0],
        without_special=variants["without_special"][0],
        pairs=variants["without_special"][1],
    )
