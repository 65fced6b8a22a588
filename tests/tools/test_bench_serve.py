"""tools/bench_serve.py: a short real run on the micro ViT (structure, zero errors, items/s > 0; never timings),
and the pieces that decide the report (metrics parsing, medians and ratios, goal verdicts on both CPU kinds)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clipdeploy import cpu_features
from tools import bench_serve  # the repository root is on sys.path (pyproject: pythonpath)


def test_short_run_serve_and_ceiling(micro_artifact, tmp_path, capsys):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    out = tmp_path / "report"
    argv = [str(micro_artifact.path), "--clients", "4", "--seconds", "1.5", "--warmup", "0.3", "--rounds", "1",
            "--contenders", "serve,ceiling", "--out", str(out), "--start-timeout", "60"]  # fmt: skip
    assert bench_serve.main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "bench-serve.json").read_text())
    assert set(report["summary"]) == {"image", "text"}
    for modality in ("image", "text"):
        s = report["summary"][modality]
        assert set(s) == {"serve", "ceiling"}
        for name, row in s.items():
            assert row["errors"] == 0, (modality, name, report["results"][modality][name])
            assert row["items_per_s"] > 0 and row["p50_ms"] > 0 and row["p99_ms"] >= row["p50_ms"], row
        # The ceiling ran at the batch the server actually reached (its /metrics histogram), rounded.
        assert s["serve"]["mean_batch"] >= 1
        assert s["ceiling"]["batch"] == max(1, round(s["serve"]["mean_batch"]))
        assert s["serve"]["x_ceiling"] == pytest.approx(s["serve"]["items_per_s"] / s["ceiling"]["items_per_s"])
        assert s["serve"]["x_peer"] is None  # no peer in this run
    env = report["environment"]
    assert env["cpu"] and env["vnni"] == cpu_features.has_vnni()
    assert set(env["cpu_flags"]) <= set(bench_serve.REPORTED_FLAGS)
    goals = {(g["modality"], g["goal"]) for g in report["goals"]}
    assert ("image", "zero errors (every contender)") in goals and ("text", "serve >= 0.8x the in-process ceiling") in goals
    assert all(g["setup_differs"] for g in report["goals"])  # 4 clients and a micro model: not the goal setup
    md = (out / "bench-serve.md").read_text()
    assert md == printed
    assert "| contender | items/s | p50 ms | p99 ms | p99/p50 | errors | x ceiling | x peer |" in md
    assert env["cpu"] in md and report["command"] in md and "take CPU from the servers" in md
    assert all(r["load_average"] is not None for r in report["results"]["image"]["serve"])
    assert (out / "serve.log").is_file()


def test_wrong_answers_are_errors():
    ref = np.ones(8) / np.sqrt(8)
    assert bench_serve.check_row(ref.tolist(), ref) is None
    noisy = ref.copy()
    noisy[0] += 0.05
    assert "cosine" in bench_serve.check_row(noisy.tolist(), ref)
    assert "shape" in bench_serve.check_row([1.0, 2.0], ref)


def test_batch_totals_reads_the_histogram_of_its_model():
    text = "\n".join([
        '# HELP clipdeploy_batch_size items per inference call, by model and tower',
        'clipdeploy_batch_size_bucket{le="1.0",model="clip",tower="image"} 3.0',
        'clipdeploy_batch_size_count{model="clip",tower="image"} 10.0',
        'clipdeploy_batch_size_sum{model="clip",tower="image"} 75.0',
        'clipdeploy_batch_size_count{model="clip",tower="text"} 4.0',
        'clipdeploy_batch_size_sum{model="clip",tower="text"} 8.0',
        'clipdeploy_batch_size_sum{model="other",tower="image"} 999.0',
    ])  # fmt: skip
    assert bench_serve.batch_totals(text) == {"image": (75.0, 10.0), "text": (8.0, 4.0)}


def _rows(items_per_s, p50=10.0, p99=20.0, errors=0):
    return [{"items_per_s": v, "p50_ms": p50, "p99_ms": p99, "errors": errors} for v in items_per_s]


def test_summary_takes_medians_and_per_round_ratios():
    s = bench_serve.summarize({"serve": _rows([90, 100, 300]), "torch-peer": _rows([20, 25, 30]),
                               "ceiling": [{**r, "batch": b} for r, b in zip(_rows([110, 125, 120]), [8, 8, 9])]})
    assert s["serve"]["items_per_s"] == 100 and s["serve"]["p99_over_p50"] == pytest.approx(2.0)
    # Ratios pair the windows of one round (90/110, 100/125, 300/120), not the medians (100/120).
    assert s["serve"]["x_ceiling"] == pytest.approx(90 / 110)
    assert s["serve"]["x_peer"] == pytest.approx(4.5)  # 4.5, 4.0, 10.0
    assert s["ceiling"]["x_ceiling"] == pytest.approx(1.0)
    assert s["ceiling"]["batch"] == 9 and s["ceiling"]["batches"] == [8, 8, 9]


@pytest.fixture
def cpu_with(tmp_path, monkeypatch):
    """Make cpu_features read a cpuinfo with the given flags."""

    def set_flags(*flags):
        path = tmp_path / "cpuinfo"
        path.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 " + " ".join(flags) + "\n")
        monkeypatch.setattr(cpu_features, "CPUINFO", path)
        cpu_features.flags.cache_clear()

    yield set_flags
    cpu_features.flags.cache_clear()


@pytest.mark.parametrize("flags, needed", [((), 2.0), (("avx512_vnni",), 4.0), (("avx_vnni",), 4.0), (("amx_int8",), 4.0)])
def test_peer_goal_depends_on_vnni(cpu_with, flags, needed):
    cpu_with(*flags)
    summary = {"image": bench_serve.summarize({"serve": _rows([300]), "torch-peer": _rows([100])})}
    (peer_goal,) = [g for g in bench_serve.goal_verdicts(summary, cpu_features.has_vnni(), []) if "peer" in g["goal"]]
    assert f">= {needed:g}x" in peer_goal["goal"] and peer_goal["value"] == pytest.approx(3.0)
    assert peer_goal["passed"] is (3.0 >= needed)


def test_goal_verdicts_fail_on_tail_and_errors():
    summary = {"text": bench_serve.summarize({"serve": _rows([100], p50=10, p99=31), "ceiling": _rows([200], errors=1)})}
    goals = {g["goal"]: g for g in bench_serve.goal_verdicts(summary, True, [])}
    assert goals["serve p99 <= 3x p50"]["passed"] is False
    assert goals["zero errors (every contender)"] == {**goals["zero errors (every contender)"], "value": 1, "passed": False}
    assert goals["serve >= 0.8x the in-process ceiling"]["passed"] is False  # 0.5x


def test_peer_gets_the_artifacts_weights(tmp_path):
    seeded = {"model": {"name": "ViT-B-32", "pretrained": None, "checkpoint_sha256": None, "random_init_seed": 42}}
    assert bench_serve.peer_weights(seeded, None, tmp_path) == ["--model", "ViT-B-32", "--seed", "42"]
    tagged = {"model": {"name": "ViT-B-32", "pretrained": "openai", "checkpoint_sha256": None}}
    assert bench_serve.peer_weights(tagged, None, tmp_path)[-2:] == ["--pretrained", "openai"]
    ckpt = {"model": {"name": "ViT-B-32", "pretrained": None, "checkpoint": "w.pt", "checkpoint_sha256": "ab" * 32}}
    with pytest.raises(bench_serve.ClipDeployError, match="--checkpoint"):
        bench_serve.peer_weights(ckpt, None, tmp_path)
    reduced = {"model": {**seeded["model"], "reduced_depth": 2}}
    with pytest.raises(bench_serve.UsageError, match="reduced depth"):
        bench_serve.peer_weights(reduced, None, tmp_path)


def test_bad_arguments_are_one_line(tmp_path, capsys):
    assert bench_serve.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no manifest.json" in err[0]
    (tmp_path / "manifest.json").write_text("{}")
    assert bench_serve.main([str(tmp_path), "--contenders", "serve,vllm"]) == 2
    assert "unknown vllm" in capsys.readouterr().err


def test_peer_answers_the_artifacts_embeddings(micro_artifact):
    """tools/serve_peer.py's app (in-process) gives open_clip's embeddings: the fp32 variant's, to 0.9999."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    import clipdeploy
    from tools import serve_peer

    session = clipdeploy.load(micro_artifact.path, precision="fp32")
    client = TestClient(serve_peer.build_app(micro_artifact.model, micro_artifact.preprocess, micro_artifact.tokenizer))
    jpegs, texts = bench_serve.make_jpegs(2, 224), bench_serve.make_texts(2)
    refs = {"image": session.encode_image(jpegs), "text": session.encode_text(texts)}
    for modality, items in (("image", jpegs), ("text", texts)):
        for body, ref in zip(bench_serve.request_bodies(modality, items), refs[modality], strict=True):
            r = client.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 200, r.text
            assert bench_serve.check_row(r.json()["data"][0]["embedding"], ref.astype(float)) is None
    bad = client.post("/v1/embeddings", json={"input": {"image": "bm90IGFuIGltYWdl"}})
    assert bad.status_code == 400


def test_a_server_that_dies_is_one_line_naming_its_log(tmp_path):
    pytest.importorskip("httpx")
    import sys

    log = tmp_path / "dead.log"
    server = bench_serve.Server("dead", [sys.executable, "-c", "import sys; print('boom: no model'); sys.exit(3)"],
                                bench_serve.free_port(), log, None)  # fmt: skip
    server.start()
    with pytest.raises(bench_serve.BenchError, match="dead exited with code 3") as e:
        server.wait_ready(30)
    assert "boom: no model" in str(e.value) and str(log) in str(e.value) and "\n" not in str(e.value)
