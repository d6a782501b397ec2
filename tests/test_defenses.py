"""textleak.defenses: each defense's defining property, checked against a slow, obviously-correct reference."""

import copy
import math
from pathlib import Path

import pytest
import torch
from conftest import load_script

from textleak.attacks import get_attack
from textleak.client import batch_gradients, encode_batch, simulate_client
from textleak.data import read_cola
from textleak.defenses import (
    DEFENSES,
    DPSGD,
    FedAvg,
    Freeze,
    Noise,
    Prune,
    Quantize,
    RandomMask,
    SecureAggregation,
    aggregate,
    apply_defense,
    parse_defense,
)
from textleak.defenses.accountant import dp_epsilon, sampled_gaussian_rdp
from textleak.defenses.client import defended_client, text_training_data
from textleak.defenses.dpsgd import clip_and_sum, global_norm, per_example_gradients
from textleak.defenses.quantization import int8_round_trip
from textleak.defenses.utility import fine_tune, gradient_fidelity, update_fidelity
from textleak.errors import CapabilityError, UnknownNameError
from textleak.evaluation.sources import load_benchmark
from textleak.models import load_model
from textleak.update import Update

SENTENCES = ["the cat sat on the mat", "a dog barked loudly today"]


@pytest.fixture(scope="module")
def mlm_model():
    return load_model("random:bert-tiny")


@pytest.fixture(scope="module")
def cls_model():
    return load_model("random:bert-tiny", head="classification")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- noise -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("distribution", ["gaussian", "laplace"])
def test_noise_has_requested_standard_deviation(distribution):
    zeros = {"w": torch.zeros(1000, 1000)}
    noise = Noise(sigma=0.01, distribution=distribution)(zeros, gen())["w"]
    assert noise.std().item() == pytest.approx(0.01, rel=0.01)
    assert abs(noise.mean().item()) < 1e-4
    # excess kurtosis tells the two apart: 0 for a Gaussian, 3 for a Laplace distribution
    kurtosis = ((noise / noise.std()) ** 4).mean().item() - 3
    assert kurtosis == pytest.approx(0.0 if distribution == "gaussian" else 3.0, abs=0.1)


def test_relative_noise_scales_with_each_tensor():
    grads = {"big": 5 * torch.randn(1000, 1000, generator=gen(1)), "small": 1e-3 * torch.randn(1000, 1000)}
    noisy = Noise(sigma=0.1, relative=True)(grads, gen())
    for name, tensor in grads.items():
        rms = tensor.norm().item() / math.sqrt(tensor.numel())
        assert (noisy[name] - tensor).std().item() == pytest.approx(0.1 * rms, rel=0.01)


def test_noise_is_seeded():
    grads = {"w": torch.zeros(10)}
    assert torch.equal(Noise(sigma=1.0)(grads, gen(3))["w"], Noise(sigma=1.0)(grads, gen(3))["w"])
    assert not torch.equal(Noise(sigma=1.0)(grads, gen(3))["w"], Noise(sigma=1.0)(grads, gen(4))["w"])


# ---- pruning and masking -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.0, 0.2, 0.9, 0.99, 1.0])
def test_pruning_keeps_exactly_the_top_fraction(ratio):
    tensor = torch.randn(40, 25, generator=gen(2))
    pruned = Prune(ratio=ratio)({"w": tensor}, gen())["w"]
    keep = 1000 - round(ratio * 1000)
    assert int((pruned != 0).sum()) == keep
    survivors = tensor.abs().reshape(-1).sort(descending=True).values[:keep]
    assert torch.equal(pruned.abs().reshape(-1).sort(descending=True).values[:keep], survivors)
    assert torch.equal(pruned[pruned != 0], tensor[pruned != 0])


