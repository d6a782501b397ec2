"""image_support: loaders on fixture files, models, the image client, DLG/iDLG/Inverting/analytic attacks, metrics."""

from __future__ import annotations

import gzip
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script
from PIL import Image

from image_support import (
    IMAGE_ATTACKS,
    DatasetError,
    SnapshotRecorder,
    capture_image_update,
    evaluate_images,
    image_source,
    load_dataset,
    load_image_model,
    psnr,
    recover_labels,
    save_grid,
    save_progress,
    ssim,
)
from image_support.datasets import load_cifar, load_image_folder, load_mnist, read_idx
from image_support.metrics import gaussian_window, match_images, mse
from textleak.cli import main
from textleak.defenses import parse_defense
from textleak.errors import CapabilityError, ModelLoadError
from textleak.update import Knowledge, Update

MNIST_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "images" / "mnist"


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def mnist_image() -> tuple[torch.Tensor, torch.Tensor]:
    """Test image 25 of the real MNIST set when the shared data is there, else a synthetic stroke."""
    if (MNIST_ROOT / "t10k-images-idx3-ubyte.gz").is_file():
        return load_mnist(MNIST_ROOT).batch(25, 1)
    image = torch.zeros(1, 1, 28, 28)
    image[..., 6:22, 12:16] = 1.0
    image[..., 6:9, 9:16] = 0.8
    return image, torch.tensor([1])


# --- loaders on fixture files ---------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes()
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_idx_fixture(tmp_path: Path, compress: bool) -> None:
    images = np.arange(3 * 28 * 28, dtype=np.uint32).reshape(3, 28, 28) % 256
    suffix = ".gz" if compress else ""
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images, compress)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", np.array([4, 0, 9]), compress)
    data = load_dataset("mnist", tmp_path)
    assert len(data) == 3 and data.labels == [4, 0, 9]
    image, label = data[2]
    assert image.shape == (1, 28, 28) and label == 9
    assert torch.allclose(image[0], torch.from_numpy(images[2].astype(np.float32)) / 255)


def test_truncated_idx_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "t10k-images-idx3-ubyte"
    write_idx(path, np.zeros((2, 28, 28)), compress=False)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(path)


def test_cifar_pickle_batches(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(4, 3072), dtype=np.uint8)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with (folder / "test_batch").open("wb") as handle:
        pickle.dump({b"data": data, b"labels": [3, 1, 4, 1], b"batch_label": b"testing batch 1 of 1"}, handle)
    with (folder / "batches.meta").open("wb") as handle:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, handle)
    dataset = load_dataset("cifar10", tmp_path)  # the parent folder works as well as the batches folder
    image, label = dataset[2]
    assert len(dataset) == 4 and label == 4 and dataset.classes[3] == "c3"
    assert torch.allclose(image, torch.from_numpy(data[2].reshape(3, 32, 32).astype(np.float32)) / 255)
    hundred = tmp_path / "cifar-100-python"
    hundred.mkdir()
    with (hundred / "test").open("wb") as handle:
        pickle.dump({b"data": data[:2], b"fine_labels": [42, 99], b"coarse_labels": [1, 2]}, handle)
    assert load_cifar(tmp_path, name="cifar100").labels == [42, 99]


def test_image_folder_and_resize(tmp_path: Path) -> None:
    for person, shade in (("Ada_Lovelace", 40), ("Alan_Turing", 200)):
        (tmp_path / person).mkdir()
        for k in (1, 2):
            Image.new("RGB", (50, 40), (shade, shade, shade)).save(tmp_path / person / f"{person}_{k:04d}.png")
    (tmp_path / "README.txt").write_text("not a class")
    data = load_image_folder(tmp_path, name="lfw", size=32)
    assert data.classes == ["Ada_Lovelace", "Alan_Turing"] and data.labels == [0, 0, 1, 1]
    image, label = data[3]
    assert image.shape == (3, 32, 32) and label == 1
    assert torch.allclose(image, torch.full_like(image, 200 / 255), atol=1e-6)
    assert load_dataset("lfw", tmp_path)[0][0].shape == (3, 32, 32)


@pytest.mark.parametrize("name", ["mnist", "cifar10", "lfw"])
def test_missing_or_malformed_folder_names_path_and_layout(tmp_path: Path, name: str) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match="expected") as caught:
        load_dataset(name, missing)
    assert str(missing) in str(caught.value)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DatasetError, match="expected"):
        load_dataset(name, tmp_path)


def test_bad_cifar_pickle(tmp_path: Path) -> None:
    (tmp_path / "test_batch").write_bytes(b"not a pickle at all")
    with pytest.raises(DatasetError, match="test_batch"):
        load_cifar(tmp_path)


