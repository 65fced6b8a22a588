"""`clipdeploy run` on a terminal: each running unit is shown with its clock (stage work faked)."""

from __future__ import annotations

import io
import re
import sys

import pytest
from tests.support.pipeline_fakes import calib_dir, write_config

from clipdeploy import progress
from clipdeploy.cli import main

CONFIG = """
version: 1
output: out
defaults:
  precisions: [fp16]
  quantize: {calib_images: [calib], samples: 32, holdout: 32, min_samples: 32}
models:
  - name: alpha
    model: micro-vit
"""


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def terminal(monkeypatch):
    """Call it in the test body: pytest's capture resets sys.stderr after fixtures are set up."""
    before = progress._wanted

    def attach() -> _Terminal:
        term = _Terminal()
        monkeypatch.setattr(sys, "stderr", term)
        return term

    yield attach
    progress.configure(before)


def test_run_shows_each_running_unit_on_a_terminal(fake, tmp_path, terminal):
    pytest.importorskip("tqdm")
    calib_dir(tmp_path)
    config = write_config(tmp_path, CONFIG)
    term = terminal()
    main(["run", str(config)])
    text = term.getvalue()
    for unit in ("export", "quantize:fp16"):
        assert re.search(rf"\[alpha\] {re.escape(unit)}  \d\d:\d\d", text), f"no live {unit} line:\n{text}"
        assert f"[alpha] {unit}: ran in" in text, text  # the runner's own line, once, after the bar


def test_run_quiet_draws_no_bars(fake, tmp_path, terminal):
    calib_dir(tmp_path)
    config = write_config(tmp_path, CONFIG)
    term = terminal()
    main(["run", str(config), "--quiet"])
    text = term.getvalue()
    assert "\r" not in text and not re.search(r"\[alpha\] export  \d\d:\d\d", text), text
    assert "[alpha] export: ran in" in text  # what ran is still said
