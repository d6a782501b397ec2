"""scripts/span_table.py: the span benchmark's files gathered into one table checked against the issue's targets."""

import csv
import json

import pytest
from conftest import load_script


@pytest.fixture(scope="module")
def table():
    return load_script("span_table")


def _row(model="default", task="classification", dataset="cola", batch_size=8, **figures):
    base = {"rouge1": 1.0, "rouge2": 1.0, "exact_match": 1.0, "exact_match_live": 1.0, "token_accuracy": 1.0,
            "seconds": 30.0, "max_seconds": 50.0, "batches": 20}
    return {"model": model, "task": task, "dataset": dataset, "batch_size": batch_size, **base, **figures}


def _write(path, *rows):
    path.write_text(json.dumps({"command": "bench_span.py", "results": list(rows)}))
    return path


def test_a_later_file_replaces_a_cell_and_each_verdict_names_the_target_missed(table, tmp_path):
    old = _write(tmp_path / "old.json", _row(rouge1=0.989, exact_match=0.988), _row(dataset="rt", rouge1=0.9))
    new = _write(
        tmp_path / "new.json",
        _row(),  # cola B=8 measured again: replaces old.json's
        _row(batch_size=1, seconds=6.0),
        _row(task="mlm", rouge1=0.85, rouge1_live=1.0, exact_match=0.8, exact_match_live=0.96),
        _row(task="mlm", dataset="sst2", rouge1_live=0.995, exact_match=0.9, exact_match_live=0.9),
        _row(task="mlm", dataset="rt", exact_match_live=0.9),  # written before rouge1_live was recorded
        _row(task="mlm", dataset="rt", batch_size=2),  # the same, but every live sentence exact
        _row(batch_size=16, rouge1=0.5, exact_match=0.4),
        _row(batch_size=4, batches=5),
    )
    rows = {(r["task"], r["dataset"], r["batch_size"]): r for r in table.table_rows(table.read_cells([old, new]))}
    assert rows["classification", "cola", 8]["verdict"] == "meets"
    assert rows["classification", "cola", 8]["file"] == "new.json"
    assert rows["classification", "rt", 8]["verdict"] == "misses: R1 < 99"
    assert rows["classification", "cola", 1]["verdict"] == "misses: 6 s >= 5 s"
    assert rows["mlm", "cola", 8]["verdict"] == "meets"  # judged over the sentences that reached the gradient
    assert rows["mlm", "sst2", 8]["verdict"] == "misses: exact < 95%"
    assert rows["mlm", "rt", 8]["verdict"] == "misses: R1 over the live sentences not recorded, exact < 95%"
    assert rows["mlm", "rt", 2]["verdict"] == "meets"
    assert rows["classification", "cola", 16]["verdict"] == "no target"
    assert rows["classification", "cola", 4]["verdict"] == "meets (5 of 20 batches)"


def test_the_matrix_lists_every_setting_of_the_issue_and_main_writes_both_tables(table, tmp_path):
    source = _write(tmp_path / "one.json", _row(rouge1=0.995, seconds=31.25))
    assert table.main([str(source), "--matrix", "--out", str(tmp_path / "matrix")]) == 0
    with (tmp_path / "matrix.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 2 * 3 * 5
    measured = [r for r in rows if r["verdict"] != "not measured"]
    assert measured == [{**measured[0], "model": "default", "batch_size": "8", "rouge1": "99.5", "seconds": "31.2",
                         "verdict": "meets", "file": "one.json"}]
    assert "| default | classification | cola | 8 | 20 | 99.5 |" in (tmp_path / "matrix.md").read_text()


def test_a_file_that_is_not_a_span_benchmark_is_refused(table, tmp_path):
    other = tmp_path / "sweep.json"
    other.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="not a bench_span.py result file"):
        table.read_cells([other])
    with pytest.raises(SystemExit):
        table.main([str(tmp_path / "absent.json"), "--out", str(tmp_path / "t")])
