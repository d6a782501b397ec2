"""Defense sweep: for each defense and strength, attack defended updates and record recovery next to utility.

Threat model per batch: the client trains on B consecutive CoLA dev sentences and sends its update through the
defense; the attacker runs each chosen attack on what arrives (a FedAvg delta is read as the average gradient it
implies, ``-delta / (lr * steps)``, as an attacker would); the evaluator scores the answer against the private
batch. Beside recovery it records the cosine similarity of the defended update to the clean one and, with
``--fine-tune-steps``, the accuracy a short fine-tuning run reaches under the defense (CoLA, or SST-2 with
``--fine-tune-data sst2``).

With ``--images mnist`` (or cifar10, cifar100, lfw; ``--image-root`` holds the data) the same grid is swept on
images instead: the client holds B consecutive test images of an ``--image-arch`` model, the attacks are the image
attacks (dlg, idlg, inverting) and recovery is PSNR/SSIM; the plot goes to ``OUT/recovery_images.png``.

Every result is appended to ``OUT/results.jsonl`` as it comes (a crash loses nothing; a rerun skips what is
there), then ``OUT/table.md`` and ``OUT/recovery.png`` are rendered from all rows.

    python scripts/sweep_defenses.py --model default --batch-sizes 1 4 --sentences 20 --attacks cosine tag
    python scripts/sweep_defenses.py --quick --task all-tokens --sentences 2 --iterations 150  # minutes, tiny model

Several processes can share one sweep, each with its own ``--out``: ``--shard K/N`` takes every N-th work item
from the K-th; with one ``--claim-dir`` they instead take the next item nobody has claimed (balanced load).
``--order batch`` runs every setting on the first batches before the later ones (a cut-off run then covers the
whole grid on fewer sentences). ``--merge A/results.jsonl B/results.jsonl --render-only`` joins rows into ``OUT``
and renders the table and plot. ``--device cuda`` runs the optimisation attacks there (the client stays on the CPU).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from image_support.attacks import IMAGE_ATTACKS
from image_support.client import capture_image_update
from image_support.datasets import load_dataset
from image_support.metrics import evaluate_images
from image_support.models import image_source, load_image_model
from textleak.attacks import get_attack
from textleak.attacks.optimization import check_device
from textleak.data import read_cola
from textleak.defenses import as_defenses
from textleak.defenses.client import defended_client
from textleak.defenses.utility import as_gradient, fine_tune, gradient_fidelity
from textleak.errors import CapabilityError
from textleak.evaluation.sources import load_benchmark
from textleak.metrics import score_batch
from textleak.models import load_model
from textleak.tasks import head_for
from textleak.update import Update

#: attacks that take a ``device`` option (the embedding-optimisation attacks; span and lamp run on the CPU)
DEVICE_ATTACKS = ("dlg", "tag", "cosine")

#: family -> [(strength shown on the plot, defense specs)]; the issue's benchmark grid.
GRID: dict[str, list[tuple[float, list[str]]]] = {
    "noise": [(s, [f"noise:sigma={s}"]) for s in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)],
    "prune": [(r, [f"prune:ratio={r}"]) for r in (0.2, 0.5, 0.9, 0.99)],
    "quantize": [(16, ["quantize:dtype=fp16"]), (8, ["quantize:dtype=int8"])],
    "dpsgd": [(s, [f"dpsgd:sigma={s},clip=1.0"]) for s in (0.01, 0.1, 1.0)],
    "fedavg": [(k, [f"fedavg:steps={k},lr=0.01"]) for k in (1, 4, 16)],
    "mask": [(r, [f"mask:ratio={r}"]) for r in (0.2, 0.5, 0.9)],
    # strength 0: word embeddings frozen; k >= 1: every embedding and the first k blocks
    "freeze": [(0, ["freeze"])] + [(k, [f"freeze:patterns=embeddings,first_layers={k}"]) for k in (1,)],
    # clients sharing the batch; a batch smaller than the number of clients is skipped
    "secure-aggregation": [(m, [f"secure-aggregation:clients={m}"]) for m in (2, 4)],
}
QUICK_GRID: dict[str, list[tuple[float, list[str]]]] = {
    "noise": [(s, [f"noise:sigma={s}"]) for s in (1e-4, 1e-3, 1e-2)],
    "prune": [(r, [f"prune:ratio={r}"]) for r in (0.5, 0.9, 0.99)],
    "quantize": GRID["quantize"],
    "dpsgd": [(s, [f"dpsgd:sigma={s},clip=1.0"]) for s in (0.01, 1.0)],
    "fedavg": [(4, ["fedavg:steps=4,lr=0.01"])],
    "mask": [(0.5, ["mask:ratio=0.5"])],
    "freeze": GRID["freeze"],
    "secure-aggregation": [(2, ["secure-aggregation:clients=2"])],
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data-root", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "text"
    )
    parser.add_argument("--model", default="random:bert-tiny", help="model spec (default: random:bert-tiny)")
    parser.add_argument("--task", default="classification", choices=("mlm", "all-tokens", "classification"))
    parser.add_argument("--attacks", nargs="+", default=["cosine"])
    parser.add_argument("--iterations", type=int, default=None, help="attack iterations (default: the attack's)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1])
    parser.add_argument("--sentences", type=int, default=4, help="CoLA dev sentences per batch size")
    parser.add_argument("--families", nargs="+", default=None, help=f"subset of {sorted(GRID)}")
    parser.add_argument("--fine-tune-steps", type=int, default=0, help="utility run length per defense (0: none)")
    parser.add_argument(
        "--fine-tune-data", choices=["cola", "sst2"], default="cola",
        help="utility task: train.tsv / dev.tsv of this data set under --data-root",
    )
    parser.add_argument("--fine-tune-lr", type=float, default=1e-4, help="utility run's Adam learning rate")
    parser.add_argument("--quick", action="store_true", help="fewer strengths per family")
    parser.add_argument("--images", default=None, help="sweep this image data set instead of CoLA (e.g. mnist)")
    parser.add_argument(
        "--image-root", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "images",
        help="folder holding the image data sets (the data set's own folder under it, else this folder itself)",
    )
    parser.add_argument("--image-arch", default="lenet", help="image model architecture (default: lenet)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/defense_sweep"))
    parser.add_argument("--device", default="cpu", help=f"where {'/'.join(DEVICE_ATTACKS)} optimise (client: CPU)")
    parser.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="extra attack option (repeatable)"
    )
    parser.add_argument("--shard", default="0/1", help="K/N: this process runs every N-th work item from the K-th")
    parser.add_argument(
        "--claim-dir", type=Path, default=None, help="processes sharing this folder each run an item only once"
    )
    parser.add_argument("--order", choices=("config", "batch"), default="config", help="work order (see above)")
    parser.add_argument("--skip-baseline", action="store_true", help="do not run the undefended setting")
    parser.add_argument("--note", default=None, help="free text recorded in every row and above the table")
    parser.add_argument("--merge", nargs="+", type=Path, default=[], help="results.jsonl files to join into OUT")
    parser.add_argument("--render-only", action="store_true", help="run nothing; render OUT from its rows")
    args = parser.parse_args()
    args.shard_index, args.shard_count = parse_shard(args.shard)
    if args.images and args.fine_tune_steps:
        raise SystemExit("--fine-tune-steps measures text fine-tuning; it cannot be combined with --images")
    check_device(args.device)
    return args


def parse_shard(text: str) -> tuple[int, int]:
    """``K/N`` -> (K, N) with 0 <= K < N."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError as error:
        raise SystemExit(f"--shard must look like K/N, got {text!r}") from error
    if not 0 <= index < count:
        raise SystemExit(f"--shard {text!r}: need 0 <= K < N")
    return index, count


