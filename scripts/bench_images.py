"""Benchmark of the image attacks on MNIST, CIFAR-10 (JPEG copy) and LFW (32x32): PSNR, SSIM, seconds per image.

DLG and iDLG on LeNet (B=1), Inverting Gradients on an untrained ResNet-20 (B=1 and 4), and iDLG under gradient
noise and pruning from textleak's defenses. The JSON (rewritten after every setting, so an interrupted run keeps
what it measured) holds every per-image score and the full configuration; one PNG grid per setting (truth above,
reconstruction below) goes next to it. ``--resume`` keeps the settings the JSON already holds with the same
configuration and runs the rest; ``--only`` picks settings by name; ``--progress-every N`` writes an
optimisation-progress strip (PNG) and GIF for the first run of the settings ``--progress`` names.

``--jobs N`` runs every image (or batch) of the selected settings as its own worker process, up to N at once (to
fill one GPU with many small attacks), each writing a part file to ``--parts``; the parts are then merged into the
JSON and the grids. ``--merge`` only merges the parts already there (e.g. parts made on another machine).

    python scripts/bench_images.py --images 10 --threads 1
    nvidia-cuda-mps-control -d  # optional: lets the workers' small kernels share the GPU at once
    python scripts/bench_images.py --resume --only inverting --device cuda --jobs 20 --inverting-images 10 \
        --inverting-batches 10 --inverting-iterations 6000 --inverting-b4-option tv=0.01
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
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
    parser.add_argument("--jobs", type=int, default=0, help="run each image/batch as a worker, N at once, then merge")
    parser.add_argument("--parts", type=Path, default=None, help="part files of --jobs (default: <out>.parts/)")
    parser.add_argument("--merge", action="store_true", help="only merge the part files in --parts into --out")
    parser.add_argument("--part", default="", help=argparse.SUPPRESS)  # worker: "<setting name>:<run number>"
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


def setting_batches(setting: dict[str, Any], size: int) -> list[list[int]]:
    """The image indices of each run of ``setting`` (``size`` images in the data set): distinct images, and a batch
    takes every ``runs``-th of them, so it spans the (class-sorted) data set whatever the number of batches."""
    runs = setting["runs"]
    everything = spread(runs * setting["batch_size"], size)
    return [everything[k::runs] for k in range(runs)]


def _relative(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def run_one(
    setting: dict[str, Any], args: argparse.Namespace, dataset: Any, number: int, out_dir: Path
) -> dict[str, Any]:
    """Run number ``number`` of ``setting``: its record, truth and (truth-ordered) reconstruction, config, extras."""
    name = setting_name(setting)
    indices = setting_batches(setting, len(dataset))[number]
    defenses = [parse_defense(setting["defense"])] if "defense" in setting else []
    wants_progress = args.progress_every > 0 and any(part in name for part in args.progress) and number == 0
    recorder = SnapshotRecorder(args.progress_every) if wants_progress else None
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
    record = {
        "indices": indices,
        "labels": run.truth.labels.tolist(),
        "recovered_labels": run.reconstruction.labels,
        "psnr": scores["psnr"],
        "ssim": scores["ssim"],
        "label_accuracy": scores["label_accuracy"],
        "seconds": seconds,
        "final_distance": run.reconstruction.details.get("final_distance"),
    }
    print(f"  {name} {indices}: PSNR {[round(p, 2) for p in scores['psnr']]} {seconds:.1f} s", flush=True)
    extra: dict[str, Any] = {}
    if recorder is not None:
        paths = save_progress(recorder, out_dir / f"image_progress_{name}", truth=run.truth.images)
        extra["progress"] = {
            "indices": indices,
            "every": recorder.every,
            "steps": recorder.steps,
            "files": [_relative(p) for p in paths],
        }
    return {
        "record": record,
        "truth": run.truth.images,
        "reconstruction": run.reconstruction.images[scores["order"]],
        "config": run.reconstruction.config,
        "extra": extra,
    }


def summarise(
    setting: dict[str, Any], args: argparse.Namespace, outcomes: list[dict[str, Any]], out_dir: Path, load: float
) -> dict[str, Any]:
    """One setting's result from its runs' outcomes (``run_one``): means, timings, grid, per-run records."""
    name = setting_name(setting)
    runs = [o["record"] for o in outcomes]
    extra = {k: v for o in outcomes for k, v in o["extra"].items()}
    truths = torch.cat([o["truth"] for o in outcomes])
    grid = save_grid(
        truths,
        torch.cat([o["reconstruction"] for o in outcomes]),
        out_dir / f"image_grid_{name}.png",
        scale=3,
        columns=20,
    )
    psnrs = [p for run in runs for p in run["psnr"]]
    ssims = [s for run in runs for s in run["ssim"]]
    return {
        "name": name,
        **setting,
        "attack_config": outcomes[-1]["config"],
        "images": len(psnrs),
        "mean_psnr": statistics.mean(psnrs),
        "median_psnr": statistics.median(psnrs),
        "mean_ssim": statistics.mean(ssims),
        "label_accuracy": statistics.mean(r["label_accuracy"] for r in runs),
        "seconds_per_image": sum(r["seconds"] for r in runs) / len(psnrs),
        "load_average_at_start": load,
        "threads": args.threads,
        "grid": _relative(grid),
        **extra,
        "per_run": runs,
    }


def run_setting(setting: dict[str, Any], args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """Run one setting's images (or batches) one after another; scores, timings, grid, optional progress strip."""
    dataset = load_dataset(setting["dataset"], args.data_root / ROOTS[setting["dataset"]])
    load = os.getloadavg()[0]
    outcomes = [run_one(setting, args, dataset, number, out_dir) for number in range(setting["runs"])]
    return summarise(setting, args, outcomes, out_dir, load)


