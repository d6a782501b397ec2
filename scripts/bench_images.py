"""Benchmark of the image attacks on MNIST, CIFAR-10 (JPEG copy) and LFW (32x32): PSNR, SSIM, seconds per image.

DLG and iDLG on LeNet (B=1), Inverting Gradients on an untrained ResNet-20 (B=1 and 4), and iDLG under gradient
noise and pruning from textleak's defenses. The JSON (rewritten after every setting, so an interrupted run keeps
what it measured) holds every per-image score and the full configuration; one PNG grid per setting (truth above,
reconstruction below) goes next to it. ``--resume`` keeps the settings the JSON already holds with the same
configuration and runs the rest; ``--only`` picks settings by name; ``--progress-every N`` writes an
optimisation-progress strip (PNG) and GIF for the first run of the settings ``--progress`` names.

    python scripts/bench_images.py --images 10 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from image_support.cli import _option
from image_support.datasets import load_dataset
from image_support.experiment import attack_images
from image_support.metrics import save_grid
from image_support.progress import SnapshotRecorder, save_progress
from textleak.defenses import parse_defense

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"mnist": "mnist", "cifar10": "cifar10", "lfw": "lfw"}
DEFENSES = ["noise:sigma=0.001", "noise:sigma=0.01", "prune:ratio=0.2", "prune:ratio=0.5", "prune:ratio=0.9"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data" / "images")
    parser.add_argument("--images", type=int, default=10, help="images per DLG/iDLG setting")
    parser.add_argument("--dlg-iterations", type=int, nargs=2, default=[50, 100], help="L-BFGS steps: MNIST, 32x32")
    parser.add_argument("--convnet-images", type=int, default=0, help="CIFAR-10 images for DLG on the ConvNet")
    parser.add_argument("--inverting-images", type=int, default=4, help="B=1 images for Inverting Gradients")
    parser.add_argument("--inverting-batches", type=int, default=2, help="B=4 batches for Inverting Gradients")
    parser.add_argument("--inverting-iterations", type=int, default=3000)
    parser.add_argument(
        "--inverting-option", type=_option, action="append", default=[], help="Inverting Gradients option key=value"
    )
    parser.add_argument(
        "--inverting-b4-option", type=_option, action="append", default=[], help="the same, for B=4 only (wins)"
    )
    parser.add_argument("--defense-images", type=int, default=3)
    parser.add_argument("--defenses", nargs="*", default=DEFENSES)
    parser.add_argument("--only", nargs="*", default=[], help="run only settings whose name contains one of these")
    parser.add_argument("--resume", action="store_true", help="keep settings already in --out with the same config")
    parser.add_argument("--progress-every", type=int, default=0, help="snapshot interval of the progress strip/GIF")
    parser.add_argument(
        "--progress", nargs="*", default=["cifar10_resnet20_inverting_b1"], help="settings with a progress strip"
    )
    parser.add_argument("--device", default="cpu", help="where the attacker optimises (the client runs on the CPU)")
    parser.add_argument("--tag", default="", help="suffix of every setting name (e.g. a device or budget)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "image_benchmark.json")
    return parser.parse_args(argv)


def spread(count: int, total: int, offset: int = 7) -> list[int]:
    """``count`` indices spread evenly over the data set (the JPEG copy is sorted by class)."""
    return [(offset + k * total // count) % total for k in range(count)]


def setting_name(setting: dict[str, Any]) -> str:
    """``<dataset>_<arch>_<attack>_b<B>[_<defense>][_<tag>]``: the key of a setting and its files."""
    name = f"{setting['dataset']}_{setting['arch']}_{setting['attack']}_b{setting['batch_size']}"
    if "defense" in setting:
        name += f"_{setting['defense'].replace(':', '-').replace('=', '')}"
    return name + (f"_{setting['tag']}" if setting.get("tag") else "")


def settings(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (data set, model, attack, batch size, budget) to run, in order."""
    rows = []
    small, large = args.dlg_iterations
    for dataset, iterations in zip(("mnist", "cifar10", "lfw"), (small, large, large), strict=True):
        for attack in ("dlg", "idlg"):
            rows.append(
                {"dataset": dataset, "arch": "lenet", "attack": attack, "batch_size": 1, "runs": args.images,
                 "options": {"iterations": iterations}}
            )  # fmt: skip
    rows.append(
        {"dataset": "cifar10", "arch": "convnet", "attack": "dlg", "batch_size": 1, "runs": args.convnet_images,
         "options": {"iterations": large}}
    )  # fmt: skip
    budget = {"iterations": args.inverting_iterations, **dict(args.inverting_option)}
    for batch, runs, options in (
        (1, args.inverting_images, budget),
        (4, args.inverting_batches, {**budget, **dict(args.inverting_b4_option)}),
    ):
        rows.append(
            {"dataset": "cifar10", "arch": "resnet20", "attack": "inverting", "batch_size": batch, "runs": runs,
             "options": options}
        )  # fmt: skip
    for spec in args.defenses:
        rows.append(
            {"dataset": "mnist", "arch": "lenet", "attack": "idlg", "batch_size": 1, "defense": spec,
             "runs": args.defense_images, "options": {"iterations": small}}
        )  # fmt: skip
    for row in rows:
        row["device"] = args.device
        if args.tag:
            row["tag"] = args.tag
    rows = [row for row in rows if row["runs"] > 0]
    if args.only:
        rows = [row for row in rows if any(part in setting_name(row) for part in args.only)]
    return rows


