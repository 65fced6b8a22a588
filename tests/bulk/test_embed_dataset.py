"""`clipdeploy embed-dataset` locally: every readable item exactly once, equal to encode_image, resumable."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

import clipdeploy
from clipdeploy.bulk import command, local
from clipdeploy.bulk.sources import expand_braces
from clipdeploy.cli import main
from tests.bulk.conftest import CORRUPT

pq = pytest.importorskip("pyarrow.parquet", reason="embed-dataset writes parquet (pip install 'clipdeploy[bulk]')")


def run(tiny_art, dataset, out, *extra):
    return main(["-q", "embed-dataset", str(tiny_art), str(dataset.folder), str(dataset.tar), "-o", str(out),
                 "--shard-size", "4", "--batch-size", "3", *extra])  # fmt: skip


def rows(out) -> dict[tuple[str, str], np.ndarray]:
    table = pq.read_table(out).to_pylist()
    got = {(r["source"], r["key"]): (np.asarray(r["embedding"], np.float32), r["caption"]) for r in table}
    assert len(got) == len(table), "a key appears twice"
    return got


def kind(source: str) -> str:
    return "tar" if source.endswith(".tar") else "folder"


def check_rows(got, dataset, session) -> None:
    assert {(kind(s), k) for s, k in got} == set(dataset.readable)
    keys = [(kind(s), k) for s, k in got]
    want = session.encode_image([dataset.readable[k] for k in keys])
    emb = np.stack([got[sk][0] for sk in got])
    cos = (emb * want).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.99999
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    for (s, k), (_, caption) in got.items():
        assert caption == (dataset.captions.get(k) if kind(s) == "tar" else None)


def test_every_readable_item_once_and_corrupt_ones_listed(tiny_art, dataset, tmp_path):
    out = tmp_path / "out"
    assert run(tiny_art, dataset, out) == 1  # three items failed, --max-errors 0
    check_rows(rows(out), dataset, clipdeploy.load(tiny_art))
    errors = [json.loads(line) for line in (out / "_errors.jsonl").read_text().splitlines()]
    assert {(kind(e["source"]), e["key"]) for e in errors} == CORRUPT
    assert all(e["reason"] for e in errors)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert (manifest["rows"], manifest["errors"], manifest["items"]) == (len(dataset.readable), 3, len(dataset.readable) + 3)
    # The counts add up: every item is a row or an error, and this first run did them all.
    assert manifest["items_this_run"] == manifest["items"] and manifest["shards_this_run"] == manifest["shards"]
    assert "embedded_this_run" not in manifest
    # exit code: 1 when more than --max-errors items could not be read, 0 at or under it (resumed runs alike)
    assert run(tiny_art, dataset, tmp_path / "out2", "--max-errors", "2") == 1
    assert run(tiny_art, dataset, tmp_path / "out2", "--max-errors", "3") == 0


def test_rerun_does_no_model_work_and_a_killed_run_resumes(tiny_art, dataset, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = local.run_local
    calls = []

    def dies_after_two(job, shards, workers):
        for n, done in enumerate(real(job, shards, workers)):
            calls.append(done["index"])
            yield done
            if n == 1:
                raise RuntimeError("killed")

    monkeypatch.setattr(command, "run_local", dies_after_two)
    with pytest.raises(RuntimeError):
        run(tiny_art, dataset, out)
    assert len(list(out.glob("part-*.parquet"))) == 2
    monkeypatch.setattr(command, "run_local", real)
    assert run(tiny_art, dataset, out) == 1
    resumed = json.loads((out / "_manifest.json").read_text())
    assert resumed["shards_this_run"] == resumed["shards"] - 2  # the two shards the killed run finished are kept
    assert 0 < resumed["items_this_run"] < resumed["items"] == resumed["rows"] + resumed["errors"]
    first = rows(out)
    check_rows(first, dataset, clipdeploy.load(tiny_art))

    def no_model_work(*a):
        raise AssertionError("a finished run must not embed again")

    monkeypatch.setattr(command, "run_local", no_model_work)
    monkeypatch.setattr(command, "open_session", lambda job: clipdeploy.load(job.artifact))
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert run(tiny_art, dataset, out) == 1
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")} == before
    again = json.loads((out / "_manifest.json").read_text())
    assert (again["items_this_run"], again["shards_this_run"]) == (0, 0)
    assert rows(out).keys() == first.keys()


def test_two_worker_processes_give_the_same_rows(tiny_art, dataset, tmp_path):
    run(tiny_art, dataset, tmp_path / "one")
    run(tiny_art, dataset, tmp_path / "two", "--workers", "2")
    a, b = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k][0], b[k][0]) for k in a)


def test_bad_input_is_one_line_exit_2(tiny_art, other_art, dataset, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ([str(tmp_path / "missing")], "does not exist"),
        ([str(empty)], "holds no images"),
        ([str(tmp_path / "shard-{000..002}.tar")], "does not exist"),
    ]
    for sources, message in cases:
        capsys.readouterr()
        assert main(["-q", "embed-dataset", str(tiny_art), *sources, "-o", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
    out = tmp_path / "o2"
    assert main(["-q", "embed-dataset", str(tiny_art), str(dataset.tar), "-o", str(out)]) == 1
    capsys.readouterr()
    assert main(["-q", "embed-dataset", str(other_art), str(dataset.tar), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "another artifact" in err and "\n" not in err


def test_brace_expansion_and_public_embed_batch(tiny_art, dataset):
    assert expand_braces("s-{008..011}.tar") == ["s-008.tar", "s-009.tar", "s-010.tar", "s-011.tar"]
    assert expand_braces("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]
    session = clipdeploy.load(tiny_art)
    good = dataset.readable[("folder", "a.png")]
    result = clipdeploy.embed_batch(session, [good, b"broken", good])
    assert result.ok == [0, 2] and list(result.errors) == [1]
    assert np.allclose(result.embeddings, session.encode_image([good, good]), atol=1e-6)


def test_texts(tiny_art, tmp_path):
    lines = tmp_path / "captions.txt"
    lines.write_text("a dog\n\na cat\n")
    out = tmp_path / "t"
    assert main(["-q", "embed-dataset", str(tiny_art), str(lines), "--texts", "-o", str(out)]) == 0
    got = pq.read_table(out).to_pylist()
    want = clipdeploy.load(tiny_art).encode_text(["a dog", "a cat"])
    assert [r["key"] for r in got] == ["0", "2"]
    assert np.allclose(np.asarray([r["embedding"] for r in got]), want, atol=1e-6)


def test_progress_lines_count_items_with_rate_and_eta(tiny_art, dataset, tmp_path, monkeypatch, capsys):
    from clipdeploy import progress

    monkeypatch.setattr(progress, "active", lambda: True)  # as on a terminal
    monkeypatch.setattr(progress, "_tqdm", lambda: None)  # without tqdm: plain lines
    monkeypatch.setattr(progress, "LINE_SECONDS", 0.0)  # a line at every update
    capsys.readouterr()
    argv = ["embed-dataset", str(tiny_art), str(dataset.folder), str(dataset.tar), "-o", str(tmp_path / "o"),
            "--shard-size", "4", "--batch-size", "3"]  # fmt: skip
    assert main(argv) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("embedding: ")]
    total = len(dataset.readable) + 3  # 15 items: shards of 4, 4, 4, 3
    assert [line.split(" items")[0] for line in lines] == [f"embedding: {n}/{total}" for n in (4, 8, 12, 15)]
    assert all("items/s" in line for line in lines)
    assert all(", ETA " in line for line in lines[:-1]) and lines[-1].endswith("s") and " in " in lines[-1]


def test_fast_decode_end_to_end(tiny_art, dataset, tmp_path):
    """--fast-decode: every row exists; large JPEGs (2x the input size or more, so Pillow's draft mode
    decodes them at a reduced scale) stay at cosine >= 0.99 to exact encode_image; below 2x draft mode
    is a no-op, so those rows are identical to an exact run's."""
    from pathlib import Path

    from PIL import Image

    folder = tmp_path / "jpegs"
    folder.mkdir()
    bundled = sorted((Path(clipdeploy.__file__).parent / "data" / "images").glob("*.jpg"))
    assert bundled, "the bundled photographs are missing"
    large = {f"large/{p.name}": p.read_bytes() for p in bundled}
    small = {"small/gray.jpg": dataset.readable[("folder", "gray.jpg")],  # 64x20
             "small/cmyk.jpg": dataset.readable[("folder", "nested/deeper/cmyk.jpg")]}  # fmt: skip
    buf = io.BytesIO()
    Image.open(bundled[0]).convert("RGB").resize((63, 90)).save(buf, format="JPEG")
    small["small/just-under-2x.jpg"] = buf.getvalue()  # 63 < 2 x 32: no draft
    for key, data in {**large, **small}.items():
        (folder / key).parent.mkdir(exist_ok=True)
        (folder / key).write_bytes(data)
    session = clipdeploy.load(tiny_art)
    from tests.support.tiny_artifact import IMAGE_SIZE

    assert min(min(Image.open(p).size) for p in bundled) >= 2 * IMAGE_SIZE  # draft mode does reduce these

    for name, flags in (("exact", []), ("fast", ["--fast-decode"])):
        assert main(["-q", "embed-dataset", str(tiny_art), str(folder), "-o", str(tmp_path / name), *flags]) == 0
    exact, fast = rows(tmp_path / "exact"), rows(tmp_path / "fast")
    assert fast.keys() == exact.keys() and {k for _, k in fast} == {*large, *small}
    keys = sorted(large)
    emb = np.stack([fast[(str(folder), k)][0] for k in keys])
    want = session.encode_image([large[k] for k in keys])
    cos = (emb * want).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.99, cos
    assert not all(np.array_equal(fast[(str(folder), k)][0], exact[(str(folder), k)][0]) for k in keys)  # it acted
    for k in small:
        assert np.array_equal(fast[(str(folder), k)][0], exact[(str(folder), k)][0]), k
