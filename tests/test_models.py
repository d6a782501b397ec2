from pathlib import Path

import pytest
import torch

from textleak.errors import ModelLoadError
from textleak.models import RANDOM_SHAPES, load_model, load_source, packaged_model_path


def test_default_is_the_packaged_minilm_with_a_tied_mlm_head():
    loaded = load_model("default")
    config = loaded.model.config
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (384, 6, 30522)
    assert config._attn_implementation == "eager"
    assert not loaded.model.training
    decoder = loaded.model.get_output_embeddings().weight
    assert decoder.data_ptr() == loaded.model.get_input_embeddings().weight.data_ptr()
    assert loaded.tokenizer("hello world")["input_ids"] == [101, 7592, 2088, 102]
    # the encoder weights are the pretrained ones, not a fresh initialisation
    from safetensors.torch import load_file

    stored = load_file(str(packaged_model_path() / "model.safetensors"))
    key = next(k for k in stored if k.endswith("embeddings.word_embeddings.weight"))
    assert torch.equal(stored[key], loaded.model.get_input_embeddings().weight)


def test_random_shapes_are_seeded_and_sized():
    assert {"bert-tiny", "bert-base", "bert-large"} <= set(RANDOM_SHAPES)
    a = load_model("random:bert-tiny", seed=1)
    b = load_model("random:bert-tiny", seed=1)
    c = load_model("random:bert-tiny", seed=2)
    assert a.model.config.hidden_size == 128 and a.model.config.num_hidden_layers == 2
    wa, wb, wc = (m.model.bert.encoder.layer[0].attention.self.query.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert a.tokenizer.vocab_size == 30522


def test_load_source_rebuilds_the_same_weights():
    first = load_model("random:bert-tiny", head="classification", seed=3, num_labels=3)
    again = load_source(first.source)
    for (name, p), (_, q) in zip(first.model.named_parameters(), again.model.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_dropout_option_keeps_training_mode():
    assert load_model("random:bert-tiny", dropout=True).model.training


def test_local_folder_round_trip(tmp_path: Path):
    loaded = load_model("random:bert-tiny", seed=4)
    loaded.model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    again = load_model(str(tmp_path))
    assert torch.equal(
        loaded.model.bert.embeddings.word_embeddings.weight, again.model.bert.embeddings.word_embeddings.weight
    )


def test_bad_specs_raise_clear_errors(tmp_path: Path):
    with pytest.raises(ModelLoadError, match="unknown random model shape 'bert-huge'"):
        load_model("random:bert-huge")
    with pytest.raises(ModelLoadError, match="not a complete Hugging Face checkpoint"):
        load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="'nobody/no-such-model'.*local folder"):
        load_model("nobody/no-such-model")
    with pytest.raises(ValueError, match="unknown model head"):
        load_model("random:bert-tiny", head="span")