def machine_info(device: str) -> dict[str, Any]:
    """Where a setting ran: platform, torch, CPU count, the attacker's device and the GPU's name on CUDA."""
    info: dict[str, Any] = {"platform": platform.platform(), "torch": str(torch.__version__), "cpus": os.cpu_count()}
    info["device"] = device
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def part_path(parts: Path, name: str, number: int) -> Path:
    return parts / f"{name}_{number:03d}.pt"


def run_part(args: argparse.Namespace, parts: Path) -> None:
    """Worker of ``--jobs``: run one image/batch (``--part NAME:K``) and save its outcome as a part file."""
    name, _, number = args.part.rpartition(":")
    setting = next((s for s in settings(args) if setting_name(s) == name), None)
    if setting is None:
        raise SystemExit(f"--part {args.part}: no selected setting named {name!r}")
    dataset = load_dataset(setting["dataset"], args.data_root / ROOTS[setting["dataset"]])
    load = os.getloadavg()[0]
    outcome = run_one(setting, args, dataset, int(number), args.out.parent)
    outcome["setting"] = setting
    outcome["load_average_at_start"] = load
    outcome["machine"] = machine_info(args.device)
    parts.mkdir(parents=True, exist_ok=True)
    torch.save(outcome, part_path(parts, name, int(number)))


def run_jobs(args: argparse.Namespace, argv: list[str], todo: list[dict[str, Any]], parts: Path) -> dict[str, Any]:
    """Run every image/batch of ``todo`` as a worker process, ``args.jobs`` at once; returns the timing summary."""
    queue = [(setting_name(s), k) for s in todo for k in range(s["runs"])]
    base = [sys.executable, str(Path(__file__).resolve()), *argv]
    load = os.getloadavg()[0]
    began = time.perf_counter()
    running: list[tuple[subprocess.Popen, str]] = []
    failed: list[str] = []
    while queue or running:
        while queue and len(running) < args.jobs:
            name, number = queue.pop(0)
            running.append((subprocess.Popen([*base, "--part", f"{name}:{number}"]), f"{name}:{number}"))
        time.sleep(0.5)
        for process, label in list(running):
            if process.poll() is not None:
                running.remove((process, label))
                if process.returncode:
                    failed.append(label)
    wall = time.perf_counter() - began
    images = sum(s["runs"] * s["batch_size"] for s in todo)
    return {
        "jobs": args.jobs,
        "workers": sum(s["runs"] for s in todo),
        "failed_workers": failed,
        "wall_s": wall,
        "images": images,
        "throughput_seconds_per_image": wall / images,
        "load_average_at_start": load,
        "device": args.device,
        "device_name": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor(),
    }