# --- models and the client ---------------------------------------------------------------------------------------


def test_models_build_seeded_and_from_state_dict(tmp_path: Path) -> None:
    for arch, data in (
        ("lenet", "mnist"),
        ("convnet", "cifar10"),
        ("resnet20", "cifar10"),
        ("resnet32", "3x32x32"),
        ("mlp", "1x28x28"),
    ):
        model = load_image_model(image_source(arch, data, seed=3))
        again = load_image_model(image_source(arch, data, seed=3))
        x = torch.rand(2, *model.shape)
        assert model(x).shape == (2, 10) and torch.equal(model(x), again(x))
    model = load_image_model(image_source("lenet", "mnist", seed=1))
    torch.save(model.net.state_dict(), tmp_path / "lenet.pt")
    loaded = load_image_model(image_source("lenet", "mnist", seed=7, weights=tmp_path / "lenet.pt"))
    x = torch.rand(1, 1, 28, 28)
    assert torch.equal(model(x), loaded(x))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_image_model(image_source("lenet", "mnist", weights=tmp_path / "missing.pt"))
    with pytest.raises(ModelLoadError, match="CxHxW"):
        image_source("lenet", "imagenet")


def test_update_save_load_round_trip_and_defenses(tmp_path: Path) -> None:
    source = image_source("lenet", "mnist", seed=0)
    images, labels = torch.rand(2, 1, 28, 28), torch.tensor([3, 8])
    update, truth = capture_image_update(source, images, labels, defenses=[parse_defense("prune:ratio=0.5")])
    assert update.metadata.model.spec == "image:lenet:mnist" and update.metadata.model.head == "classification"
    assert update.metadata.knowledge.labels is None and truth.labels.tolist() == [3, 8]
    assert [d["name"] for d in update.metadata.defenses] == ["prune"]
    model = load_image_model(source)
    loaded = Update.load(update.save(tmp_path / "image.safetensors"), model=model)
    assert loaded.metadata == update.metadata
    assert all(torch.equal(loaded.gradients[n], update.gradients[n]) for n in update.gradients)
    assert load_image_model(loaded.metadata.model)(images).shape == (2, 10)


# --- attacks -----------------------------------------------------------------------------------------------------


def test_dlg_recovers_an_mnist_image_on_lenet() -> None:
    images, labels = mnist_image()
    source = image_source("lenet", "mnist", seed=0)
    update, truth = capture_image_update(source, images, labels)
    result = IMAGE_ATTACKS["dlg"](iterations=20, seed=0).reconstruct(update, load_image_model(source))
    scores = evaluate_images(result.images, truth.images)
    assert scores["mean_psnr"] >= 30, scores
    assert result.labels == labels.tolist() and result.details["label_source"] == "soft"


def test_idlg_gets_the_label_right() -> None:
    source = image_source("lenet", "mnist", seed=0)
    model = load_image_model(source)
    generator = torch.Generator().manual_seed(0)
    for label in (0, 3, 9):
        update, _ = capture_image_update(source, torch.rand(1, 1, 28, 28, generator=generator), torch.tensor([label]))
        assert recover_labels(update, model) == [label]
    result = IMAGE_ATTACKS["idlg"](iterations=2).reconstruct(update, model)
    assert result.labels == [9] and result.details["label_source"] == "inferred"


def test_batch_label_recovery_counts() -> None:
    source = image_source("resnet20", "cifar10", seed=0)
    model = load_image_model(source)
    labels = torch.tensor([6, 0, 9, 6])
    update, _ = capture_image_update(
        source, torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)), labels
    )
    assert recover_labels(update, model) == [0, 6, 6, 9]


def test_analytic_fc_is_exact_for_one_image_and_a_batch() -> None:
    source = image_source("mlp", "mnist", seed=0)
    model = load_image_model(source)
    images = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    for batch in (1, 3):
        update, truth = capture_image_update(source, images[:batch], torch.tensor([1, 5, 7][:batch]))
        result = IMAGE_ATTACKS["analytic-fc"]().reconstruct(update, model)
        order = match_images(result.images, truth.images)
        assert (result.images[order] - truth.images).abs().max() < 1e-5
        assert sorted(result.labels) == sorted(truth.labels.tolist()) and not result.warnings
    lenet = image_source("lenet", "mnist")
    update, _ = capture_image_update(lenet, images[:1], torch.tensor([1]))
    with pytest.raises(CapabilityError, match="fully connected"):
        IMAGE_ATTACKS["analytic-fc"]().reconstruct(update, load_image_model(lenet))


