"""Side channels that read facts straight off an update, with no optimisation.

Label leakage (iDLG, and its masked-LM form): the gradient of a cross-entropy output bias is
``sum_i (p_i - onehot(y_i)) / n`` over the n labelled slots. Its negative entries are the labels present, and
``-n * grad`` estimates how often each occurs when the model's predictions are spread out.
"""

from __future__ import annotations

import torch

from textleak.update import Update

MLM_BIAS_SUFFIXES = ("cls.predictions.bias", "cls.predictions.decoder.bias")
CLASSIFIER_BIAS_SUFFIX = "classifier.bias"


def output_bias_gradient(update: Update) -> torch.Tensor | None:
    """The gradient of the output layer's bias (MLM decoder or classifier), if the update carries it."""
    suffixes = (CLASSIFIER_BIAS_SUFFIX,) if update.metadata.task == "classification" else MLM_BIAS_SUFFIXES
    for name, tensor in update.gradients.items():
        if name.endswith(suffixes):
            return tensor
    return None


def label_bag(update: Update) -> list[int] | None:
    """Label ids present in the batch (sorted): the negative entries of the output-bias gradient.

    For ``all-tokens`` that is the bag of input tokens, for ``mlm`` the masked-out tokens, for
    ``classification`` the classes. None when the update has no output-bias gradient.
    """
    grad = output_bias_gradient(update)
    if grad is None:
        return None
    return sorted(int(i) for i in (grad < 0).nonzero().flatten())


def single_label(update: Update) -> int | None:
    """iDLG: with one labelled slot, the label is the only negative entry of the output-bias gradient."""
    grad = output_bias_gradient(update)
    if grad is None or int((grad < 0).sum()) != 1:
        return None
    return int(grad.argmin())


def labelled_slot_count(update: Update) -> int | None:
    """Estimate n, the number of labelled slots (e.g. masked tokens), from the output-bias gradient.

    A label that occurs once contributes about ``-1/n`` (less the model's small probability for it), so the
    smallest negative entry in magnitude gives n when at least one label is unique in the batch.
    """
    grad = output_bias_gradient(update)
    if grad is None or not (grad < 0).any():
        return None
    return max(1, round(1.0 / float(grad[grad < 0].abs().min())))
