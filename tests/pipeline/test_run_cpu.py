"""`clipdeploy run` for real, on CPU: a micro ViT exported, quantized and benchmarked; a broken model beside it.

Build and validate are skipped here with the reason (no TensorRT, no GPU). One export is the slow part
(~20 s on 2 cores); everything after it takes seconds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from tests.support.pipeline_fakes import IMAGES, calib_dir, write_config

pytest.importorskip("open_clip")
pytest.importorskip("onnxruntime")

import clipdeploy  # noqa: E402
from clipdeploy.cli import main  # noqa: E402

MICRO = Path(__file__).resolve().parents[1] / "data" / "micro-vit.json"


def _units(summary: dict, model: str) -> dict[str, dict]:
    m = next(m for m in summary["models"] if m["name"] == model)
    return {u["unit"]: u for u in m["units"]}


def _add_crops(folder: Path, count: int = 60) -> None:
    """Crops of the bundled photos beside them: the gate needs at least 32 held-out images."""
    from PIL import Image

    (folder / "crops").mkdir()
    photos = sorted(IMAGES.glob("*.jpg"))
    for i in range(count):
        img = Image.open(photos[i % len(photos)]).convert("RGB")
        side = min(img.size) // 2
        x, y = (i * 37) % (img.size[0] - side), (i * 53) % (img.size[1] - side)
        img.crop((x, y, x + side, y + side)).resize((96, 96)).save(folder / "crops" / f"{i:03d}.jpg")


def test_real_pipeline_on_cpu_is_incremental_and_isolates_a_broken_model(tmp_path, capsys):
    _add_crops(calib_dir(tmp_path))
    (tmp_path / "broken.pt").write_bytes(b"this is not a checkpoint")
    config = write_config(
        tmp_path,
        f"""
        version: 1
        output: out
        defaults:
          precisions: [fp16]
          quantize: {{calib_images: [calib], samples: 32, holdout: 32, min_samples: 32, threads: 2}}
          bench:
            backends: [onnxruntime]
            batches: [2]
            timing: {{iters: 2, warmup: 0}}
            isolate: false
            progress: false
        models:
          - name: micro
            model: micro-vit
            model_config: {MICRO}
          - name: broken
            model: micro-vit
            model_config: {MICRO}
            checkpoint: broken.pt
    """,
    )
    out = tmp_path / "out"

    assert main(["run", str(config)]) == 1
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    micro, broken = _units(summary, "micro"), _units(summary, "broken")
    assert [micro[u]["status"] for u in ("export", "quantize:fp16", "bench")] == ["ran"] * 3
    for unit in ("build:fp16", "validate:fp16"):
        assert micro[unit]["status"] == "skipped" and "TensorRT" in micro[unit]["reason"], micro[unit]
    assert micro["quantize:fp16"]["figures"]["image"]["min_cosine"] > 0.999
    assert broken["export"]["status"] == "failed" and "checkpoint" in broken["export"]["reason"]
    assert broken["quantize:fp16"]["status"] == broken["bench"]["status"] == "blocked"
    assert "FAILED:" in printed and "micro" in printed
    session = clipdeploy.load(out / "micro" / "artifact", precision="fp16")
    assert session.encode_image([IMAGES / "chelsea.jpg"]).shape == (1, 64)
    assert (out / "micro" / "bench" / "bench.json").is_file()

    # Second run of the good model: every stage current, in seconds.
    start = time.perf_counter()
    assert main(["run", str(config), "--model", "micro"]) == 0
    seconds = time.perf_counter() - start
    again = _units(json.loads((out / "summary.json").read_text()), "micro")
    assert {u: r["status"] for u, r in again.items() if r["status"] != "skipped"} == {
        "export": "current",
        "quantize:fp16": "current",
        "bench": "current",
    }
    assert seconds < 10, f"a current run took {seconds:.1f}s"
    assert "current" in capsys.readouterr().err

    # New calibration data: quantize runs again, export does not.
    (tmp_path / "calib" / "chelsea.jpg").write_bytes((IMAGES / "hubble_deep_field.jpg").read_bytes())
    assert main(["run", str(config), "--model", "micro"]) == 0
    third = _units(json.loads((out / "summary.json").read_text()), "micro")
    assert third["export"]["status"] == "current"
    assert third["quantize:fp16"]["status"] == "ran" and third["quantize:fp16"]["changed"] == ["calib_images"]