def test_inverting_gradients_runs_boxed_signed_and_deterministic() -> None:
    source = image_source("resnet20", "3x8x8", seed=0)
    model = load_image_model(source)
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    update, _ = capture_image_update(source, images, torch.tensor([2, 7]), labels_known=True)
    attack = IMAGE_ATTACKS["inverting"](iterations=8, restarts=2, seed=4)
    first, second = attack.reconstruct(update, model), attack.reconstruct(update, model)
    assert torch.equal(first.images, second.images) and first.images.shape == (2, 3, 8, 8)
    assert 0 <= float(first.images.min()) and float(first.images.max()) <= 1
    assert first.details["label_source"] == "known" and len(first.details["restart_distances"]) == 2
    assert first.config["signed"] and first.config["box"] and first.config["lr_drops"]
    assert all(p.grad is None for p in model.parameters())
    delta = update.with_gradients(update.gradients, kind="delta")
    with pytest.raises(CapabilityError, match="delta"):
        attack.reconstruct(delta, model)
    unlabelled = update.with_gradients(update.gradients, knowledge=Knowledge())
    with pytest.raises(CapabilityError, match="labels"):
        IMAGE_ATTACKS["inverting"](labels="known").reconstruct(unlabelled, model)
    with pytest.raises(ValueError, match="distance"):
        IMAGE_ATTACKS["inverting"](distance="manhattan")
    with pytest.raises(TypeError):
        IMAGE_ATTACKS["dlg"](no_such_option=1)


def test_progress_snapshots_write_a_strip_and_a_gif(tmp_path: Path) -> None:
    source = image_source("mlp", "1x6x6", seed=0)
    model = load_image_model(source)
    images = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    update, truth = capture_image_update(source, images, torch.tensor([3, 5]), labels_known=True)
    recorder = SnapshotRecorder(every=2)
    result = IMAGE_ATTACKS["dlg"](iterations=5).reconstruct(update, model, snapshots=recorder)
    assert recorder.steps == [0, 2, 4, 5] and all(f.shape == (2, 1, 6, 6) for f in recorder.frames)
    assert torch.equal(recorder.frames[-1], result.images) and not torch.equal(recorder.frames[0], result.images)
    png, gif = save_progress(recorder, tmp_path / "run", truth=truth.images, scale=2)
    with Image.open(png) as strip:  # 4 snapshots + the truth as columns, 2 rows, a 12-pixel label band
        assert strip.size == (2 * (5 * 8 + 2), 2 * (2 * 8 + 2) + 12)
    with Image.open(gif) as animation:
        assert animation.n_frames == 4
    with pytest.raises(ValueError, match=">= 1"):
        SnapshotRecorder(every=0)


# --- metrics -----------------------------------------------------------------------------------------------------


def slow_ssim(x: torch.Tensor, y: torch.Tensor, size: int = 11, sigma: float = 1.5) -> float:
    """Wang et al.'s SSIM written out window by window (float64), the mean over positions and channels."""
    w = gaussian_window(size, sigma)
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for c in range(x.shape[0]):
        for i in range(x.shape[1] - size + 1):
            for j in range(x.shape[2] - size + 1):
                a, b = x[c, i : i + size, j : j + size].double(), y[c, i : i + size, j : j + size].double()
                ma, mb = (w * a).sum(), (w * b).sum()
                va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
                cov = (w * (a - ma) * (b - mb)).sum()
                values.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(torch.stack(values).mean())


def test_ssim_matches_the_reference_and_is_one_on_identical_images() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 13, 14, generator=generator)
    y = (x + 0.2 * torch.randn(2, 3, 13, 14, generator=generator)).clamp(0, 1)
    fast = ssim(x, y)
    for b in range(2):
        assert fast[b].item() == pytest.approx(slow_ssim(x[b], y[b]), abs=1e-5)
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-6)
    assert ssim(x, 1 - x).max() < 0  # inverted contrast: negative structure term
    assert float(gaussian_window().sum()) == pytest.approx(1.0)


def test_mse_psnr_matching_and_grid(tmp_path: Path) -> None:
    truth = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert float(psnr(truth[:1], truth[:1] + 0.1)) == pytest.approx(20.0, abs=1e-4)
    assert float(mse(truth[:1], truth[:1] + 0.1)) == pytest.approx(0.01, abs=1e-6)
    recon = truth[[2, 0, 1]] + 0.01
    assert match_images(recon, truth) == [1, 2, 0]
    scores = evaluate_images(recon, truth, recon_labels=[1, 2, 2], truth_labels=[2, 1, 0])
    assert scores["mean_psnr"] == pytest.approx(40.0, abs=0.2) and scores["label_accuracy"] == pytest.approx(2 / 3)
    path = save_grid(truth, recon[scores["order"]], tmp_path / "grid.png", scale=2)
    with Image.open(path) as image:
        assert image.size == (2 * (3 * 10 + 2), 2 * (2 * 10 + 2))
    with Image.open(save_grid(truth, recon, tmp_path / "wrapped.png", scale=1, columns=2)) as image:
        assert image.size == (2 * 10 + 2, 4 * 10 + 2)  # two (truth, reconstruction) row pairs


