"""The resumable result store: one JSON object a line, appended and flushed as each batch finishes.

A crash loses at most the batch that was running: a half-written last line is cut off before the next append, and
a rerun skips every key already recorded. Besides batch records the file holds one ``run`` record per invocation
(the full configuration), so the file alone says what produced it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

BATCH = "batch"
RUN = "run"


class ResultStore:
    """Append-only JSONL file of records; the last record of a key wins."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"ResultStore({str(self.path)!r})"

    def records(self) -> list[dict[str, Any]]:
        """Every whole record in file order; damaged lines (a crash mid-write) are left out."""
        return self.read()[0]

    def read(self) -> tuple[list[dict[str, Any]], int]:
        """(records, number of damaged lines skipped)."""
        if not self.path.exists():
            return [], 0
        records, damaged = [], 0
        with self.path.open(encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    damaged += 1
                    continue
                if isinstance(record, dict):
                    records.append(record)
                else:
                    damaged += 1
        return records, damaged

    def batches(self) -> dict[str, dict[str, Any]]:
        """The latest batch record of each key."""
        return {record["key"]: record for record in self.records() if record.get("type") == BATCH and "key" in record}

    def repair(self) -> bool:
        """Cut a half-written last line (no final newline) so the next append starts a line; True if it cut."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return False
        with self.path.open("rb+") as handle:
            data = handle.read()
            if data.endswith(b"\n"):
                return False
            handle.truncate(data.rfind(b"\n") + 1)
        return True

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as a line and push it to disk before returning."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, ensure_ascii=False, default=str) + "\n"
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