def parse_value(text: str):  # noqa: ANN201 - int, float, bool or str
    """An attack option's value from the command line: int, float, true/false, else the string."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def attack_options(attack: str, iterations: int | None, device: str, extra: list[str]) -> dict:
    """Options for one attack: the iteration budget, the device (optimisation attacks only) and ``--option``s."""
    options: dict = {} if iterations is None else {"iterations": iterations}
    if attack in DEVICE_ATTACKS and device != "cpu":
        options["device"] = device
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--option must look like KEY=VALUE, got {item!r}")
        options[key] = parse_value(value)
    return options


KEY_FIELDS = ("kind", "model", "task", "family", "strength", "attack", "batch_size", "batch_index")


def row_key(row: dict) -> tuple:
    """What identifies a result: a rerun skips every row whose key is already in the file."""
    return tuple(row.get(name) for name in KEY_FIELDS)


def load_rows(path: Path) -> list[dict]:
    """Rows written so far; a line cut by a crash is dropped (its batch runs again)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def append_row(path: Path, row: dict) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")
        handle.flush()


def attacker_view(clean: Update, update: Update) -> tuple[Update, dict[str, float]]:
    """What the attacker attacks (a FedAvg delta read as the average gradient it implies) and the defended
    update's fidelity to the clean one."""
    fidelity = gradient_fidelity(clean.gradients, as_gradient(update))
    if update.metadata.kind == "delta":
        update = update.with_gradients(as_gradient(update), kind="gradient", local_hyperparams=None)
    return update, fidelity


