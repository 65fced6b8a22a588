"""Benchmark `clipdeploy embed-dataset`: images/s from JPEG files to parquet, local 1 and 2 workers and local Ray.

    python tools/bench_embed_dataset.py ARTIFACT --images 2000 --precision int8 [--work DIR] [--rounds 1]
        [--contenders local-x1,local-x2,ray-x2]

Generates photographs by cropping, resizing and jittering the bundled ones (JPEG, 320-640 px), then runs
each contender in turn (round-robin over --rounds) into a fresh output directory and prints the
items_per_second that each run's _manifest.json records (the run's own wall clock, session loads included),
then a markdown table of the best and median images/s per contender. ray-x2 starts a local Ray (needs
clipdeploy[ray]).
"""

from __future__ import annotations

import argparse
import os
import json
import platform
import statistics
import random
import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image, ImageEnhance

BUNDLED = Path(__file__).resolve().parents[1] / "src" / "clipdeploy" / "data" / "images"


def make_photos(folder: Path, n: int, seed: int = 0) -> None:
    if folder.is_dir() and len(list(folder.glob("*.jpg"))) == n:
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    sources = [Image.open(p).convert("RGB") for p in sorted(BUNDLED.glob("*.jpg"))]
    for i in range(n):
        img = rng.choice(sources)
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.5, 1)), int(h * rng.uniform(0.5, 1))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        side = rng.randint(320, 640)
        out = img.crop((x, y, x + cw, y + ch)).resize((side, int(side * ch / cw)), Image.Resampling.BILINEAR)
        out = ImageEnhance.Brightness(out).enhance(rng.uniform(0.7, 1.3))
        out.save(folder / f"{i:06d}.jpg", quality=rng.randint(75, 95))


CONTENDERS = {
    "local-x1": ["--workers", "1"],
    "local-x2": ["--workers", "2"],
    "ray-x2": ["--ray", "--workers", "2"],
}


def table(results: dict[str, list[float]], images: int, precision: str) -> str:
    lines = [
        f"{images} generated JPEGs, {precision}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "",
        "| runner | best images/s | median images/s | rounds |",
        "|---|---:|---:|---:|",
    ]
    for name, v in results.items():
        lines.append(f"| {name} | {max(v):.2f} | {statistics.median(v):.2f} | {len(v)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--precision", default="int8")
    ap.add_argument("--work", default="/tmp/bench-embed-dataset")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--shard-size", type=int, default=250)
    ap.add_argument("--contenders", default=",".join(CONTENDERS), help=f"comma list of {', '.join(CONTENDERS)}")
    args = ap.parse_args(argv)
    names = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONTENDERS]
    if unknown or not names:
        ap.error(f"--contenders: {unknown or 'none'} not among {', '.join(CONTENDERS)}")
    work = Path(args.work)
    photos = work / "photos"
    make_photos(photos, args.images)
    contenders = {n: CONTENDERS[n] for n in names}
    results: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(args.rounds):
        for name, flags in contenders.items():
            out = work / f"out-{name}-{r}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-m", "clipdeploy.cli", "-q", "embed-dataset", args.artifact, str(photos), "-o",
                   str(out), "--precision", args.precision, "--shard-size", str(args.shard_size), *flags]  # fmt: skip
            rc = subprocess.run(cmd).returncode
            if rc != 0:
                raise SystemExit(f"{name}: embed-dataset exited {rc}; see its error above")
            manifest = json.loads((out / "_manifest.json").read_text())
            if manifest["rows"] != args.images:
                raise SystemExit(f"{name}: {manifest['rows']} rows for {args.images} images; see {out}")
            results[name].append(manifest["items_per_second"])
            print(f"round {r} {name}: {manifest['items_per_second']} images/s ({manifest['seconds']} s)", flush=True)
    print(json.dumps({k: max(v) for k, v in results.items()}))
    print(table(results, args.images, args.precision))
    return results


if __name__ == "__main__":
    main()
