"""embed-dataset's other SOURCEs: parquet/CSV path and text columns, tars cut short, braces and globs."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

import clipdeploy
from clipdeploy.bulk.sources import resolve_sources
from clipdeploy.cli import main

pa = pytest.importorskip("pyarrow", reason="embed-dataset writes parquet (pip install 'clipdeploy[bulk]')")
pq = pytest.importorskip("pyarrow.parquet", reason="embed-dataset writes parquet")


def embed(art, *argv: str) -> int:
    return main(["-q", "embed-dataset", str(art), *argv])


def table_rows(out: Path) -> dict[tuple[str, str], np.ndarray]:
    table = pq.read_table(out).to_pylist()
    got = {(Path(r["source"]).name, r["key"]): np.asarray(r["embedding"], np.float32) for r in table}
    assert len(got) == len(table), "an item appears twice"
    return got


def errors(out: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in (out / "_errors.jsonl").read_text().splitlines()]


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


@pytest.fixture()
def listed(tmp_path, dataset):
    """A folder with a table beside its images: relative paths (to the table's folder), an absolute path,
    a missing file and an empty cell; the cwd is elsewhere, so cwd-relative reading would fail."""
    root = tmp_path / "tables"
    (root / "img").mkdir(parents=True)
    a = dataset.readable[("folder", "a.png")]
    gray = dataset.readable[("folder", "gray.jpg")]
    (root / "img" / "a.png").write_bytes(a)
    (root / "img" / "gray.jpg").write_bytes(gray)
    absolute = tmp_path / "elsewhere.png"
    absolute.write_bytes(dataset.readable[("folder", "nested/rgba.png")])
    paths = ["img/a.png", str(absolute), "img/missing.png", "", "img/gray.jpg"]
    want = {"img/a.png": root / "img" / "a.png", str(absolute): absolute, "img/gray.jpg": root / "img" / "gray.jpg"}
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    return root, paths, want, cwd


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_a_table_path_column_reads_paths_relative_to_the_table(tiny_art, listed, tmp_path, monkeypatch, fmt):
    root, paths, want, cwd = listed
    table = root / f"list.{fmt}"
    if fmt == "parquet":  # a non-default column name, and a null where the CSV has an empty cell
        pq.write_table(pa.table({"file": [p or None for p in paths], "n": list(range(len(paths)))}), table)
        column = ["--column", "file"]
    else:
        with open(table, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["n", "path"])
            w.writerows([[i, p] for i, p in enumerate(paths)])
        column = []
    monkeypatch.chdir(cwd)
    out = tmp_path / "out"
    assert embed(tiny_art, str(table), "-o", str(out), *column) == 1  # the missing file fails, --max-errors 0
    got = table_rows(out)
    assert set(got) == {(table.name, k) for k in want}  # keys are the paths as the table writes them
    keys = sorted(want)
    emb = np.stack([got[(table.name, k)] for k in keys])
    assert min_cosine(emb, clipdeploy.load(tiny_art).encode_image([str(want[k]) for k in keys])) >= 0.99999
    [err] = errors(out)
    assert err["key"] == "img/missing.png" and "does not exist" in err["reason"]


def test_a_table_without_the_column_is_one_line_exit_2(tiny_art, listed, tmp_path, capsys):
    root, paths, _, _ = listed
    table = root / "list.parquet"
    pq.write_table(pa.table({"file": paths}), table)
    assert embed(tiny_art, str(table), "-o", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert "has no column 'path'" in err and "--column" in err and "\n" not in err
    (root / "broken.parquet").write_bytes(b"PAR1 not really")
    assert embed(tiny_art, str(root / "broken.parquet"), "-o", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert "not a readable parquet file" in err and "\n" not in err


@pytest.mark.parametrize("fmt", ["txt", "parquet", "csv"])
def test_texts_from_a_file_or_a_table_column(tiny_art, tmp_path, fmt):
    texts = ["a dog", "", "a cat on a mat", "  ", "ünïcödé"]
    src = tmp_path / f"captions.{fmt}"
    if fmt == "txt":
        src.write_text("\n".join(texts) + "\n", encoding="utf-8")
        column = []
    elif fmt == "parquet":
        pq.write_table(pa.table({"caption": [t or None for t in texts]}), src)
        column = ["--column", "caption"]
    else:
        with open(src, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["id", "text"])
            w.writerows([[i, t] for i, t in enumerate(texts)])
        column = []
    out = tmp_path / "t"
    assert embed(tiny_art, str(src), "--texts", "-o", str(out), *column) == 0
    got = {r["key"]: np.asarray(r["embedding"], np.float32) for r in pq.read_table(out).to_pylist()}
    # keys are 0-based lines / rows; a blank one is no item (a whitespace-only table cell is a text)
    kept = {str(i): t for i, t in enumerate(texts) if (t.strip() if fmt == "txt" else t)}
    assert sorted(got) == sorted(kept)
    want = clipdeploy.load(tiny_art).encode_text([kept[k] for k in sorted(kept)])
    assert min_cosine(np.stack([got[k] for k in sorted(kept)]), want) >= 0.99999


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_a_tar_cut_short_keeps_the_members_before_the_cut(tiny_art, dataset, tmp_path):
    a = dataset.readable[("folder", "a.png")]
    big = dataset.readable[("folder", "nested/deeper/wide.bmp")]  # ~6 KB: the cut lands inside its data
    path = _tar(tmp_path / "cut.tar", {"k0.png": a, "k0.txt": b"first", "k1.png": a, "k2.bmp": big})
    with tarfile.open(path) as tar:
        cut = tar.getmember("k2.bmp").offset_data + len(big) // 2
    path.write_bytes(path.read_bytes()[:cut])
    out = tmp_path / "out"
    assert embed(tiny_art, str(path), "-o", str(out), "--max-errors", "1") == 0
    rows = {r["key"]: r for r in pq.read_table(out).to_pylist()}
    assert sorted(rows) == ["k0", "k1"] and rows["k0"]["caption"] == "first"
    want = clipdeploy.load(tiny_art).encode_image([a])[0]
    assert min_cosine(np.asarray([rows["k1"]["embedding"]], np.float32), want[None]) >= 0.99999
    [err] = errors(out)
    assert err["key"] == "k2" and "ReadError" in err["reason"] and "unexpected end of data" in err["reason"]


def test_braces_and_globs_name_tar_shards(tiny_art, dataset, tmp_path, capsys):
    a, gray = dataset.readable[("folder", "a.png")], dataset.readable[("folder", "gray.jpg")]
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(4):
        _tar(shards / f"shard-{i:03d}.tar", {f"x{i}.png": a, f"y{i}.jpg": gray})
    expanded = resolve_sources([str(shards / "shard-{000..002}.tar")])
    assert [Path(p).name for p in expanded] == ["shard-000.tar", "shard-001.tar", "shard-002.tar"]
    globbed = resolve_sources([str(shards / "*.tar"), str(shards / "shard-{001,003}.tar")])  # each path once
    assert [Path(p).name for p in globbed] == [f"shard-{i:03d}.tar" for i in range(4)]
    assert [Path(p).name for p in resolve_sources([str(shards / "shard-00[13].tar")])] == ["shard-001.tar", "shard-003.tar"]

    out = tmp_path / "out"
    assert embed(tiny_art, str(shards / "shard-{000..002}.tar"), "-o", str(out)) == 0
    got = table_rows(out)
    assert set(got) == {(f"shard-{i:03d}.tar", k) for i in range(3) for k in (f"x{i}", f"y{i}")}
    capsys.readouterr()
    assert embed(tiny_art, str(shards / "shard-{003..004}.tar"), "-o", str(tmp_path / "o2")) == 2
    err = capsys.readouterr().err.strip()
    assert "shard-004.tar" in err and "does not exist" in err and "\n" not in err