def test_random_mask_keeps_a_seeded_random_subset():
    tensor = torch.randn(1000, generator=gen(2))
    first = RandomMask(ratio=0.3)({"w": tensor}, gen(0))["w"]
    assert int((first != 0).sum()) == 700
    assert torch.equal(first[first != 0], tensor[first != 0])
    assert torch.equal(first, RandomMask(ratio=0.3)({"w": tensor}, gen(0))["w"])
    assert not torch.equal(first, RandomMask(ratio=0.3)({"w": tensor}, gen(1))["w"])


# ---- quantization ------------------------------------------------------------------------------------------------


def test_int8_round_trip_error_is_at_most_half_a_step():
    tensor = torch.randn(10000, generator=gen(5)) * 1e-3
    restored, scale = int8_round_trip(tensor)
    assert scale == pytest.approx(tensor.abs().max().item() / 127)
    assert (restored - tensor).abs().max().item() <= scale / 2 * (1 + 1e-5)
    assert len(torch.unique(restored)) <= 255
    assert torch.equal(int8_round_trip(torch.zeros(3))[0], torch.zeros(3))


@pytest.mark.parametrize(("dtype", "torch_dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_round_trip(dtype, torch_dtype):
    tensor = torch.randn(100, generator=gen())
    out = Quantize(dtype=dtype)({"w": tensor}, gen())["w"]
    assert out.dtype == torch.float32
    assert torch.equal(out, tensor.to(torch_dtype).float())


# ---- freezing ----------------------------------------------------------------------------------------------------


def test_frozen_parameters_are_absent(mlm_model):
    freeze = "freeze:patterns=word_embeddings,first_layers=1"
    update, _ = defended_client(mlm_model, SENTENCES, task="all-tokens", defenses=[freeze])
    clean, _ = simulate_client(mlm_model, SENTENCES, task="all-tokens")
    names = set(update.gradients)
    assert not any("word_embeddings" in n or ".layer.0." in n for n in names)
    assert any(".layer.1." in n for n in names)
    assert names == {n for n in clean.gradients if not Freeze(first_layers=1).is_frozen(n)}
    for name in names:
        assert torch.equal(update.gradients[name], clean.gradients[name])


# ---- DP-SGD ------------------------------------------------------------------------------------------------------


def slow_clipped_sum(model, batch, clip):
    """Reference: a plain loop, one batch_gradients call per example, clipped by hand."""
    total = None
    for i in range(len(batch)):
        grads = batch_gradients(model, batch.select(i))
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))
        factor = min(1.0, clip / (norm + 1e-6))
        scaled = {n: g * factor for n, g in grads.items()}
        total = scaled if total is None else {n: total[n] + scaled[n] for n in total}
    return total


