"""A Hugging Face causal language model from a local checkpoint folder as a prior (e.g. GPT-2, as LAMP uses).

When the folder holds a tokenizer, sequences are decoded with the attacked model's tokenizer and re-encoded with
the language model's own; without one, the language model must share the attacked tokenizer's ids (a model
trained on the same vocabulary), and [CLS]/[SEP] serve as its start and end markers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from textleak.errors import ModelLoadError


class CausalLMPrior:
    """Log-probabilities from a causal LM checkpoint folder (``AutoModelForCausalLM.from_pretrained``)."""

    def __init__(self, folder: str | Path, tokenizer: PreTrainedTokenizerBase, *, batch_size: int = 32) -> None:
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelLoadError(f"causal-LM prior: {folder} is not a checkpoint folder")
        try:
            self.model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"causal-LM prior: cannot load a causal LM from {folder}: {error}") from error
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.own_tokenizer = _own_tokenizer(folder)
        if self.own_tokenizer is None and self.model.config.vocab_size < len(tokenizer):
            raise ModelLoadError(
                f"causal-LM prior: {folder} has no tokenizer and its vocabulary ({self.model.config.vocab_size}) is "
                f"smaller than the attacked tokenizer's ({len(tokenizer)}); it cannot score these token ids"
            )
        self.folder = folder

    def __repr__(self) -> str:
        mode = "own tokenizer" if self.own_tokenizer is not None else "shared ids"
        return f"CausalLMPrior({str(self.folder)!r}, {mode})"

    def _encode(self, sequence: Sequence[int]) -> list[int]:
        """Token ids for the language model, framed by its start and end markers."""
        if self.own_tokenizer is None:
            return [self.tokenizer.cls_token_id, *(int(t) for t in sequence), self.tokenizer.sep_token_id]
        own = self.own_tokenizer
        text = self.tokenizer.decode(list(sequence), skip_special_tokens=True)
        start = own.bos_token_id if own.bos_token_id is not None else own.eos_token_id
        end = own.eos_token_id if own.eos_token_id is not None else start
        return [start, *own(text, add_special_tokens=False)["input_ids"], end]

    @torch.no_grad()
    def score(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """Log-probability of each sequence's tokens and end marker given its start marker."""
        out = []
        for first in range(0, len(sequences), self.batch_size):
            encoded = [self._encode(s) for s in sequences[first : first + self.batch_size]]
            width = max(len(e) for e in encoded)
            ids = torch.zeros(len(encoded), width, dtype=torch.long)
            mask = torch.zeros(len(encoded), width, dtype=torch.long)
            for row, tokens in enumerate(encoded):
                ids[row, : len(tokens)] = torch.tensor(tokens)
                mask[row, : len(tokens)] = 1
            logits = self.model(input_ids=ids, attention_mask=mask).logits.to(torch.float64)
            logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
            out.append((logp * mask[:, 1:]).sum(-1))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def _own_tokenizer(folder: Path) -> PreTrainedTokenizerBase | None:
    """The folder's tokenizer, or None when it holds no tokenizer files."""
    if not any((folder / name).is_file() for name in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        return None
    return AutoTokenizer.from_pretrained(str(folder))