def attack_row(target, task, attack_name, options, sentences, labels, specs, seed, reveal) -> dict:
    """Attack one defended batch; recovery scores, the update's fidelity to the clean one, and timings."""
    update, truth = defended_client(
        target, sentences, task=task, labels=labels, defenses=specs, seed=seed, reveal=reveal
    )
    clean, _ = defended_client(target, sentences, task=task, labels=labels, seed=seed, reveal=reveal)
    attacked, fidelity = attacker_view(clean, update)
    start = time.perf_counter()
    try:
        reconstruction = get_attack(attack_name, **options).reconstruct(attacked, target)
    except CapabilityError as error:
        return {"error": str(error), "fidelity": fidelity}
    refs = [list(ids) for ids in truth.original_ids]
    scores = score_batch(reconstruction.token_ids, refs, target.tokenizer).without_special
    return {
        "rouge1": scores["rouge1"],
        "rouge2": scores["rouge2"],
        "exact_match": scores["exact_match"],
        "token_accuracy": scores["token_accuracy"],
        "fidelity": fidelity,
        "attack_seconds": time.perf_counter() - start,
        "texts": reconstruction.texts,
        "references": list(truth.sentences),
        "records": list(update.metadata.defenses),
    }


def image_attack_row(source, model, images, labels, attack_name, options, specs, seed) -> dict:
    """Attack one defended image batch: PSNR/SSIM and label accuracy, the update's fidelity to the clean one,
    and timings (the image counterpart of ``attack_row``)."""
    update, truth = capture_image_update(
        source, images, labels, defenses=as_defenses(specs), client_seed=seed, model=model
    )
    clean, _ = capture_image_update(source, images, labels, client_seed=seed, model=model)
    attacked, fidelity = attacker_view(clean, update)
    start = time.perf_counter()
    try:
        reconstruction = IMAGE_ATTACKS[attack_name](**options).reconstruct(attacked, model)
    except CapabilityError as error:
        return {"error": str(error), "fidelity": fidelity}
    scores = evaluate_images(
        reconstruction.images, truth.images, recon_labels=reconstruction.labels, truth_labels=truth.labels.tolist()
    )
    return {
        "psnr": scores["mean_psnr"],
        "ssim": scores["mean_ssim"],
        "label_accuracy": scores.get("label_accuracy"),
        "fidelity": fidelity,
        "attack_seconds": time.perf_counter() - start,
        "records": list(update.metadata.defenses),
    }