def test_dpsgd_clips_each_example_and_matches_a_slow_loop(cls_model):
    batch, _ = encode_batch(cls_model.tokenizer, SENTENCES + ["birds fly"], task="classification", labels=[0, 1, 1])
    data = text_training_data(batch)
    per_example = per_example_gradients(cls_model.model, data)
    clip = 0.5 * min(global_norm(g) for g in per_example)  # every example gets clipped
    summed, norms = clip_and_sum(per_example, clip)
    for grads, norm in zip(per_example, norms, strict=True):
        assert global_norm({n: g * min(1.0, clip / (norm + 1e-6)) for n, g in grads.items()}) <= clip
    reference = slow_clipped_sum(cls_model.model, batch, clip)
    step = DPSGD(sigma=0.0, clip=clip)(cls_model.model, data, gen())
    for name in reference:
        torch.testing.assert_close(summed[name], reference[name], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(step[name], reference[name] / 3, rtol=1e-5, atol=1e-9)


def test_dpsgd_without_clipping_or_noise_is_the_batch_gradient(cls_model):
    batch, _ = encode_batch(cls_model.tokenizer, SENTENCES, task="classification", labels=[0, 1])
    step = DPSGD(sigma=0.0, clip=1e9)(cls_model.model, text_training_data(batch), gen())
    reference = batch_gradients(cls_model.model, batch)
    scale = max(float(g.abs().max()) for g in reference.values())
    for name, grad in reference.items():
        torch.testing.assert_close(step[name], grad, rtol=1e-4, atol=1e-4 * scale)


def test_dpsgd_noise_is_sigma_clip_over_batch(cls_model):
    batch, _ = encode_batch(cls_model.tokenizer, SENTENCES, task="classification", labels=[0, 1])
    data = text_training_data(batch)
    clean = DPSGD(sigma=0.0, clip=0.1)(cls_model.model, data, gen())
    noisy = DPSGD(sigma=2.0, clip=0.1)(cls_model.model, data, gen())
    noise = torch.cat([(noisy[n] - clean[n]).reshape(-1) for n in clean])
    assert noise.std().item() == pytest.approx(2.0 * 0.1 / 2, rel=0.01)


def test_accountant_matches_opacus_and_the_closed_form():
    # figures printed by Opacus 1.6.0's RDP accountant (opacus.accountants.analysis.rdp) for the same inputs
    for rate, sigma, steps, expected in [
        (256 / 60000, 1.1, 60 * 235, 2.6003429386103023),
        (0.01, 1.0, 1000, 2.1013652716430564),
        (1.0, 1.0, 1, 4.728507067217623),
        (0.1, 0.5, 10, 14.418327009829337),
    ]:
        assert dp_epsilon(sample_rate=rate, sigma=sigma, steps=steps, delta=1e-5)[0] == pytest.approx(expected)
    assert sampled_gaussian_rdp(1.0, 2.0, 8) == pytest.approx(8 / (2 * 4))
    assert (
        dp_epsilon(sample_rate=0.01, sigma=1.0, steps=10, delta=1e-5)[0]
        < dp_epsilon(sample_rate=0.01, sigma=1.0, steps=100, delta=1e-5)[0]
    )


def test_dpsgd_records_its_privacy(mlm_model):
    update, _ = defended_client(mlm_model, SENTENCES, defenses=["dpsgd:sigma=1.1,sample_rate=0.01,steps=100"])
    record = update.metadata.defenses[0]
    assert record["name"] == "dpsgd" and record["clip"] == 1.0
    assert record["epsilon"] == pytest.approx(dp_epsilon(sample_rate=0.01, sigma=1.1, steps=100, delta=1e-5)[0])
    assert DPSGD(sigma=0.0).record()["epsilon"] is None


# ---- FedAvg ------------------------------------------------------------------------------------------------------


def test_fedavg_delta_equals_manual_sgd_steps(mlm_model):
    before = {n: p.detach().clone() for n, p in mlm_model.model.named_parameters()}
    update, _ = defended_client(mlm_model, SENTENCES, task="all-tokens", defenses=[FedAvg(steps=3, lr=0.5)])
    batch, _ = encode_batch(mlm_model.tokenizer, SENTENCES, task="all-tokens")
    local = copy.deepcopy(mlm_model.model)
    for _ in range(3):
        grads = batch_gradients(local, batch)
        with torch.no_grad():
            for name, p in local.named_parameters():
                p -= 0.5 * grads[name]
    for name, p in local.named_parameters():
        torch.testing.assert_close(update.gradients[name], p.detach() - before[name], rtol=1e-5, atol=1e-7)
    assert update.metadata.kind == "delta"
    assert update.metadata.local_hyperparams == {"lr": 0.5, "steps": 3}
    for name, p in mlm_model.model.named_parameters():  # the client's own model is not changed
        assert torch.equal(p, before[name])


def test_one_step_fedavg_is_minus_lr_times_the_gradient(mlm_model):
    # MLM: the procedure must train on the very mask of the clean update and the ground truth
    clean, truth = defended_client(mlm_model, SENTENCES, seed=5)
    delta, delta_truth = defended_client(mlm_model, SENTENCES, defenses=["fedavg:steps=1,lr=0.1"], seed=5)
    assert delta_truth == truth
    fidelity = update_fidelity(clean, delta)
    assert fidelity["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert fidelity["relative_error"] < 1e-4


# ---- secure aggregation ------------------------------------------------------------------------------------------


def test_secure_aggregation_is_the_sum_of_the_clients(mlm_model):
    sentences = [*SENTENCES, "birds fly south", "it rained all day long"]
    update, truth = defended_client(
        mlm_model, sentences, task="all-tokens", defenses=["secure-aggregation:clients=2"], seed=3
    )
    first, _ = simulate_client(mlm_model, sentences[:2], task="all-tokens", seed=3)
    second, _ = simulate_client(mlm_model, sentences[2:], task="all-tokens", seed=4)
    for name, grad in update.gradients.items():
        torch.testing.assert_close(grad, first.gradients[name] + second.gradients[name])
    assert update.metadata.batch_size == 4
    assert update.metadata.knowledge.lengths == first.metadata.knowledge.lengths + second.metadata.knowledge.lengths
    assert truth.sentences == tuple(sentences)
    assert update.metadata.defenses[-1]["client_batch_sizes"] == [2, 2]


def test_aggregate_refuses_mismatched_updates(mlm_model):
    clean, _ = simulate_client(mlm_model, SENTENCES)
    delta, _ = defended_client(mlm_model, SENTENCES, defenses=["fedavg"])
    with pytest.raises(ValueError, match="different kind"):
        aggregate([clean, delta])


# ---- bad parameters and specs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("noise:sigma=-1", "option sigma must be >= 0.0, got -1.0"),
        ("prune:ratio=1.5", r"option ratio must be in \[0.0, 1.0\], got 1.5"),
        ("mask:ratio=-0.1", "option ratio must be in"),
        ("quantize:dtype=int4", "option dtype must be one of"),
        ("noise:sigma=1,scale=2", "unknown option 'scale' for defense 'noise'; known: sigma, relative, distribution"),
        ("noise:relative=maybe,sigma=1", "option relative expects true or false, got 'maybe'"),
        ("prune:ratio=lots", "option ratio expects a float, got 'lots'"),
        ("dpsgd:sigma=1,clip=0", "option clip must be > 0"),
        ("fedavg:steps=0", "option steps must be >= 1"),
        ("freeze:patterns=(", "invalid regular expression"),
        ("prune:0.9", "expected option=value"),
    ],
)
def test_bad_options_raise_clear_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_defense(spec)


