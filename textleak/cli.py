"""Command line: argument parsing and printing only; the work is done by the library.

``textleak`` with no arguments runs ``textleak attack`` on the packaged MiniLM and our sample sentences.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from textleak.attacks import ATTACKS, get_attack
from textleak.attacks.base import Progress
from textleak.data import batches, read_sentences, sample_sentences
from textleak.defenses import DEFENSES, as_defenses
from textleak.errors import TextleakError
from textleak.evaluation.cli import add_evaluate_parser, run_evaluate
from textleak.experiment import BatchResult, attack_sentences, attack_update
from textleak.models import load_model, load_source
from textleak.report import metrics_table, side_by_side
from textleak.tasks import TASKS, head_for
from textleak.update import Update, check_matches_model

DEFAULT_ATTACK = "span"
DEFAULT_TASK = "mlm"


def _option(text: str) -> tuple[str, Any]:
    """Parse ``key=value``; the value as JSON when it parses (numbers, true/false, lists), else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.replace("-", "_"), tuple(value) if isinstance(value, list) else value


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part for part in text.split(",") if part and part != "none")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="textleak", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command")
    attack = commands.add_parser("attack", help="simulate a client, attack its update, score the recovery")
    source = attack.add_argument_group("what the client trains on")
    source.add_argument("--model", default=None, help="default | random:<shape> | local folder | hub id")
    source.add_argument("--model-seed", type=int, default=0, help="seed of any freshly initialised weights")
    source.add_argument("--text", action="append", help="a private sentence (repeatable)")
    source.add_argument("--file", type=Path, help="a text file, one sentence a line")
    source.add_argument("--limit", type=int, help="use at most this many sentences")
    source.add_argument("--task", choices=TASKS, default=DEFAULT_TASK)
    source.add_argument("--batch-size", type=int, default=1)
    source.add_argument("--labels", type=lambda s: [int(x) for x in s.split(",")], help="classification labels")
    source.add_argument("--reveal", type=_csv, default=("lengths",), help="what the attacker knows: lengths,labels")
    source.add_argument(
        "--defense",
        action="append",
        default=[],
        help=f"defense spec applied by the client, in order (repeatable), e.g. prune:ratio=0.9; one of: "
        f"{', '.join(sorted(DEFENSES))}",
    )
    source.add_argument("--update", type=Path, help="attack this saved update file instead of simulating a client")
    source.add_argument("--save-update", type=Path, help="save each simulated update (safetensors + JSON header)")
    how = attack.add_argument_group("the attack")
    how.add_argument("--attack", default=DEFAULT_ATTACK, help=f"one of: {', '.join(sorted(ATTACKS))}")
    how.add_argument("--iterations", type=int, help="optimisation steps (attack default when omitted)")
    how.add_argument("--option", type=_option, action="append", default=[], help="attack option key=value")
    how.add_argument("--seed", type=int, default=0, help="seed of the client's masking and the attack")
    out = attack.add_argument_group("output")
    out.add_argument("--json", type=Path, help="write the full results and configuration as JSON")
    out.add_argument("--no-progress", action="store_true", help="no progress bars")
    from image_support.cli import add_image_attack_parser  # the image backend, loaded only by the command line

    add_image_attack_parser(commands)
    add_evaluate_parser(commands)
    return parser


def _update_path(base: Path, index: int, count: int) -> Path:
    return base if count == 1 else base.with_name(f"{base.stem}-{index}{base.suffix}")


def _print_result(index: int, result: BatchResult) -> None:
    rec = result.reconstruction
    print(f"\n== batch {index}: {rec.attack}, {rec.timings.get('total_s', 0.0):.1f} s")
    if result.truth is not None:
        print(side_by_side(list(zip(result.truth.sentences, _matched_texts(result), strict=True))))
    else:
        print("\n".join(f"recovered: {text}" for text in rec.texts))
    for warning in rec.warnings:
        print(f"warning: {warning}")


