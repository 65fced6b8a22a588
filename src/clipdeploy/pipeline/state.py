"""The stage state of one model: ``<output>/<model>/pipeline-state.json``.

For each finished stage unit (``export``, ``quantize:int8``, ...) it records the key of the inputs
it ran with, the inputs themselves, the files it produced with their sha256, and its figures. A unit
is current when its key is unchanged and its outputs are still there, unchanged.

The file is rewritten atomically. Before a unit runs, its record is removed (and that is written), so
a unit that dies leaves no record: nothing that looks finished.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from clipdeploy.artifact.manifest import atomic_write_text

STATE_NAME = "pipeline-state.json"
STATE_SCHEMA = "clipdeploy-pipeline-state/1"


class StageState:
    """The records of one model's stage units, read from and written to its state file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.records: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                data = {}  # an unreadable state only costs a re-run
            if isinstance(data, dict) and data.get("schema") == STATE_SCHEMA and isinstance(data.get("units"), dict):
                self.records = data["units"]

    def get(self, unit: str) -> dict[str, Any] | None:
        return self.records.get(unit)

    def _save(self) -> None:
        body = {"schema": STATE_SCHEMA, "units": self.records}
        atomic_write_text(self.path, json.dumps(body, indent=2, sort_keys=True) + "\n")

    def forget(self, unit: str) -> None:
        """Drop a unit's record before it runs: until it finishes, it is not current."""
        if unit in self.records:
            del self.records[unit]
            self._save()

    def record(
        self,
        unit: str,
        key: str,
        inputs: dict[str, Any],
        outputs: dict[str, str],
        figures: dict[str, Any],
        seconds: float,
    ) -> None:
        self.records[unit] = {
            "key": key,
            "inputs": inputs,
            "outputs": outputs,
            "figures": figures,
            "seconds": round(seconds, 2),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        self._save()
