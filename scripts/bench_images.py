"""Benchmark of the image attacks on MNIST, CIFAR-10 (JPEG copy) and LFW (32x32): PSNR, SSIM, seconds per image.

DLG and iDLG on LeNet (B=1), Inverting Gradients on an untrained ResNet-20 (B=1 and 4, small budget), and iDLG
under gradient noise and pruning from textleak's defenses. The JSON (rewritten after every setting, so an
interrupted run keeps what it measured) holds every per-image score and the full configuration; one PNG grid per
setting (truth above, reconstruction below) goes next to it.

    python scripts/bench_images.py --images 8 --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from image_support.datasets import load_dataset
from image_support.experiment import attack_images
from image_support.metrics import save_grid
from textleak.defenses import parse_defense

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"mnist": "mnist", "cifar10": "cifar10", "lfw": "lfw"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data" / "images")
    parser.add_argument("--images", type=int, default=8, help="images per DLG/iDLG setting")
    parser.add_argument("--dlg-iterations", type=int, nargs=2, default=[50, 100], help="L-BFGS steps: MNIST, 32x32")
    parser.add_argument("--inverting-images", type=int, default=3, help="B=1 images for Inverting Gradients")
    parser.add_argument("--inverting-batches", type=int, default=1, help="B=4 batches for Inverting Gradients")
    parser.add_argument("--inverting-iterations", type=int, default=300)
    parser.add_argument("--defense-images", type=int, default=2)
    parser.add_argument(
        "--defenses", nargs="*", default=["noise:sigma=0.001", "noise:sigma=0.01", "prune:ratio=0.2", "prune:ratio=0.5"]
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "image_benchmark.json")
    return parser.parse_args()


def spread(count: int, total: int, offset: int = 7) -> list[int]:
    """``count`` indices spread evenly over the data set (the JPEG copy is sorted by class)."""
    return [(offset + k * total // count) % total for k in range(count)]


def settings(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (data set, model, attack, batch size, budget) to run, in order."""
    rows = []
    for dataset, iterations in zip(
        ("mnist", "cifar10", "lfw"),
        (args.dlg_iterations[0], args.dlg_iterations[1], args.dlg_iterations[1]),
        strict=True,
    ):
        for attack in ("dlg", "idlg"):
            rows.append(
                {
                    "dataset": dataset,
                    "arch": "lenet",
                    "attack": attack,
                    "batch_size": 1,
                    "runs": args.images,
                    "options": {"iterations": iterations},
                }
            )
    budget = {"iterations": args.inverting_iterations}
    rows.append(
        {
            "dataset": "cifar10",
            "arch": "resnet20",
            "attack": "inverting",
            "batch_size": 1,
            "runs": args.inverting_images,
            "options": budget,
        }
    )
    rows.append(
        {
            "dataset": "cifar10",
            "arch": "resnet20",
            "attack": "inverting",
            "batch_size": 4,
            "runs": args.inverting_batches,
            "options": budget,
        }
    )
    for spec in args.defenses:
        rows.append(
            {
                "dataset": "mnist",
                "arch": "lenet",
                "attack": "idlg",
                "batch_size": 1,
                "defense": spec,
                "runs": args.defense_images,
                "options": {"iterations": args.dlg_iterations[0]},
            }
        )
    return [row for row in rows if row["runs"] > 0]


def run_setting(setting: dict[str, Any], args: argparse.Namespace, grid_dir: Path) -> dict[str, Any]:
    dataset = load_dataset(setting["dataset"], args.data_root / ROOTS[setting["dataset"]])
    batch = setting["batch_size"]
    starts = spread(setting["runs"], len(dataset))
    defenses = [parse_defense(setting["defense"])] if "defense" in setting else []
    runs, truths, recons = [], [], []
    for start in starts:
        indices = [(start + k * len(dataset) // batch) % len(dataset) for k in range(batch)]
        began = time.perf_counter()
        run = attack_images(
            dataset,
            indices,
            arch=setting["arch"],
            attack=setting["attack"],
            attack_options=setting["options"],
            defenses=defenses,
        )
        seconds = time.perf_counter() - began
        scores = run.scores
        runs.append(
            {
                "indices": indices,
                "labels": run.truth.labels.tolist(),
                "recovered_labels": run.reconstruction.labels,
                "psnr": scores["psnr"],
                "ssim": scores["ssim"],
                "label_accuracy": scores["label_accuracy"],
                "seconds": seconds,
                "final_distance": run.reconstruction.details.get("final_distance"),
            }
        )
        truths.append(run.truth.images)
        recons.append(run.reconstruction.images[scores["order"]])
        config = run.reconstruction.config
    name = f"{setting['dataset']}_{setting['arch']}_{setting['attack']}_b{batch}" + (
        f"_{setting['defense'].replace(':', '-').replace('=', '')}" if "defense" in setting else ""
    )
    grid = save_grid(torch.cat(truths), torch.cat(recons), grid_dir / f"image_grid_{name}.png", scale=3)
    psnrs = [p for run in runs for p in run["psnr"]]
    ssims = [s for run in runs for s in run["ssim"]]
    return {
        **setting,
        "attack_config": config,
        "mean_psnr": statistics.mean(psnrs),
        "median_psnr": statistics.median(psnrs),
        "mean_ssim": statistics.mean(ssims),
        "label_accuracy": statistics.mean(r["label_accuracy"] for r in runs),
        "seconds_per_image": sum(r["seconds"] for r in runs) / len(psnrs),
        "grid": str(grid.relative_to(REPO)) if grid.is_relative_to(REPO) else str(grid),
        "per_run": runs,
    }


def reduced(args: argparse.Namespace) -> str:
    """What this run cut from the issue's and the papers' budgets (a shared 2-core CPU)."""
    return (
        f"{args.images} images per DLG/iDLG setting (issue: 10); DLG/iDLG {args.dlg_iterations[0]} (MNIST) and "
        f"{args.dlg_iterations[1]} (32x32) L-BFGS steps (paper: 300); Inverting Gradients {args.inverting_iterations} "
        f"Adam steps (paper: 4800 on CIFAR), {args.inverting_images} images at B=1 and {args.inverting_batches} "
        f"batch(es) at B=4, one restart; defenses on {args.defense_images} MNIST images"
    )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "command": "python scripts/bench_images.py "
        + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if k not in ("data_root", "out")
        ),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads},
        "notes": "PSNR capped at 100 dB per image; untrained models (seed 0; LeNet with DLG's U(-0.5, 0.5) init).",
        "reduced": reduced(args),
        "settings": [],
    }
    for setting in settings(args):
        result = run_setting(setting, args, args.out.parent)
        payload["settings"].append(result)
        args.out.write_text(json.dumps(payload, indent=2))
        print(
            f"{result['dataset']:8} {result['arch']:9} {result['attack']:10} B={result['batch_size']} "
            f"{result.get('defense', ''):18} PSNR {result['mean_psnr']:6.2f} SSIM {result['mean_ssim']:.3f} "
            f"labels {result['label_accuracy']:.2f} {result['seconds_per_image']:.1f} s/image",
            flush=True,
        )


if __name__ == "__main__":
    main()
