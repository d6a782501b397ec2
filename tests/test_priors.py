"""Language priors: the n-gram model we train (normalised, saved without pickle) and a local causal-LM folder."""

import pytest
import torch
from conftest import SENTENCE

from textleak.errors import ModelLoadError, UnknownNameError
from textleak.priors import CausalLMPrior, NgramPrior, load_prior, mean_negative_log_prob, train_ngram

TEXT = "\n".join(
    [
        "the cat sat on the mat.",
        "the dog sat on the rug.",
        "a cat and a dog sat together.",
        "",
        "the mat was red and the rug was blue.",
    ]
)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "small.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def ngram(text_file, tiny):
    return train_ngram(text_file, tiny.tokenizer, order=3)


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_conditional_probabilities_sum_to_one(ngram, tiny):
    histories = [[], ids(tiny.tokenizer, "the"), ids(tiny.tokenizer, "the cat"), ids(tiny.tokenizer, "zebra piano")]
    for history in histories:
        dist = ngram.distribution(history)
        assert dist.shape == (len(tiny.tokenizer),) and bool((dist > 0).all())
        assert float(dist.sum()) == pytest.approx(1.0, abs=1e-9)
        for token in (*ids(tiny.tokenizer, "cat sat mat zebra"), tiny.tokenizer.sep_token_id):
            assert ngram.probability(token, history) == pytest.approx(float(dist[token]), rel=1e-12)
    # a sequence's score is the sum of its conditional log-probabilities, end marker included
    sentence = ids(tiny.tokenizer, SENTENCE)
    tokens = [*sentence, tiny.tokenizer.sep_token_id]
    manual = sum(torch.log(ngram.distribution(tokens[:i])[t]).item() for i, t in enumerate(tokens))
    assert float(ngram.score([sentence])[0]) == pytest.approx(manual, rel=1e-9)


def test_ngram_prefers_the_order_it_was_trained_on(ngram, tiny):
    good = ids(tiny.tokenizer, SENTENCE)
    shuffled = [good[i] for i in (3, 1, 0, 5, 2, 4, 6)]
    scores = ngram.score([good, shuffled])
    assert scores[0] > scores[1] + 5
    assert mean_negative_log_prob(ngram, [good]).item() == pytest.approx(-scores[0].item() / (len(good) + 1))


def test_ngram_save_load_round_trip(ngram, tiny, tmp_path):
    path = ngram.save(tmp_path / "prior.safetensors")
    assert path.read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle
    loaded = load_prior(f"ngram:{path}", tiny.tokenizer)
    assert isinstance(loaded, NgramPrior) and loaded.counts == ngram.counts and loaded.discounts == ngram.discounts
    sequences = [ids(tiny.tokenizer, SENTENCE), ids(tiny.tokenizer, "mat the blue")]
    assert torch.equal(loaded.score(sequences), ngram.score(sequences))
    (tmp_path / "bad.safetensors").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="could not read n-gram model"):
        NgramPrior.load(tmp_path / "bad.safetensors")


def test_prior_specs_are_checked(tiny, text_file, tmp_path):
    with pytest.raises(UnknownNameError, match="unknown prior 'bigram'; known: causal-lm, ngram, ngram-train"):
        load_prior("bigram:x.txt", tiny.tokenizer)
    with pytest.raises(ValueError, match="needs an argument"):
        load_prior("ngram-train", tiny.tokenizer)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prior(f"ngram:{tmp_path / 'missing.safetensors'}", tiny.tokenizer)
    assert isinstance(load_prior(f"ngram-train:{text_file}", tiny.tokenizer), NgramPrior)


def test_causal_lm_prior_from_a_local_folder(tiny, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tiny.tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt")
    prior = load_prior(f"causal-lm:{tmp_path / 'gpt'}", tiny.tokenizer)
    assert isinstance(prior, CausalLMPrior) and prior.own_tokenizer is None
    sequences = [ids(tiny.tokenizer, SENTENCE), ids(tiny.tokenizer, "hello")]
    scores = prior.score(sequences)
    framed = [tiny.tokenizer.cls_token_id, *sequences[1], tiny.tokenizer.sep_token_id]
    with torch.no_grad():
        logits = prior.model(input_ids=torch.tensor([framed])).logits[0].double()
    manual = sum(logits[i].log_softmax(-1)[framed[i + 1]].item() for i in range(len(framed) - 1))
    assert scores.shape == (2,) and bool((scores < 0).all())
    assert float(scores[1]) == pytest.approx(manual, rel=1e-6)  # padding in the batch changes nothing
    with pytest.raises(ModelLoadError, match="not a checkpoint folder"):
        load_prior(f"causal-lm:{tmp_path / 'nothing'}", tiny.tokenizer)
