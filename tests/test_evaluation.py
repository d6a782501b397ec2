"""The evaluation harness: loaders, sampling, bootstrap, matching, resumable store, executors, reports, CLI."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from textleak.cli import main
from textleak.errors import UnknownNameError
from textleak.evaluation import (
    EvaluationConfig,
    ProcessExecutor,
    RayExecutor,
    ResultStore,
    bootstrap,
    build_jobs,
    load_source,
    run_evaluation,
)
from textleak.evaluation.aggregate import SettingSummary, aggregate
from textleak.evaluation.matrix import parse_attack
from textleak.evaluation.runner import pending_jobs, store_path
from textleak.evaluation.sources import sample_indices
from textleak.metrics import rouge, score_batch

COLA_ROWS = [
    ("gj04", 1, "the cat sat on the mat."),
    ("gj04", 0, "a <b>bold</b> & brave dog ran home."),
    ("ad03", 1, "we saw the river."),
]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three benchmark layouts in miniature: CoLA headerless tsv, SST-2 with header, RT pos/neg in cp1252."""
    root = tmp_path_factory.mktemp("text")
    (root / "cola").mkdir()
    (root / "cola" / "dev.tsv").write_text(
        "".join(f"{source}\t{label}\t{'' if label else '*'}\t{text}\n" for source, label, text in COLA_ROWS)
    )
    (root / "sst2").mkdir()
    (root / "sst2" / "dev.tsv").write_text('sentence\tlabel\nit \'s a " charming " film . \t1\nbleak \t0\n')
    (root / "rotten_tomatoes").mkdir()
    (root / "rotten_tomatoes" / "rt-polarity.pos").write_bytes("a caf\u00e9 gem \u2019s fine\nwarm\n".encode("cp1252"))
    (root / "rotten_tomatoes" / "rt-polarity.neg").write_bytes(b"dull\n")
    return root


def config(data_root: Path, **changes: object) -> EvaluationConfig:
    """The tiny matrix the run tests share: 3 CoLA sentences at B=1, span and a 2-step TAG (6 batches)."""
    options: dict[str, object] = {
        "data": ("cola",),
        "data_root": str(data_root),
        "models": ("random:bert-tiny",),
        "tasks": ("classification",),
        "attacks": ("span", "tag:iterations=2"),
        "batch_sizes": (1,),
        "sentences": 3,
    }
    options.update(changes)
    return EvaluationConfig(**options)  # type: ignore[arg-type]


