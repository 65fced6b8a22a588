"""`clipdeploy run` writes into folders that do not exist yet, as `mkdir -p` would (stage work faked)."""

from __future__ import annotations

import json

from tests.support.pipeline_fakes import calib_dir, write_config

from clipdeploy.cli import main

CONFIG = """
output: out
defaults:
  precisions: [fp16]
  quantize: {calib_images: calib, samples: 32, holdout: 32, min_samples: 32}
models:
  - {name: one, model: micro-vit}
"""


def test_run_output_and_json_summary_make_missing_parents(tmp_path, fake, capsys):
    calib_dir(tmp_path)
    write_config(tmp_path, CONFIG)
    out = tmp_path / "deep" / "er" / "out"
    summary = tmp_path / "reports" / "today" / "summary.json"  # `reports` does not exist
    assert main(["run", str(tmp_path / "pipeline.yaml"), "--output", str(out), "--json", str(summary)]) == 0
    assert json.loads(summary.read_text())["ok"] is True
    assert (out / "one" / "artifact").is_dir()