def work_items(args: argparse.Namespace, configs: list[tuple[str, float, list[str]]]) -> list[tuple]:
    """Every (utility, config) and (attack, config, batch size, batch index, attack name) item, in run order."""
    utility = [("utility", c) for c in configs] if args.fine_tune_steps else []
    attacks = []
    per_size = {b: args.sentences // b for b in args.batch_sizes}
    if args.order == "batch":
        for index in range(max(per_size.values(), default=0)):
            for batch_size in args.batch_sizes:
                if index < per_size[batch_size]:
                    attacks += [("attack", c, batch_size, index, a) for c in configs for a in args.attacks]
        items = utility + attacks
    else:
        items = []
        for config in configs:
            items += [("utility", config)] if args.fine_tune_steps else []
            for batch_size in args.batch_sizes:
                for index in range(per_size[batch_size]):
                    items += [("attack", config, batch_size, index, a) for a in args.attacks]
    items = [i for i in items if not (i[0] == "attack" and i[1][0] == "secure-aggregation" and i[2] < i[1][1])]
    return items[args.shard_index :: args.shard_count]


def run(args: argparse.Namespace) -> Path:
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    done = {row_key(r) for r in load_rows(results)}
    grid = QUICK_GRID if args.quick else GRID
    families = args.families or list(grid)
    if args.images and "freeze" in families:  # its patterns name a text encoder's parameters: a no-op on images
        families = [f for f in families if f != "freeze"]
        print("freeze skipped: its patterns name text-encoder parameters, none of an image model's")
    unknown = sorted(set(families) - set(grid))
    if unknown:
        raise SystemExit(f"unknown families {unknown}; known: {sorted(grid)}")
    baseline = [] if args.skip_baseline else [("none", 0.0, [])]
    configs = baseline + [(f, s, specs) for f in families for s, specs in grid[f]]
    if args.images:
        if unknown := sorted(set(args.attacks) - set(IMAGE_ATTACKS)):
            raise SystemExit(f"unknown image attacks {unknown}; known: {sorted(IMAGE_ATTACKS)}")
        root = args.image_root / args.images if (args.image_root / args.images).is_dir() else args.image_root
        dataset = load_dataset(args.images, root)
        source = image_source(args.image_arch, args.images, seed=args.seed, num_labels=len(dataset.classes))
        image_model = load_image_model(source)
        base = {"model": source.spec, "task": "images"}
    else:
        sentences, labels = read_cola(args.data_root / "cola" / "dev.tsv")
        target = load_model(args.model, head=head_for(args.task), seed=args.seed)
        reveal = ("lengths", "labels") if args.task == "classification" else ("lengths",)
        base = {"model": args.model, "task": args.task}
    if args.note:
        base["note"] = args.note
    for item in work_items(args, configs):
        family, strength, specs = item[1]
        head = {**base, "family": family, "strength": strength, "specs": specs}
        if item[0] == "utility":
            if args.fine_tune_data != "cola" or args.fine_tune_lr != 1e-4:  # the first sweeps' keys stay valid
                head.update(fine_tune_data=args.fine_tune_data, fine_tune_lr=args.fine_tune_lr)
            if (key := row_key({**head, "kind": "utility"})) in done or not claim(args.claim_dir, key):
                continue
            train, evaluation = (load_benchmark(args.fine_tune_data, args.data_root, split=s) for s in ("train", "dev"))
            result = fine_tune(
                args.model,
                train=(train.sentences, train.labels),
                evaluation=(evaluation.sentences, evaluation.labels),
                defenses=specs,
                steps=args.fine_tune_steps,
                lr=args.fine_tune_lr,
                seed=args.seed,
            ).to_dict()
            result.pop("losses")
            append_row(results, {**head, "kind": "utility", **result})
            done.add(key)
            print(f"utility {family} {strength}: accuracy {result['eval_accuracy']:.3f}", flush=True)
            continue
        _, _, batch_size, index, attack = item
        row = {**head, "kind": "attack", "attack": attack, "batch_size": batch_size, "batch_index": index}
        if row_key(row) in done or not claim(args.claim_dir, row_key(row)):
            continue
        if args.images:  # image attacks run on the CPU
            options = attack_options(attack, args.iterations, "cpu", args.option)
            images, image_labels = dataset.batch(index * batch_size, batch_size)
            seed = args.seed + index
            row.update(image_attack_row(source, image_model, images, image_labels, attack, options, specs, seed))
        else:
            options = attack_options(attack, args.iterations, args.device, args.option)
            part = slice(index * batch_size, (index + 1) * batch_size)
            batch = (sentences[part], labels[part], specs, args.seed + index, reveal)
            row.update(attack_row(target, args.task, attack, options, *batch))
        if options:
            row["attack_options"] = options
        append_row(results, row)
        done.add(row_key(row))
        metric = "psnr" if args.images else "rouge1"
        value = row.get(metric, float("nan"))
        print(f"{family} {strength} {attack} B={batch_size} #{index}: {metric} {value:.3f}", flush=True)
    return results


def claim(folder: Path | None, key: tuple) -> bool:
    """True if this process may run ``key``: no folder, or it is the first to create the key's claim file there."""
    if folder is None:
        return True
    folder.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha1(json.dumps(key).encode()).hexdigest()
    try:
        os.close(os.open(folder / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def merge(out: Path, sources: list[Path]) -> int:
    """Append to ``OUT/results.jsonl`` every row of ``sources`` whose key it does not hold yet; how many were added."""
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = {row_key(r) for r in load_rows(results)}
    added = 0
    for source in sources:
        for row in load_rows(source):
            if row_key(row) not in done:
                append_row(results, row)
                done.add(row_key(row))
                added += 1
    return added


def summarise(rows: list[dict]) -> dict[tuple, dict[str, float]]:
    """Mean recovery and fidelity per (family, strength, attack, batch size), with the utility run beside it."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    utility = {(r["family"], r["strength"]): r for r in rows if r["kind"] == "utility"}
    for row in rows:
        if row["kind"] == "attack" and ("rouge1" in row or "psnr" in row):
            groups[(row["family"], row["strength"], row["attack"], row["batch_size"], row["task"])].append(row)
    summary = {}

    def order(item: tuple) -> tuple:
        family, strength, attack, batch_size, task = item[0]
        return (task == "images", family != "none", family, float(strength), attack, batch_size)

    for key, members in sorted(groups.items(), key=order):
        metrics = IMAGE_METRICS if key[4] == "images" else TEXT_METRICS
        entry = {m: statistics.mean(r[m] for r in members if r.get(m) is not None) for m in metrics}
        entry["cosine"] = statistics.mean(r["fidelity"]["cosine"] for r in members)
        entry["batches"] = len(members)
        if (key[0], key[1]) in utility:
            entry["accuracy"] = utility[(key[0], key[1])]["eval_accuracy"]
        summary[key] = entry
    return summary


TEXT_METRICS = ("rouge1", "rouge2", "exact_match")
IMAGE_METRICS = ("psnr", "ssim", "label_accuracy")


def render_table(summary: dict[tuple, dict[str, float]], notes: list[str] | None = None) -> str:
    """The text rows (ROUGE, exact match), then the image rows (PSNR, SSIM, label accuracy) if any."""
    lines = [f"Note: {note}\n" for note in notes or []]
    text = {k: e for k, e in summary.items() if k[4] != "images"}
    images = {k: e for k, e in summary.items() if k[4] == "images"}
    if text or not images:
        lines += [
            "| defense | strength | attack | B | ROUGE-1 | ROUGE-2 | exact | grad cosine | fine-tune acc | batches |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
    for (family, strength, attack, batch_size, _), e in text.items():
        accuracy = f"{e['accuracy']:.3f}" if "accuracy" in e else "-"
        lines.append(
            f"| {family} | {strength:g} | {attack} | {batch_size} | {100 * e['rouge1']:.1f} | {100 * e['rouge2']:.1f}"
            f" | {100 * e['exact_match']:.1f} | {e['cosine']:.4f} | {accuracy} | {e['batches']} |"
        )
    if images:
        lines += [
            "\nImages:\n",
            "| defense | strength | attack | B | PSNR (dB) | SSIM | label acc | grad cosine | batches |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for (family, strength, attack, batch_size, _), e in images.items():
            labels = f"{e['label_accuracy']:.2f}" if "label_accuracy" in e else "-"
            lines.append(
                f"| {family} | {strength:g} | {attack} | {batch_size} | {e['psnr']:.1f} | {e['ssim']:.3f}"
                f" | {labels} | {e['cosine']:.4f} | {e['batches']} |"
            )
    return "\n".join(lines) + "\n"


def render_utility(rows: list[dict]) -> str:
    """The fine-tuning runs, one line per defense setting (empty when there are none)."""
    runs = sorted(
        (r for r in rows if r["kind"] == "utility"),
        key=lambda r: (r["family"] != "none", r["family"], float(r["strength"])),
    )
    if not runs:
        return ""
    lines = [
        "| defense | strength | model | data | lr | steps | train loss | eval loss | eval acc | majority acc"
        " | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        data, lr = r.get("fine_tune_data", "cola"), r.get("fine_tune_lr", 1e-4)
        lines.append(
            f"| {r['family']} | {r['strength']:g} | {r['model']} | {data} | {lr:g} | {r['steps']}"
            f" | {r['train_loss']:.4f}"
            f" | {r['eval_loss']:.4f} | {r['eval_accuracy']:.3f} | {r['majority_accuracy']:.3f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def render_plot(summary: dict[tuple, dict[str, float]], path: Path, *, images: bool = False) -> bool:
    """ROUGE-1 (solid; dotted: no defense) and gradient cosine (dashed) versus strength, one panel per family;
    with ``images``, PSNR of the image rows (no cosine: another scale).

    Returns False when matplotlib is not installed or there is nothing to draw.
    """
    summary = {k: e for k, e in summary.items() if (k[4] == "images") == images}
    metric = "psnr" if images else "rouge1"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    families = sorted({key[0] for key in summary if key[0] != "none"})
    if not families:
        return False
    figure, axes = plt.subplots(1, len(families), figsize=(4 * len(families), 3.5), squeeze=False)
    for axis, family in zip(axes[0], families, strict=True):
        series: dict[tuple, list[tuple[float, dict]]] = defaultdict(list)
        for (fam, strength, attack, batch_size, _), entry in summary.items():
            if fam == family:
                series[(attack, batch_size)].append((strength, entry))
        for (attack, batch_size), points in sorted(series.items()):
            points.sort(key=lambda p: p[0])
            xs = [p[0] for p in points]
            line = axis.plot(xs, [p[1][metric] for p in points], marker="o", label=f"{attack} B={batch_size}")
            if not images:
                axis.plot(xs, [p[1]["cosine"] for p in points], linestyle="--", color=line[0].get_color())
            clean = [e for k, e in summary.items() if k[:4] == ("none", 0.0, attack, batch_size)]
            if clean:
                axis.axhline(clean[0][metric], linestyle=":", color=line[0].get_color())
        if family in ("noise", "dpsgd"):
            axis.set_xscale("log")
        axis.set_title(family)
        axis.set_xlabel("strength")
        if not images:
            axis.set_ylim(-0.05, 1.05)
        axis.legend(fontsize=7)
    axes[0][0].set_ylabel("PSNR dB (dotted: no defense)" if images else "ROUGE-1 (solid), grad cosine (dashed)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    if args.merge:
        print(f"merged {merge(args.out, args.merge)} new rows into {args.out / 'results.jsonl'}")
    results = args.out / "results.jsonl" if args.render_only else run(args)
    rows = load_rows(results)
    summary = summarise(rows)
    notes = sorted({row["note"] for row in rows if row.get("note")})
    table = render_table(summary, notes)
    if utility := render_utility(rows):
        table += "\nFine-tuning under each defense:\n\n" + utility
    (args.out / "table.md").write_text(table, encoding="utf-8")
    print(table)
    for images, name in ((False, "recovery.png"), (True, "recovery_images.png")):
        if render_plot(summary, args.out / name, images=images):
            print(f"plot: {args.out / name}")
    if importlib.util.find_spec("matplotlib") is None:
        print("no plot: matplotlib is not installed (pip install matplotlib)")


if __name__ == "__main__":
    main()