def comparable(summaries: list[SettingSummary]) -> list[dict]:
    """A report's rows without the timings (the only part that differs between two runs of the same matrix)."""
    rows = []
    for summary in summaries:
        row = summary.to_dict()
        row.pop("seconds_per_batch")
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def reference(data_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny matrix run once, uninterrupted, in this process."""
    return run_evaluation(config(data_root), tmp_path_factory.mktemp("reference") / "run")


# --- data sources -----------------------------------------------------------------------------------------------


def test_file_loaders_pick_columns_by_name(tmp_path: Path) -> None:
    (tmp_path / "a.tsv").write_text('id\ttext\tlabel\n1\tsay "hi" twice\t1\n2\t \t0\n3\tbye\t0\n')
    tsv = load_source(str(tmp_path / "a.tsv"))
    assert tsv.sentences == ('say "hi" twice', "bye") and tsv.labels == (1, 0) and tsv.name == "a"

    (tmp_path / "b.csv").write_text('review,stars\n"good, very good",5\nbad,1\n')
    csv_data = load_source(str(tmp_path / "b.csv"), column="review", label_column="stars")
    assert csv_data.sentences == ("good, very good", "bad") and csv_data.labels == (5, 1)

    (tmp_path / "c.jsonl").write_text('{"sentence": "one", "label": 0}\n\n{"sentence": "two", "label": 1}\n')
    assert load_source(str(tmp_path / "c.jsonl")).sentences == ("one", "two")

    (tmp_path / "d.txt").write_text("first line\n\n second line \n")
    txt = load_source(str(tmp_path / "d.txt"))
    assert txt.sentences == ("first line", "second line") and txt.labels is None


def test_benchmark_layouts(data_root: Path, tmp_path: Path) -> None:
    cola = load_source("cola", data_root=data_root)
    assert cola.sentences[0] == "the cat sat on the mat." and cola.labels == (1, 0, 1)
    (tmp_path / "cola").mkdir()  # a dev.tsv with the out-of-domain set appended: the in-domain file wins
    (tmp_path / "cola" / "dev.tsv").write_text("a\t1\t\tin.\nb\t0\t*\tout.\n")
    (tmp_path / "cola" / "in_domain_dev.tsv").write_text("a\t1\t\tin.\n")
    assert load_source("cola", data_root=tmp_path).sentences == ("in.",)
    sst2 = load_source("SST-2", data_root=data_root)
    assert sst2.sentences == ('it \'s a " charming " film .', "bleak") and sst2.labels == (1, 0)
    rt = load_source("rt", data_root=data_root)  # cp1252 bytes, interleaved positive/negative
    assert rt.sentences == ("a caf\u00e9 gem \u2019s fine", "dull", "warm") and rt.labels == (1, 0, 1)


def test_saved_datasets_folder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_dict({"text": ["hello there", "general"], "label": [1, 0]})
    datasets.DatasetDict({"train": data, "validation": data.select([1])}).save_to_disk(str(tmp_path / "dd"))
    assert load_source(f"hf:{tmp_path / 'dd'}").sentences == ("general",)  # validation by default
    assert load_source(str(tmp_path / "dd"), split="train").labels == (1, 0)
    with pytest.raises(ValueError, match="split.*train, validation"):
        load_source(str(tmp_path / "dd"), split="test")


def test_bad_inputs_are_errors_naming_the_problem(tmp_path: Path, data_root: Path) -> None:
    (tmp_path / "a.csv").write_text("text,label\nhi,1\n")
    with pytest.raises(ValueError, match="no column 'sentense'; columns: text, label"):
        load_source(str(tmp_path / "a.csv"), column="sentense")
    with pytest.raises(ValueError, match="no label column 'y'"):
        load_source(str(tmp_path / "a.csv"), label_column="y")
    (tmp_path / "b.csv").write_text("body,label\nhi,1\n")
    with pytest.raises(ValueError, match="no 'sentence' or 'text' column.*columns: body, label"):
        load_source(str(tmp_path / "b.csv"))
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="'empty'.*holds no sentences"):
        load_source(str(tmp_path / "empty.txt"))
    (tmp_path / "header.tsv").write_text("sentence\tlabel\n")
    with pytest.raises(ValueError, match="holds no rows"):
        load_source(str(tmp_path / "header.tsv"))
    with pytest.raises(ValueError, match="--data-root"):
        load_source("cola")
    with pytest.raises(FileNotFoundError, match="expected rt-polarity.pos"):
        load_source("rt", data_root=tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        load_source(str(tmp_path / "nope.tsv"))
    with pytest.raises(UnknownNameError, match="unknown attack 'spam'"):
        config(data_root, attacks=("spam",))
    with pytest.raises(ValueError, match="defense"):
        config(data_root, defenses=("noise:sigmaa=1",))


def test_sampling_is_seeded_and_nested() -> None:
    assert sample_indices(10, 3) == [0, 1, 2]
    small, large = sample_indices(10, 3, mode="random", seed=1), sample_indices(10, 6, mode="random", seed=1)
    assert large[:3] == small and len(set(large)) == 6
    assert sample_indices(10, 6, mode="random", seed=1) == large != sample_indices(10, 6, mode="random", seed=2)
    assert sample_indices(4, 100) == [0, 1, 2, 3]


def test_plan_keys_batches_and_labels(data_root: Path) -> None:
    jobs = build_jobs(config(data_root, batch_sizes=(1, 2)), [load_source("cola", data_root=data_root)])
    assert len(jobs) == 2 * (3 + 2)  # (span, tag) x (3 batches at B=1 + 2 at B=2)
    assert len({job.key for job in jobs}) == len(jobs)
    three = build_jobs(config(data_root, sentences=3, attacks=("tag:iterations=2",), batch_sizes=(2,)),
                       [load_source("cola", data_root=data_root)])
    last = three[-1]  # the smaller last batch
    assert last.sentences == (COLA_ROWS[2][2],) and last.labels == (1,) and last.batch_seed == 1
    assert json.loads(last.key) == ["random:bert-tiny", "classification", "cola", 2, "tag:iterations=2", "none", 1, 0]
    assert parse_attack('tag:iterations=5,params=["layer.0.","layer.1."],decode=l2') == (
        "tag", {"iterations": 5, "params": ("layer.0.", "layer.1."), "decode": "l2"}
    )


# --- protocol: bootstrap and Hungarian matching ------------------------------------------------------------------


def test_bootstrap_matches_hand_computation() -> None:
    constant = bootstrap([0.25, 0.25, 0.25], resamples=50)
    assert (constant.low, constant.mid, constant.high, constant.mean) == (0.25, 0.25, 0.25, 0.25)
    # two values 0 and 1: a resampled mean is 0, 1/2 or 1 with probabilities 1/4, 1/2, 1/4
    two = bootstrap([0.0, 1.0], resamples=4000, seed=3)
    assert (two.low, two.mid, two.high, two.mean) == (0.0, 0.5, 1.0, 0.5)
    # the same numbers by an explicit loop over the same seeded draws
    values = [0.1, 0.5, 0.9, 0.3]
    draws = np.random.default_rng(7).integers(0, 4, size=(200, 4))
    means = sorted(sum(values[i] for i in row) / 4 for row in draws)
    interval = bootstrap(values, resamples=200, seed=7, confidence=0.9)
    assert interval.mid == pytest.approx((means[99] + means[100]) / 2)
    assert interval.low == pytest.approx(np.percentile(means, 5)) and interval.mean == pytest.approx(0.45)
    assert bootstrap(values, seed=1) == bootstrap(values, seed=1)
    with pytest.raises(ValueError, match="at least one value"):
        bootstrap([])


def test_hungarian_matching_matches_hand_computation(tiny) -> None:
    tokenizer = tiny.tokenizer
    refs = ["red blue green", "red blue cat dog"]
    preds = ["red blue cat", "red blue green"]
    # ROUGE-1 F by hand: pred0-ref0 2/3, pred0-ref1 2*(3/3*3/4)/(3/3+3/4)=6/7, pred1-ref0 1, pred1-ref1 4/7
    assert rouge(preds[0], refs[1])["rouge1"] == pytest.approx(6 / 7)
    ids = [tokenizer(text)["input_ids"] for text in (*preds, *refs)]
    scores = score_batch(ids[:2], ids[2:], tokenizer)
    # best assignment: pred1->ref0, pred0->ref1 = (1 + 6/7) / 2 (the alternative gives (2/3 + 4/7) / 2)
    assert [(p["pred_index"], p["ref_index"]) for p in scores.pairs] == [(1, 0), (0, 1)]
    assert scores.without_special["rouge1"] == pytest.approx((1 + 6 / 7) / 2)
    brute = max(sum(rouge(preds[i], refs[j])["rouge1"] for j, i in enumerate(order)) / 2
                for order in itertools.permutations(range(2)))
    assert scores.without_special["rouge1"] == pytest.approx(brute)


# --- runs: resume, executors, time limit ---------------------------------------------------------------------------


def test_reference_run_records_and_reports(reference, data_root: Path) -> None:
    assert reference.jobs == reference.ran == 6 and reference.skipped == 0
    assert all(record["status"] == "ok" for record in reference.records)
    span_b1 = reference.summaries[0]
    assert span_b1.setting["attack"] == "span" and span_b1.batches == 3
    assert span_b1.metrics["without_special"]["rouge1"].mid == 1.0  # exact on a tiny model at B=1
    store = ResultStore(store_path(reference.paths[".md"].with_suffix("")))
    run_record = store.records()[0]
    assert run_record["type"] == "run" and run_record["config"]["seed"] == 0
    assert run_record["config"]["attacks"] == ["span", "tag:iterations=2"]
    payload = json.loads(reference.paths[".json"].read_text())
    assert payload["config"]["batch_sizes"] == [1] and len(payload["settings"]) == 2
    assert {row["method"] for row in payload["anchors"]} >= {"TAG", "LAMP", "DAGER", "span"}
    header = reference.paths[".csv"].read_text().splitlines()[0]
    assert "rouge1_mid" in header and "rouge2_special_low" in header and "seconds_mean" in header


def test_resume_after_crash_gives_the_same_table(reference, data_root: Path, tmp_path: Path) -> None:
    prefix = tmp_path / "run"
    seen: list[dict] = []

    def crash_after_three(record: dict) -> None:
        seen.append(record)
        if len(seen) == 3:
            raise KeyboardInterrupt  # the user stops the run (or the machine goes down) after the 3rd batch

    with pytest.raises(KeyboardInterrupt):
        run_evaluation(config(data_root), prefix, on_record=crash_after_three)
    path = store_path(prefix)
    lines = path.read_text().splitlines(keepends=True)
    assert len(lines) == 1 + 3  # the run record and three batches, each written as it finished
    path.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # the last write was cut in half
    resumed = run_evaluation(config(data_root), prefix)
    assert resumed.skipped == 2 and resumed.ran == 4
    assert comparable(resumed.summaries) == comparable(reference.summaries)
    again = run_evaluation(config(data_root), prefix)
    assert again.ran == 0 and comparable(again.summaries) == comparable(reference.summaries)
    assert all(json.loads(line) for line in path.read_text().splitlines())  # no damaged line left behind


def test_time_limit_records_a_timeout(reference, data_root: Path, tmp_path: Path) -> None:
    slow = config(data_root, attacks=("tag:iterations=2", "tag:iterations=1000000"), batch_sizes=(1,), sentences=1)
    result = run_evaluation(slow, tmp_path / "run", executor=ProcessExecutor(workers=1, time_limit=2.0))
    fast, stuck = result.records
    assert fast["status"] == "ok" and stuck["status"] == "timeout" and "2 s time limit" in stuck["error"]
    expected = next(r for r in reference.records if r["key"] == fast["key"])  # the same batch, run in this process
    assert fast["scores"] == expected["scores"] and fast["recovered"] == expected["recovered"]
    assert result.summaries[1].timeouts == 1 and result.summaries[1].batches == 0
    assert run_evaluation(slow, tmp_path / "run").ran == 0  # a timeout is recorded: a rerun skips it ...
    jobs = build_jobs(slow, [load_source("cola", data_root=data_root)])
    assert [job.key for job in pending_jobs(jobs, ResultStore(store_path(tmp_path / "run")), retry=True)] == [
        stuck["key"]
    ]  # ... unless asked to retry


def test_ray_executor_gives_the_local_table(reference, data_root: Path, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray", reason='Ray is not installed (pip install "textleak[ray]")')
    small = config(data_root, attacks=("span",), sentences=2)  # two of the reference's batches
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        result = run_evaluation(small, tmp_path / "run", executor=RayExecutor())
    finally:
        ray.shutdown()
    assert result.ran == 2 and len(ResultStore(store_path(tmp_path / "run")).batches()) == 2
    local = aggregate([r for r in reference.records if r["key"] in {job["key"] for job in result.records}])
    assert comparable(result.summaries) == comparable(local)


def test_ray_executor_records_a_timeout(reference, data_root: Path, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray", reason='Ray is not installed (pip install "textleak[ray]")')
    fast = config(data_root, attacks=("tag:iterations=2",), batch_sizes=(1,), sentences=1)
    slow = config(data_root, attacks=("tag:iterations=2", "tag:iterations=1000000"), batch_sizes=(1,), sentences=1)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:  # the fast batch first, unlimited (a fresh Ray worker pays for imports), then the stuck one under a limit
        first = run_evaluation(fast, tmp_path / "run", executor=RayExecutor())
        result = run_evaluation(slow, tmp_path / "run", executor=RayExecutor(time_limit=3.0))
    finally:
        ray.shutdown()
    (done,) = first.records
    assert result.skipped == 1 and result.ran == 1 and result.records[0] == done  # records: the whole store
    stuck = result.records[1]
    assert done["status"] == "ok" and stuck["status"] == "timeout" and "3 s time limit" in stuck["error"]
    expected = next(r for r in reference.records if r["key"] == done["key"])
    assert done["scores"] == expected["scores"] and done["recovered"] == expected["recovered"]
    assert result.summaries[1].timeouts == 1 and result.summaries[1].batches == 0
    stored = ResultStore(store_path(tmp_path / "run")).batches()
    assert sorted(r["status"] for r in stored.values()) == ["ok", "timeout"]


# --- command line ----------------------------------------------------------------------------------------------------


def test_cli_writes_all_reports(data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "eval"
    code = main(["evaluate", "--data", "cola", "--data-root", str(data_root), "--models", "random:bert-tiny",
                 "--attacks", "tag:iterations=2", "--defenses", "none", "quantize:dtype=fp16", "--batch-sizes", "2",
                 "--sentences", "2",
                 "--out", str(out), "--no-progress", "--bootstrap", "100"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "2 batches planned: 2 run now" in printed and "| published | DAGER |" in printed
    page = (tmp_path / "eval.html").read_text()
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; brave" in page and "<b>bold" not in page  # data is escaped
    assert "data:image/png;base64," in page or "Plots omitted" in page
    assert (tmp_path / "eval.md").read_text().count("| cola | 2 | tag:iterations=2 |") == 2
    assert main(["evaluate", "--data", str(tmp_path / "eval.csv"), "--column", "nope", "--out", str(out)]) == 2
    assert "no column 'nope'" in capsys.readouterr().err
