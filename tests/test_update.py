from pathlib import Path

import pytest
import torch
from conftest import SENTENCE
from safetensors.torch import save_file

from textleak.client import simulate_client
from textleak.errors import UpdateFileError
from textleak.models import load_model
from textleak.update import Update


@pytest.fixture(scope="module")
def sent(tiny):
    return simulate_client(tiny, [SENTENCE, "hello there"], task="mlm", seed=1, reveal=("lengths", "labels"))


def test_round_trip_is_bit_exact(tmp_path: Path, tiny, sent):
    update, _ = sent
    path = update.save(tmp_path / "u.safetensors")
    loaded = Update.load(path, tiny.model)
    assert loaded.metadata == update.metadata
    assert loaded.gradients.keys() == update.gradients.keys()
    for name, tensor in update.gradients.items():
        assert torch.equal(loaded.gradients[name], tensor), name
        assert loaded.gradients[name].dtype == tensor.dtype


def test_file_from_another_model_names_the_mismatch(tmp_path: Path, sent):
    path = sent[0].save(tmp_path / "u.safetensors")
    other = load_model("random:bert-mini")
    with pytest.raises(
        UpdateFileError,
        match=r"has shape \(128,\) but the model expects \(256,\); the update was made with 'random:bert-tiny'",
    ):
        Update.load(path, other.model)


def test_unknown_tensor_name_is_named(tmp_path: Path, tiny, sent):
    update = sent[0]
    grads = dict(update.gradients)
    grads["bert.encoder.layer.7.output.dense.weight"] = torch.zeros(3)
    path = update.with_gradients(grads).save(tmp_path / "u.safetensors")
    with pytest.raises(UpdateFileError, match="'bert.encoder.layer.7.output.dense.weight' is not a parameter"):
        Update.load(path, tiny.model)


def test_truncated_file_is_refused(tmp_path: Path, sent):
    path = sent[0].save(tmp_path / "u.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UpdateFileError, match="could not read update file .*truncated"):
        Update.load(path)


def test_nan_gradient_is_refused_on_save_and_on_load(tmp_path: Path, sent):
    update = sent[0]
    grads = {name: t.clone() for name, t in update.gradients.items()}
    grads["bert.embeddings.LayerNorm.bias"][0] = float("nan")
    with pytest.raises(UpdateFileError, match="non-finite"):
        update.with_gradients(grads).save(tmp_path / "bad.safetensors")
    # a file written by someone else with a NaN inside
    save_file(grads, str(tmp_path / "bad.safetensors"), metadata={"textleak": update.metadata.to_json()})
    with pytest.raises(UpdateFileError, match="has 1 non-finite values"):
        Update.load(tmp_path / "bad.safetensors")


def test_file_without_metadata_or_missing_file(tmp_path: Path):
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(UpdateFileError, match="no 'textleak' metadata header"):
        Update.load(tmp_path / "plain.safetensors")
    with pytest.raises(UpdateFileError, match="does not exist"):
        Update.load(tmp_path / "missing.safetensors")