def run_setting(setting: dict[str, Any], args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """Run one setting's images (or batches) one after another; scores, timings, grid, optional progress strip."""
    dataset = load_dataset(setting["dataset"], args.data_root / ROOTS[setting["dataset"]])
    batch, name = setting["batch_size"], setting_name(setting)
    everything = spread(setting["runs"] * batch, len(dataset))  # distinct images; a batch spans classes
    batches = [everything[k * batch : (k + 1) * batch] for k in range(setting["runs"])]
    defenses = [parse_defense(setting["defense"])] if "defense" in setting else []
    wants_progress = args.progress_every > 0 and any(part in name for part in args.progress)
    runs, truths, recons, extra = [], [], [], {}
    load = os.getloadavg()[0]
    for number, indices in enumerate(batches):
        recorder = SnapshotRecorder(args.progress_every) if wants_progress and number == 0 else None
        began = time.perf_counter()
        run = attack_images(
            dataset,
            indices,
            arch=setting["arch"],
            attack=setting["attack"],
            attack_options=setting["options"],
            defenses=defenses,
            snapshots=recorder,
            device=args.device,
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
        print(f"  {name} {indices}: PSNR {[round(p, 2) for p in scores['psnr']]} {seconds:.1f} s", flush=True)
        truths.append(run.truth.images)
        recons.append(run.reconstruction.images[scores["order"]])
        config = run.reconstruction.config
        if recorder is not None:
            paths = save_progress(recorder, out_dir / f"image_progress_{name}", truth=run.truth.images)
            extra["progress"] = {
                "indices": indices,
                "every": recorder.every,
                "steps": recorder.steps,
                "files": [str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p) for p in paths],
            }
    grid = save_grid(torch.cat(truths), torch.cat(recons), out_dir / f"image_grid_{name}.png", scale=3)
    psnrs = [p for run in runs for p in run["psnr"]]
    ssims = [s for run in runs for s in run["ssim"]]
    return {
        "name": name,
        **setting,
        "attack_config": config,
        "images": len(psnrs),
        "mean_psnr": statistics.mean(psnrs),
        "median_psnr": statistics.median(psnrs),
        "mean_ssim": statistics.mean(ssims),
        "label_accuracy": statistics.mean(r["label_accuracy"] for r in runs),
        "seconds_per_image": sum(r["seconds"] for r in runs) / len(psnrs),
        "load_average_at_start": load,
        "threads": args.threads,
        "grid": str(grid.relative_to(REPO)) if grid.is_relative_to(REPO) else str(grid),
        **extra,
        "per_run": runs,
    }


def same_setting(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether a stored result measured exactly ``new`` (same runs, options, defense, device)."""
    keys = ("dataset", "arch", "attack", "batch_size", "runs", "options", "defense", "device")
    return all(old.get(k, "cpu" if k == "device" else None) == new.get(k) for k in keys)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = "python scripts/bench_images.py " + " ".join(sys.argv[1:] if argv is None else argv)
    payload: dict[str, Any] = {
        "commands": [],
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "cpus": os.cpu_count()},
        "notes": (
            "PSNR capped at 100 dB per image; untrained models (seed 0; LeNet with DLG's U(-0.5, 0.5) init); "
            "seconds are wall-clock per image (client + attack) with the threads and load average recorded per "
            "setting; each setting records its image count, iteration budget and full attack configuration."
        ),
        "settings": [],
    }
    if args.resume and args.out.is_file():
        stored = json.loads(args.out.read_text())
        payload.update({k: v for k, v in stored.items() if k not in payload})  # e.g. a tuning record
        payload["commands"] = stored.get("commands", [])
        payload["settings"] = [s for s in stored.get("settings", []) if "name" in s]
    payload["commands"].append(command)
    for setting in settings(args):
        name = setting_name(setting)
        kept = [s for s in payload["settings"] if s["name"] == name]
        if kept and same_setting(kept[0], setting):
            print(f"{name}: kept from {args.out}", flush=True)
            continue
        result = run_setting(setting, args, args.out.parent)
        result["command"] = command
        payload["settings"] = [s for s in payload["settings"] if s["name"] != name] + [result]
        args.out.write_text(json.dumps(payload, indent=2))
        print(
            f"{name:42} PSNR {result['mean_psnr']:6.2f} SSIM {result['mean_ssim']:.3f} "
            f"labels {result['label_accuracy']:.2f} {result['seconds_per_image']:.1f} s/image",
            flush=True,
        )


if __name__ == "__main__":
    main()
