"""``textleak image-attack``: argument parsing and printing only; ``image_support.experiment`` does the work.

``textleak.cli`` adds the command with ``add_image_attack_parser(commands)`` and dispatches it to
``run_image_attack(args)``, importing this module only then (the text package never needs the image one).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from image_support.attacks import IMAGE_ATTACKS
from image_support.datasets import DATASETS, load_dataset
from image_support.experiment import attack_images
from image_support.metrics import save_grid
from image_support.models import ARCHITECTURES
from image_support.progress import SnapshotRecorder, save_progress
from textleak.errors import TextleakError


def _option(text: str) -> tuple[str, Any]:
    """``key=value`` with the value parsed as JSON when it parses (numbers, booleans), else kept as text."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key.replace("-", "_"), json.loads(raw)
    except json.JSONDecodeError:
        return key.replace("-", "_"), raw


def add_image_attack_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``image-attack`` command to ``subparsers`` and return its parser."""
    parser = subparsers.add_parser("image-attack", help="attack an image client's gradient, score the recovery")
    parser.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    parser.add_argument("--data-root", type=Path, required=True, help="local folder of the data set")
    parser.add_argument("--model", choices=sorted(ARCHITECTURES), default="lenet")
    parser.add_argument("--attack", choices=sorted(IMAGE_ATTACKS), default="dlg")
    parser.add_argument("--index", type=int, default=0, help="first image of the client's batch")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--iterations", type=int, help="optimisation steps (default: the attack's own)")
    parser.add_argument("--restarts", type=int, help="optimisation restarts (default: the attack's own)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model's weights and the attack")
    parser.add_argument("--known-labels", action="store_true", help="the attacker knows the labels")
    parser.add_argument("--option", type=_option, action="append", default=[], help="attack option key=value")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="where the attacker optimises, e.g. cuda (client: CPU)")
    parser.add_argument("--out", type=Path, help="folder for the PNG grid (truth above, reconstruction below)")
    parser.add_argument(
        "--progress-every",
        type=int,
        metavar="N",
        help="snapshot the reconstruction every N iterations; writes a PNG strip and an animated GIF into --out "
        "(default: the current folder) as <dataset>_<model>_<attack>_<index>_progress.png/.gif",
    )
    parser.add_argument("--json", type=Path, help="write the scores and the full configuration as JSON")
    return parser


def run_image_attack(args: argparse.Namespace) -> int:
    """Run the command; 0 on success, 2 on a data, model or capability error (printed)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    options = dict(args.option)
    if args.progress_every is not None and args.progress_every < 1:
        print("textleak: error: --progress-every must be >= 1", file=sys.stderr)
        return 2
    recorder = SnapshotRecorder(args.progress_every) if args.progress_every else None
    if args.attack != "analytic-fc":
        options.setdefault("seed", args.seed)
        for key in ("iterations", "restarts"):
            if getattr(args, key) is not None:
                options[key] = getattr(args, key)
    try:
        dataset = load_dataset(args.dataset, args.data_root)
        indices = [(args.index + i) % len(dataset) for i in range(args.batch_size)]
        run = attack_images(
            dataset,
            indices,
            arch=args.model,
            attack=args.attack,
            model_seed=args.seed,
            attack_options=options,
            labels_known=args.known_labels,
            snapshots=recorder,
            device=args.device,
        )
    except (TextleakError, ValueError) as error:
        print(f"textleak: error: {error}", file=sys.stderr)
        return 2
    scores = run.scores
    print(run.update)
    print(
        f"{args.attack} on {args.model}/{args.dataset} images {indices}: "
        f"PSNR {scores['mean_psnr']:.2f} dB, SSIM {scores['mean_ssim']:.3f}, MSE {scores['mean_mse']:.2e}, "
        f"labels {run.reconstruction.labels} (truth {run.truth.labels.tolist()}), "
        f"{run.reconstruction.timings.get('total_s', 0):.1f} s"
    )
    for warning in run.reconstruction.warnings:
        print(f"warning: {warning}")
    if args.out:
        path = save_grid(
            run.truth.images,
            run.reconstruction.images[scores["order"]],
            args.out / f"{args.dataset}_{args.model}_{args.attack}_{args.index}.png",
        )
        print(f"wrote {path}")
    if recorder is not None:
        stem = (args.out or Path(".")) / f"{args.dataset}_{args.model}_{args.attack}_{args.index}_progress"
        paths = save_progress(recorder, stem, truth=run.truth.images)
        print(f"wrote {', '.join(map(str, paths))} ({len(recorder.frames)} snapshots: iterations {recorder.steps})")
    if args.json:
        config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"}
        args.json.write_text(json.dumps({"config": config, "indices": indices, **run.to_dict()}, indent=2))
        print(f"wrote {args.json}")
    return 0
