"""int8 worst case on the project's own micro models, before and after the per-sample gate.

    PYTHONPATH=src:. python tools/measure_worst_case.py OUT_DIR [BASE_SRC]

Models: the trained micro ViT of tests/support/synthetic.py (on its rendered shapes, and on photo crops) and the
micro ResNet / ConvNeXt of tests/support/models.py (random weights, on photo crops). Data: 600 images per
set (shapes rendered with seed 5; crops of the bundled scikit-image photographs, as the tests make
them). AFTER: this tree's defaults (300 calibration, 256 held out, min cosine 0.95 with recovery).
BEFORE (optional): the gate of the source tree BASE_SRC (e.g. `git archive 74fe713 src`), run with
its defaults (300 calibration, 64 held out), with its per-sample cosines captured. Prints one JSON
line per row and writes OUT_DIR/worst_case.json. Not a test: a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
N_IMAGES = 600


def crops(folder: Path, n: int = N_IMAGES) -> Path:
    from tests.support.photos import write_crops

    return write_crops(folder, n, seed=0)


def shapes(folder: Path) -> dict[str, Path]:
    from tests.support import synthetic

    synthetic.write_dataset(folder / "images", N_IMAGES, seed=5)
    rng = np.random.default_rng(6)
    (folder / "captions.txt").write_text("\n".join(synthetic.caption(synthetic.draw(rng)[1], rng) for _ in range(600)))
    (folder / "prompts.txt").write_text("\n".join(synthetic.class_prompts()))
    return {"images": folder / "images", "captions": folder / "captions.txt", "prompts": folder / "prompts.txt"}


def export_models(root: Path) -> dict[str, Path]:
    from tests.support import synthetic
    from tests.support.models import MODELS

    from clipdeploy.export.config import ExportConfig
    from clipdeploy.export.exporter import export_model
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    vit = root / "micro-shapes"
    if not vit.exists():
        export_model(ExportConfig(model=synthetic.MODEL_NAME, output=vit, checkpoint=synthetic.trained_checkpoint(),
                                  model_config=synthetic.config_file(root)))
    out["micro-vit (trained)"] = vit
    for name in ("micro-resnet", "micro-convnext"):
        art = root / name
        if not art.exists():
            model = MODELS[name]
            export_model(ExportConfig(model=name, output=art, model_config=model.config_file(root), seed=model.seed))
        out[f"{name} (random)"] = art
    return out


def figures(cos: np.ndarray) -> dict[str, float]:
    return {"n": int(len(cos)), "min": round(float(cos.min()), 4), "p1": round(float(np.percentile(cos, 1)), 4),
            "mean": round(float(cos.mean()), 4)}


BEFORE = r"""
import json, sys
from pathlib import Path
import numpy as np
from clipdeploy.quantize import gate
from clipdeploy.quantize.config import QuantizeConfig
from clipdeploy.quantize.stage import quantize
from clipdeploy.validation import cosine_rows, compare as _compare
seen = []
def compare(out, ref):
    seen.append(cosine_rows(out, ref))
    return _compare(out, ref)
gate.compare = compare
args = json.loads(sys.argv[1])
kw = {k: (Path(v) if k in ("calib_texts", "gate_prompts") and v else v) for k, v in args["kw"].items()}
cfg = QuantizeConfig(artifact=Path(args["artifact"]), precision="int8", calib_images=[Path(p) for p in args["images"]],
                     threads=2, force=True, **kw)
try:
    report = quantize(cfg)
except Exception as e:
    report = getattr(e, "report", {"error": str(e)})
towers = [t for t in ("image", "text") if t in report]
last = seen[-len(towers):]
print(json.dumps({"passed": report.get("passed"), "failures": report.get("failures"),
                  "cos": {t: c.tolist() for t, c in zip(towers, last)}}))
"""


def before(base_src: Path, artifact: Path, images: Path, kw: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(base_src)}
    arg = json.dumps({"artifact": str(artifact), "images": [str(images)], "kw": kw})
    out = subprocess.run([sys.executable, "-c", BEFORE, arg], env=env, capture_output=True, text=True, check=True)
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return {"passed": data["passed"], "failures": data["failures"],
            **{t: figures(np.array(c)) for t, c in data["cos"].items()}}


def after(artifact: Path, images: Path, kw: dict) -> dict:
    from clipdeploy.errors import AccuracyError
    from clipdeploy.quantize.config import QuantizeConfig
    from clipdeploy.quantize.stage import quantize

    cfg = QuantizeConfig(artifact=artifact, precision="int8", calib_images=[images], threads=2, force=True,
                         **{k: (Path(v) if v else v) for k, v in kw.items()})
    try:
        report = quantize(cfg)
    except AccuracyError as e:
        report = e.report
    row = {"passed": report["passed"], "failures": report["failures"]}
    for t in ("image", "text"):
        r = report[t]
        row[t] = {"n": r["samples"], "min": round(r["min_cosine"], 4), "p1": round(r["p1_cosine"], 4),
                  "mean": round(r["mean_cosine"], 4), "worst": r["worst"][0]["sample"]}
    row["calibration"] = {t: report["data"][t]["calibration"] for t in ("image", "text")}
    rec = report.get("recovery")
    row["recovery"] = None if rec is None else {
        "rounds": len(rec["rounds"]),
        "kept": {t: [n["module"] or n["node"] for n in nodes]
                 for t, nodes in rec.get("kept_in_higher_precision", {}).items()},
        "exhausted": rec.get("exhausted"),
    }
    return row


def main() -> None:
    out = Path(sys.argv[1])
    base_src = Path(sys.argv[2]) if len(sys.argv) > 2 else None
    out.mkdir(parents=True, exist_ok=True)
    data = shapes(out / "shapes")
    photo = crops(out / "crops")
    models = export_models(out / "models")
    shape_texts = {"calib_texts": str(data["captions"]), "gate_prompts": str(data["prompts"])}
    runs = [("micro-vit (trained)", "shapes", data["images"], shape_texts),
            ("micro-vit (trained)", "photo crops", photo, {})]
    runs += [(name, "photo crops", photo, {}) for name in models if name != "micro-vit (trained)"]
    rows = []
    for name, kind, images, kw in runs:
        work = out / "work"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(models[name], work)
        row: dict = {"model": name, "data": kind}
        if base_src is not None:
            row["before"] = before(base_src, work, images, kw)
            shutil.rmtree(work)
            shutil.copytree(models[name], work)
        row["after"] = after(work, images, kw)
        print(json.dumps(row), flush=True)
        rows.append(row)
    (out / "worst_case.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