def test_unknown_defense_lists_the_known_ones():
    with pytest.raises(UnknownNameError) as error:
        parse_defense("pruning:ratio=0.5")
    assert str(error.value) == f"unknown defense 'pruning'; known: {', '.join(sorted(DEFENSES))}"


def test_specs_parse_to_typed_configs():
    assert parse_defense("prune:ratio=0.9") == Prune(ratio=0.9)
    assert parse_defense("noise:sigma=1e-3,relative=true") == Noise(sigma=1e-3, relative=True)
    assert parse_defense("freeze:patterns=word_embeddings+position,first_layers=2") == Freeze(
        patterns=("word_embeddings", "position"), first_layers=2
    )
    assert parse_defense("secure-aggregation:clients=4") == SecureAggregation(clients=4)


@pytest.mark.parametrize(
    ("defenses", "message"),
    [
        (["prune:ratio=0.5", "dpsgd:sigma=1"], "must come first"),
        (["dpsgd:sigma=1", "fedavg"], "at most one client procedure"),
        (["secure-aggregation", "prune:ratio=0.5"], "must come last"),
    ],
)
def test_impossible_orders_are_refused(mlm_model, defenses, message):
    with pytest.raises(ValueError, match=message):
        defended_client(mlm_model, SENTENCES, defenses=defenses)


# ---- defended updates: records, files, attacks -------------------------------------------------------------------


