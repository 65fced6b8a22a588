"""Reports from a synthetic benchmark: JSON schema, Markdown, PNG and the terminal table."""

from __future__ import annotations

import json

import pytest

from clipdeploy.benchmarks import report as report_mod
from clipdeploy.benchmarks.report import (
    markdown,
    markdown_table,
    plot_latency,
    terminal_table,
    write_reports,
)

from tests.support.bench_fakes import make_report

# The record fields the issue asks for, and the ones the schema adds.
REQUIRED = (
    "tower",
    "backend",
    "precision",
    "batch",
    "seq_len",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "mean_ms",
    "items_per_s",
    "cos_min",
    "speedup_vs_torch_fp32",
)
DOCUMENTED = REQUIRED + (
    "device",
    "role",
    "iters",
    "std_ms",
    "min_ms",
    "max_ms",
    "cos_mean",
    "peak_rss_mb",
    "gpu_mem_mb",
    "input_sha256",
)


@pytest.fixture
def fake_report():
    return make_report()


def test_schema_is_documented():
    doc = report_mod.__doc__
    for key in DOCUMENTED + ("records", "environment", "skipped", "notes", "schema", "machine"):
        assert key in doc, f"{key} is not documented in the report schema"


def test_markdown_table_has_every_record(fake_report):
    table = markdown_table(fake_report)
    lines = table.splitlines()
    assert lines[0].startswith("| tower | contender | tokens | batch | p50 ms")
    assert len(lines) == 2 + len(fake_report["records"])
    # image before text, full length before short, torch before onnxruntime, small batch first
    assert lines[2].startswith("| image | torch fp32 | - | 1 |")
    assert any(line.startswith("| text | onnxruntime fp32 | 12 | 8 |") and "12.50x" in line for line in lines)
    cells = [len(line.split("|")) for line in lines]
    assert len(set(cells)) == 1, "every row has the same number of cells"


def test_markdown_section_names_the_machine_and_caveats(fake_report):
    text = markdown(fake_report, plot="bench.png")
    assert "# ViT-T on Test CPU, 2 cores, 8 GB" in text
    assert "![latency against batch size](bench.png)" in text
    assert "- tensorrt fp16: needs an NVIDIA GPU" in text
    assert "- a note" in text


def test_terminal_table_aligns(fake_report):
    text = terminal_table(fake_report)
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("tower"))
    rows = lines[header : header + 2 + len(fake_report["records"])]
    assert len({len(r.rstrip()) for r in rows[:2]}) == 1
    assert "5.00x" in text and "not measured:" in text


def test_png_is_written(fake_report, tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_latency(fake_report, tmp_path / "plot.png")
    assert path == tmp_path / "plot.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5000


def test_write_reports_round_trips(fake_report, tmp_path):
    files = write_reports(fake_report, tmp_path / "out")
    data = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert data["records"] == fake_report["records"]
    assert data["files"] == files
    assert (tmp_path / "out" / "bench.md").read_text().startswith("# ViT-T")
    for rec in data["records"]:
        assert set(REQUIRED) <= set(rec)


def test_the_old_targets_table_is_gone():
    """Issue #6's targets (ONNX Runtime fp32 >= 2x, int8 >= 4x ...) were replaced by issue #14's goal."""
    report = make_report("ViT-B-32")
    for text in (markdown(report), terminal_table(report)):
        assert "Targets" not in text and "issue #6" not in text
    assert not hasattr(report_mod, "targets_section") and not hasattr(report_mod, "TARGETS")
