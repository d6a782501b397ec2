"""The command line end to end on the tiny config: simulate, save, attack, print, JSON; and its errors."""

import json
import subprocess
import sys
from pathlib import Path

from textleak.cli import main
from textleak.data import sample_sentences
from textleak.update import Update

TINY = ["--model", "random:bert-tiny", "--no-progress"]


def test_attack_end_to_end_with_saved_update_and_json(tmp_path: Path, capsys):
    out, saved = tmp_path / "result.json", tmp_path / "update.safetensors"
    argv = [
        "attack",
        *TINY,
        "--text",
        "the cat sat on the mat.",
        "--attack",
        "dlg",
        "--iterations",
        "20",
        "--task",
        "all-tokens",
        "--save-update",
        str(saved),
        "--json",
        str(out),
        "--seed",
        "0",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "original" in printed and "recovered" in printed and "rouge1" in printed
    result = json.loads(out.read_text())
    assert result["config"]["attack"] == "dlg" and result["config"]["seed"] == 0
    batch = result["batches"][0]
    assert batch["truth"]["sentences"] == ["the cat sat on the mat."]
    assert batch["scores"]["without_special"]["bag_f1"] >= 0.8
    assert batch["reconstruction"]["config"]["iterations"] == 20
    update = Update.load(saved)
    assert update.metadata.model.spec == "random:bert-tiny" and update.metadata.task == "all-tokens"

    # attack the saved file: the model is rebuilt from the file's metadata; no ground truth to score
    assert main(["attack", "--update", str(saved), "--attack", "tag", "--iterations", "3", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "recovered:" in printed and "Update(gradient of 'random:bert-tiny'" in printed


def test_batches_from_a_file_and_classification(tmp_path: Path, capsys):
    sentences = tmp_path / "s.txt"
    sentences.write_text("good film\n\nbad film\nfine\n")
    argv = [
        "attack",
        *TINY,
        "--file",
        str(sentences),
        "--batch-size",
        "2",
        "--task",
        "classification",
        "--labels",
        "1,0,1",
        "--attack",
        "cosine",
        "--iterations",
        "2",
        "--json",
        str(tmp_path / "o.json"),
        "--defense",
        "prune:ratio=0.5",
    ]
    assert main(argv) == 0
    result = json.loads((tmp_path / "o.json").read_text())
    assert [b["update"]["metadata"]["batch_size"] for b in result["batches"]] == [2, 1]
    assert result["batches"][0]["update"]["metadata"]["defenses"][0] == {"name": "prune", "ratio": 0.5}
    assert result["batches"][0]["truth"]["labels"] == [1, 0]


def test_errors_are_reported_clearly(tmp_path: Path, capsys):
    assert main(["attack", *TINY, "--text", "x", "--attack", "nope"]) == 2
    assert "unknown attack 'nope'" in capsys.readouterr().err
    assert main(["attack", *TINY, "--text", "x", "--defense", "prune:ratio=2"]) == 2
    assert "option ratio must be in [0.0, 1.0], got 2.0" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert main(["attack", *TINY, "--file", str(empty)]) == 2
    assert "holds no sentences" in capsys.readouterr().err
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    assert main(["attack", "--update", str(broken)]) == 2
    assert "could not read update file" in capsys.readouterr().err


def test_module_entry_point_and_sample_sentences():
    help_text = subprocess.run(
        [sys.executable, "-m", "textleak", "attack", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--save-update" in help_text and "--attack" in help_text
    assert len(sample_sentences()) >= 5


def test_default_main_job_recovers_the_sample_sentences_exactly(tmp_path: Path, capsys):
    """`textleak` with no attack options: packaged MiniLM, MLM client, span attack, our sample sentences."""
    out = tmp_path / "default.json"
    assert main(["--limit", "2", "--no-progress", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["attack"] == "span" and result["config"]["task"] == "mlm"
    assert [b["truth"]["sentences"][0] for b in result["batches"]] == sample_sentences()[:2]
    assert all(b["scores"]["without_special"]["exact_match"] == 1.0 for b in result["batches"])
    assert "my password is blue river seven." in capsys.readouterr().out