def test_defenses_apply_in_order_and_survive_a_file(mlm_model, tmp_path):
    update, _ = defended_client(mlm_model, SENTENCES, defenses=["prune:ratio=0.5", "quantize:dtype=int8"])
    assert [d["name"] for d in update.metadata.defenses] == ["prune", "quantize"]
    loaded = Update.load(update.save(tmp_path / "u.safetensors"), mlm_model.model)
    assert [d["name"] for d in loaded.metadata.defenses] == ["prune", "quantize"]
    again, _ = defended_client(mlm_model, SENTENCES, defenses=["noise:sigma=0.1"], seed=7)
    same, _ = defended_client(mlm_model, SENTENCES, defenses=["noise:sigma=0.1"], seed=7)
    assert all(torch.equal(again.gradients[n], same.gradients[n]) for n in again.gradients)


@pytest.mark.parametrize(
    "defenses",
    [["prune:ratio=0.9"], ["freeze:patterns=word_embeddings"], ["dpsgd:sigma=0.1"], ["secure-aggregation:clients=2"]],
)
def test_attack_runs_on_defended_updates(mlm_model, defenses):
    update, _ = defended_client(mlm_model, SENTENCES, task="all-tokens", defenses=defenses)
    result = get_attack("cosine", iterations=3).reconstruct(update, mlm_model)
    assert len(result.token_ids) == 2
    assert [len(ids) for ids in result.token_ids] == list(update.metadata.knowledge.lengths)


def test_attack_refuses_a_fedavg_delta_clearly(mlm_model):
    update, _ = defended_client(mlm_model, SENTENCES, task="all-tokens", defenses=["fedavg:steps=2"])
    with pytest.raises(CapabilityError, match="the update is a delta, not a single gradient"):
        get_attack("cosine", iterations=3).reconstruct(update, mlm_model)


# ---- utility -----------------------------------------------------------------------------------------------------


def test_gradient_fidelity():
    clean = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([0.0, 4.0])}
    assert gradient_fidelity(clean, clean) == {"cosine": 1.0, "relative_error": 0.0, "sent_fraction": 1.0}
    dropped = gradient_fidelity(clean, {"a": clean["a"]})
    assert dropped["cosine"] == pytest.approx(3 / 5)
    assert dropped["relative_error"] == pytest.approx(4 / 5)
    assert dropped["sent_fraction"] == 0.5


COLA = Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "cola"
COLA_TRAIN, COLA_DEV = COLA / "train.tsv", COLA / "dev.tsv"


@pytest.mark.skipif(not (COLA_TRAIN.exists() and COLA_DEV.exists()), reason="CoLA is not in ../shared/data")
def test_fine_tune_runs_a_few_steps_with_and_without_a_defense():
    paths = {"train": read_cola(COLA_TRAIN), "evaluation": read_cola(COLA_DEV)}
    clean = fine_tune(steps=3, batch_size=4, eval_size=16, **paths)
    defended = fine_tune(steps=3, batch_size=4, eval_size=16, defenses=["prune:ratio=0.9"], **paths)
    assert len(clean.losses) == 3 and 0 <= clean.eval_accuracy <= 1
    assert defended.defenses == [{"name": "prune", "ratio": 0.9}]
    assert clean.losses[0] == defended.losses[0]  # same seed, same first batch and weights
    assert clean.losses[1:] != defended.losses[1:]