def merge_parts(setting: dict[str, Any], args: argparse.Namespace, parts: Path, out_dir: Path) -> dict[str, Any] | None:
    """The setting's result from the part files present (None if none): ``runs`` is how many were found."""
    name = setting_name(setting)
    found = [part_path(parts, name, k) for k in range(setting["runs"])]
    outcomes = [torch.load(p, weights_only=True) for p in found if p.is_file()]
    if not outcomes:
        return None
    merged = {**setting, "runs": len(outcomes)}
    if len(outcomes) < setting["runs"]:
        merged["runs_planned"] = setting["runs"]
    result = summarise(merged, args, outcomes, out_dir, outcomes[0]["load_average_at_start"])
    result["load_average_at_start"] = max(o["load_average_at_start"] for o in outcomes)
    if "machine" in outcomes[0]:
        result["machine"] = outcomes[0]["machine"]  # where the workers ran, not where the parts are merged
    return result


def same_setting(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether a stored result measured exactly ``new`` (same runs, options, defense, device)."""
    keys = ("dataset", "arch", "attack", "batch_size", "runs", "options", "defense", "device")
    return all(old.get(k, "cpu" if k == "device" else None) == new.get(k) for k in keys)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    parts = args.parts or args.out.with_suffix(".parts")
    if args.part:
        run_part(args, parts)
        return
    command = "python scripts/bench_images.py " + " ".join(argv)
    payload: dict[str, Any] = {
        "commands": [],
        "machine": {k: v for k, v in machine_info(args.device).items() if k in ("platform", "torch", "cpus")},
        "notes": (
            "PSNR capped at 100 dB per image; untrained models (seed 0; LeNet with DLG's U(-0.5, 0.5) init); "
            "seconds are wall-clock per image (client + attack) with the threads and load average recorded per "
            "setting; each setting records its image count, iteration budget and full attack configuration."
        ),
        "settings": [],
    }
    if args.resume and args.out.is_file():
        stored = json.loads(args.out.read_text())
        payload["machine"] = stored.get("machine", payload["machine"])  # the first run's; each setting has its own
        payload.update({k: v for k, v in stored.items() if k not in payload})  # e.g. a tuning record
        payload["commands"] = stored.get("commands", [])
        payload["settings"] = [s for s in stored.get("settings", []) if "name" in s]
    payload["commands"].append(command)
    todo = []
    for setting in settings(args):
        name = setting_name(setting)
        kept = [s for s in payload["settings"] if s["name"] == name]
        if kept and same_setting(kept[0], setting) and not args.merge:
            print(f"{name}: kept from {args.out}", flush=True)
            continue
        todo.append(setting)
    concurrency = None
    if args.jobs > 0 and not args.merge and todo:
        worker_argv = [a for a in argv if a != "--resume"]
        concurrency = run_jobs(args, worker_argv, todo, parts)
    for setting in todo:
        name = setting_name(setting)
        if args.jobs > 0 or args.merge:
            result = merge_parts(setting, args, parts, args.out.parent)
            if result is None:
                print(f"{name}: no part files in {parts}", flush=True)
                continue
            if concurrency is not None:
                result["concurrency"] = concurrency
        else:
            result = run_setting(setting, args, args.out.parent)
        result["command"] = command
        result.setdefault("machine", machine_info(args.device))
        payload["settings"] = [s for s in payload["settings"] if s["name"] != name] + [result]
        args.out.write_text(json.dumps(payload, indent=2))
        print(
            f"{name:42} PSNR {result['mean_psnr']:6.2f} SSIM {result['mean_ssim']:.3f} "
            f"labels {result['label_accuracy']:.2f} {result['seconds_per_image']:.1f} s/image",
            flush=True,
        )


if __name__ == "__main__":
    main()