def test_flat_cosine_matches_textleak_cosine_distance() -> None:
    from image_support.attacks import _flat_cosine
    from textleak.attacks.optimization import cosine_distance

    generator = torch.Generator().manual_seed(0)
    dummy = [torch.randn(shape, generator=generator) for shape in ((4, 3, 3, 3), (4,), (10, 4))]
    target = [torch.randn(d.shape, generator=generator) for d in dummy]
    flat = torch.cat([t.reshape(-1) for t in target])
    assert float(_flat_cosine(flat, flat.norm())(dummy, target)) == pytest.approx(
        float(cosine_distance(dummy, target)), abs=1e-6
    )


# --- CLI ---------------------------------------------------------------------------------------------------------


def test_cli_image_attack(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = (np.random.default_rng(0).random((4, 28, 28)) * 255).astype(np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, compress=True)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([1, 2, 3, 4]), compress=True)
    argv = [
        "image-attack",
        "--dataset",
        "mnist",
        "--data-root",
        str(tmp_path),
        "--model",
        "mlp",
        "--attack",
        "analytic-fc",
        "--index",
        "1",
        "--batch-size",
        "2",
        "--out",
        str(tmp_path / "out"),
        "--json",
        str(tmp_path / "run.json"),
    ]
    assert main(argv) == 0  # the `textleak` command itself
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["indices"] == [1, 2] and record["scores"]["mean_psnr"] > 90
    assert (tmp_path / "out" / "mnist_mlp_analytic-fc_1.png").is_file()
    progress = [*argv[:7], "--attack", "dlg", "--index", "1", "--iterations", "3", "--progress-every", "2"]
    assert main([*progress, "--out", str(tmp_path)]) == 0
    with Image.open(tmp_path / "mnist_mlp_dlg_1_progress.gif") as animation:
        assert animation.n_frames == 3  # iterations 0, 2 and 3
    assert (tmp_path / "mnist_mlp_dlg_1_progress.png").is_file()
    argv[4] = str(tmp_path / "missing")
    assert main(argv) == 2
    assert "expected" in capsys.readouterr().err


# --- benchmark script: worker parts and their merge ----------------------------------------------------------------


def _bench_module():
    return load_script("bench_images")


def test_bench_batches_span_the_data_set_and_parts_merge(tmp_path: Path) -> None:
    bench = _bench_module()
    batches = bench.setting_batches({"runs": 10, "batch_size": 4}, 10000)
    assert batches[0] == [7, 2507, 5007, 7507] and len({i for b in batches for i in b}) == 40
    assert bench.setting_batches({"runs": 3, "batch_size": 1}, 9) == [[7], [1], [4]]
    images = (np.random.default_rng(0).random((4, 28, 28)) * 255).astype(np.uint8)
    (tmp_path / "mnist").mkdir()
    write_idx(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz", images, compress=True)
    write_idx(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz", np.array([1, 2, 3, 4]), compress=True)
    out = tmp_path / "results" / "bench.json"
    argv = ["--data-root", str(tmp_path), "--only", "noise", "--defenses", "noise:sigma=0.001"]
    argv += ["--defense-images", "2", "--dlg-iterations", "2", "2", "--out", str(out)]
    name = "mnist_lenet_idlg_b1_noise-sigma0.001"
    for number in (0, 1):  # what the workers of --jobs do, in this process
        bench.main([*argv, "--part", f"{name}:{number}"])
    assert sorted(p.name for p in (tmp_path / "results" / "bench.parts").iterdir()) == [
        f"{name}_000.pt",
        f"{name}_001.pt",
    ]
    bench.main([*argv, "--merge"])
    (setting,) = json.loads(out.read_text())["settings"]
    assert setting["runs"] == 2 and [r["indices"] for r in setting["per_run"]] == [[3], [1]]
    assert setting["machine"]["device"] == "cpu" and (tmp_path / "results" / f"image_grid_{name}.png").is_file()
    (tmp_path / "results" / "bench.parts" / f"{name}_001.pt").unlink()
    bench.main([*argv, "--merge", "--resume"])  # a missing part: the setting says how many runs it has
    (setting,) = json.loads(out.read_text())["settings"]
    assert setting["runs"] == 1 and setting["runs_planned"] == 2
