"""tools/bench_embed_dataset.py runs end to end on the micro artifact (8 photos, one contender) and prints
its markdown table. This proves the tool works, not any throughput figure."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("pyarrow.parquet", reason="embed-dataset writes parquet (pip install 'clipdeploy[bulk]')")


@pytest.fixture(scope="module")
def tiny_art(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support.tiny_artifact import tiny_artifact_or_skip

    return tiny_artifact_or_skip(tmp_path_factory.mktemp("bench-tool-art") / "art")


def test_the_benchmark_tool_prints_a_table_of_images_per_second(tiny_art, tmp_path, capsys):
    from tools.bench_embed_dataset import main

    results = main([str(tiny_art), "--images", "8", "--precision", "fp32", "--shard-size", "4",
                    "--contenders", "local-x1", "--work", str(tmp_path)])  # fmt: skip
    assert list(results) == ["local-x1"] and results["local-x1"][0] > 0
    out = capsys.readouterr().out
    assert "| runner | best images/s | median images/s | rounds |" in out
    assert f"| local-x1 | {results['local-x1'][0]:.2f} |" in out
    assert len(list((tmp_path / "photos").glob("*.jpg"))) == 8
    with pytest.raises(SystemExit):
        main([str(tiny_art), "--contenders", "spark-x9", "--work", str(tmp_path)])