def _matched_texts(result: BatchResult) -> list[str]:
    """Recovered texts in the order of the references they were matched to (Hungarian on ROUGE-1)."""
    assert result.scores is not None and result.truth is not None
    texts = [""] * len(result.truth.sentences)
    for pair in result.scores.pairs:
        texts[pair["ref_index"]] = result.reconstruction.texts[pair["pred_index"]]
    return texts


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]} if rows else {}


def run_attack(args: argparse.Namespace) -> int:
    options = dict(args.option)
    options.setdefault("seed", args.seed)
    if args.iterations is not None:
        options["iterations"] = args.iterations
    attack = get_attack(args.attack, **options)
    as_defenses(args.defense)  # refuse a bad spec before any model is loaded
    progress_bars = not args.no_progress
    results: list[BatchResult] = []
    if args.update is not None:
        update = Update.load(args.update)
        target = (
            load_model(args.model, head=update.metadata.model.head)
            if args.model
            else load_source(update.metadata.model)
        )
        check_matches_model(update, target.model)
        print(repr(update))
        results.append(attack_update(update, target, attack, progress=_bar(progress_bars, "attack")))
        _print_result(0, results[0])
    else:
        sentences = _sentences(args)
        target = load_model(args.model or "default", head=head_for(args.task), seed=args.model_seed)
        groups = batches(sentences, args.batch_size)
        for index, group in enumerate(tqdm(groups, desc="batches", disable=not progress_bars or len(groups) == 1)):
            labels = args.labels[index * args.batch_size : (index + 1) * args.batch_size] if args.labels else None
            save = _update_path(args.save_update, index, len(groups)) if args.save_update else None
            result = attack_sentences(
                target,
                group,
                attack,
                task=args.task,
                seed=args.seed + index,
                labels=labels,
                reveal=args.reveal,
                defenses=args.defense,
                save_update=save,
                progress=_bar(progress_bars and len(groups) == 1, f"batch {index}"),
            )
            results.append(result)
            _print_result(index, result)
    scored = [r.scores for r in results if r.scores is not None]
    if scored:
        print(
            "\n"
            + metrics_table(
                {
                    "without special tokens": _mean([s.without_special for s in scored]),
                    "with special tokens": _mean([s.with_special for s in scored]),
                }
            )
        )
    if args.json:
        payload = {
            "config": {k: _jsonable(v) for k, v in vars(args).items()},
            "attack": repr(attack),
            "batches": [r.to_dict() for r in results],
        }
        args.json.write_text(json.dumps(payload, indent=2, default=str))
        print(f"\nwrote {args.json}")
    return 0


def _jsonable(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


def _sentences(args: argparse.Namespace) -> list[str]:
    if args.text:
        sentences = list(args.text)
    elif args.file:
        sentences = read_sentences(args.file)
    else:
        sentences = sample_sentences()
    return sentences[: args.limit] if args.limit else sentences


def _bar(enabled: bool, desc: str) -> Progress | None:
    """A tqdm bar driven by the library's progress(done, total) callback, or None when bars are off."""
    if not enabled:
        return None
    state: dict[str, tqdm] = {}

    def progress(done: int, total: int) -> None:
        if "bar" not in state:
            state["bar"] = tqdm(total=total, desc=desc, leave=False)
        bar = state["bar"]
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return progress


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``textleak`` console script and of ``python -m textleak``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["attack", *argv]
    args = build_parser().parse_args(argv)
    try:
        if args.command == "attack":
            return run_attack(args)
        if args.command == "evaluate":
            return run_evaluate(args)
        if args.command == "image-attack":
            from image_support.cli import run_image_attack

            return run_image_attack(args)
    except (TextleakError, ValueError, FileNotFoundError) as error:
        print(f"textleak: error: {error}", file=sys.stderr)
        return 2
    build_parser().print_help()
    return 1