def test_fine_tune_data_come_in_sst2_and_cola_layouts(tmp_path: Path):
    for name, text in (
        ("sst2", "sentence\tlabel\na fine film \t1\ndull and slow\t0\nwarm , funny\t1\nflat\t0\n"),
        ("cola", "gj04\t1\t\tThe cat sat.\ngj04\t0\t*\tCat the sat.\n"),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train.tsv").write_text(text)
    sst2, cola = (load_benchmark(name, tmp_path, split="train") for name in ("sst2", "cola"))
    assert (sst2.sentences, sst2.labels) == (("a fine film", "dull and slow", "warm , funny", "flat"), (1, 0, 1, 0))
    assert (cola.sentences, cola.labels) == (("The cat sat.", "Cat the sat."), (1, 0))
    (tmp_path / "bad" / "sst2").mkdir(parents=True)
    (tmp_path / "bad" / "sst2" / "train.tsv").write_text("sentence\tlabel\nno label here\n")
    with pytest.raises(ValueError, match=r"train.tsv \(row 1\): label None is not an integer"):
        load_benchmark("sst2", tmp_path / "bad", split="train")
    pairs = (sst2.sentences, sst2.labels)
    result = fine_tune(steps=2, batch_size=2, eval_size=4, lr=1e-3, train=pairs, evaluation=pairs)
    assert len(result.losses) == 2 and result.majority_accuracy == 0.5
    assert result.eval_accuracy in (0, 0.25, 0.5, 0.75, 1)
    with pytest.raises(ValueError, match="non-empty training and evaluation sentences"):
        fine_tune(steps=2, train=((), ()), evaluation=pairs)


def test_secure_aggregation_is_not_a_per_client_defense(mlm_model):
    update, _ = simulate_client(mlm_model, SENTENCES)
    with pytest.raises(TypeError, match="use textleak.defenses.aggregate"):
        apply_defense(update, SecureAggregation(clients=2), gen())


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_every_defense_has_a_json_ready_default_config(mlm_model, name, tmp_path):
    defense = DEFENSES[name]()
    assert parse_defense(name) == defense
    update, _ = defended_client(mlm_model, SENTENCES, task="all-tokens", defenses=[defense])
    assert update.metadata.defenses[-1]["name"] == name
    assert Update.load(update.save(tmp_path / "u.safetensors"), mlm_model.model).metadata.defenses[-1]["name"] == name


def test_dpsgd_on_mlm_tolerates_an_example_with_nothing_masked(mlm_model):
    # "hi" alone is rarely masked at p=0.15; its example then contributes a zero gradient instead of NaN
    sentences = ["hi", "the quick brown fox jumps over the lazy dog again and again"]
    for seed in range(3):
        update, _ = defended_client(mlm_model, sentences, defenses=["dpsgd:sigma=0"], seed=seed)
        assert all(torch.isfinite(g).all() for g in update.gradients.values())
        assert 0 < global_norm(update.gradients) <= 1.0  # the mean of two clipped gradients


def _sweep_module():
    return load_script("sweep_defenses")


def test_sweep_shards_and_orders_cover_every_item_once():
    import argparse

    sweep = _sweep_module()
    configs = [("none", 0.0, []), ("noise", 1e-3, ["noise:sigma=0.001"]), ("secure-aggregation", 4, ["x"])]

    def items(order: str, shard: tuple[int, int], steps: int = 0) -> list[tuple]:
        args = argparse.Namespace(
            fine_tune_steps=steps, sentences=4, batch_sizes=[1, 2], attacks=["tag", "dlg"], order=order,
            shard_index=shard[0], shard_count=shard[1],
        )  # fmt: skip
        return sweep.work_items(args, configs)

    whole = items("config", (0, 1), steps=10)
    assert len(whole) == 3 + 2 * (4 + 2) * 2 + (4 + 2) * 2 - 2 * (4 + 2)  # secure-aggregation:4 needs B >= 4
    assert sorted(map(str, items("batch", (0, 1), steps=10))) == sorted(map(str, whole))
    shards = [items("batch", (k, 3), steps=10) for k in range(3)]
    assert sorted(map(str, sum(shards, []))) == sorted(map(str, whole))
    first = items("batch", (0, 1))[: 2 * 2 * 2]  # batch-major: every (setting, size) on batch 0 comes first
    assert {(i[1][0], i[2], i[3]) for i in first} == {(c, b, 0) for c in ("none", "noise") for b in (1, 2)}
    assert sweep.parse_shard("1/3") == (1, 3)
    with pytest.raises(SystemExit):
        sweep.parse_shard("3/3")
    assert sweep.parse_value("30") == 30 and sweep.parse_value("1e-3") == 1e-3 and sweep.parse_value("true") is True
    assert sweep.attack_options("tag", 5, "cuda", ["lr=0.1"]) == {"iterations": 5, "device": "cuda", "lr": 0.1}
    assert sweep.attack_options("span", None, "cuda", []) == {}


def test_sweep_claims_are_exclusive_and_merge_skips_known_rows(tmp_path):
    sweep = _sweep_module()
    key = ("attack", "m", "classification", "noise", 0.001, "tag", 1, 0)
    assert sweep.claim(tmp_path / "claims", key) and not sweep.claim(tmp_path / "claims", key)
    assert sweep.claim(None, key)
    row = dict(zip(sweep.KEY_FIELDS, key, strict=True)) | {"rouge1": 0.5}
    other = {**row, "batch_index": 1}
    for name, rows in (("a.jsonl", [row]), ("b.jsonl", [row, other])):
        for r in rows:
            sweep.append_row(tmp_path / name, r)
    assert sweep.merge(tmp_path / "out", [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]) == 2
    assert sweep.merge(tmp_path / "out", [tmp_path / "b.jsonl"]) == 0
    assert len(sweep.load_rows(tmp_path / "out" / "results.jsonl")) == 2


def _write_mnist(folder: Path, images: torch.Tensor, labels: list[int]) -> None:
    """Uncompressed IDX test files (MNIST's own layout) for ``images`` [N, 28, 28] uint8."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in (("t10k-images-idx3-ubyte", images), ("t10k-labels-idx1-ubyte", torch.tensor(labels))):
        shape = b"".join(int(n).to_bytes(4, "big") for n in array.shape)
        (folder / name).write_bytes(bytes([0, 0, 8, array.dim()]) + shape + array.to(torch.uint8).numpy().tobytes())


def test_sweep_attacks_defended_images_and_scores_psnr(tmp_path, monkeypatch):
    sweep = _sweep_module()
    strokes = torch.zeros(2, 28, 28, dtype=torch.uint8)
    strokes[:, 6:22, 12:16] = 255
    strokes[1, 6:9, 9:16] = 200
    _write_mnist(tmp_path / "mnist", strokes, [1, 7])
    argv = ["sweep", "--images", "mnist", "--image-root", str(tmp_path), "--attacks", "idlg", "--iterations", "30",
            "--sentences", "1", "--families", "noise", "freeze", "--quick", "--out", str(tmp_path / "out")]  # fmt: skip
    monkeypatch.setattr("sys.argv", argv)
    rows = {r["strength"]: r for r in sweep.load_rows(sweep.run(sweep.parse_args()))}
    assert set(rows) == {0.0, 1e-4, 1e-3, 1e-2} and all(r["task"] == "images" for r in rows.values())  # no freeze
    assert rows[0.0]["psnr"] > 40 and rows[0.0]["label_accuracy"] == 1.0  # iDLG recovers the clean image
    assert rows[1e-2]["psnr"] < rows[0.0]["psnr"] - 15  # noise degrades it
    table = sweep.render_table(sweep.summarise(list(rows.values())))
    assert "PSNR" in table and "ROUGE" not in table
    monkeypatch.setattr("sys.argv", [*argv, "--attacks", "tag"])
    with pytest.raises(SystemExit, match="unknown image attacks \\['tag'\\]"):
        sweep.run(sweep.parse_args())
    monkeypatch.setattr("sys.argv", [*argv, "--fine-tune-steps", "5"])
    with pytest.raises(SystemExit, match="cannot be combined with --images"):
        sweep.parse_args()
