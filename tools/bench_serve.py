"""Serving benchmark (issue #21): C concurrent clients against `clipdeploy serve`, its --max-batch 1 twin,
a plain FastAPI + open_clip peer, and the in-process ceiling.

    python tools/bench_serve.py ARTIFACT [--clients 32] [--seconds 20] [--rounds 3] [--modality both]
        [--contenders serve,serve-b1,torch-peer,ceiling] [--checkpoint CKPT] [--out DIR]

Contenders (each measured with the same request bodies, round-robin over --rounds; the report gives the
median over rounds of items/s, p50 and p99, and of the per-round ratios x ceiling and x peer):
  serve       `clipdeploy serve ARTIFACT --max-batch 32` (dynamic batching), a subprocess on 127.0.0.1
  serve-b1    the same server with --max-batch 1
  torch-peer  tools/serve_peer.py: FastAPI + open_clip on PyTorch, one forward pass per request, written
              the way a user would (ours); it loads the artifact's own weights (from the manifest: the
              pretrained tag or the seed of random weights; --checkpoint FILE for an artifact exported
              from a checkpoint, checked against the manifest's sha256)
  ceiling     in this process, no HTTP: ``session.encode_image(jpegs, batch_size=B)`` (``encode_text`` for
              text) on 4 x B of the same JPEG bytes (strings) per call, back to back, decode, preprocess and
              inference included (encode_image decodes the next batches in its worker threads while one
              runs), where B is the mean batch size `serve` reached (its /metrics ``clipdeploy_batch_size``),
              rounded; its p50/p99 are per batch (a call's time / 4)

Load: --clients asyncio tasks in this one process share one httpx.AsyncClient (a pool of --clients
connections); each sends one item per request (a 224-px JPEG, or one caption) from pre-encoded bodies,
for --seconds after --warmup seconds. The clients run on the same machine as the servers and take CPU
from them. Every response is checked against ``session.encode_*`` (the variant the server runs; the
fp32 variant for the PyTorch peer): cosine >= 0.9999, anything else (and any non-200) is an error.

Writes DIR/bench-serve.json and DIR/bench-serve.md and prints the Markdown: per modality a table
(contender, items/s, p50 ms, p99 ms, p99/p50, errors, x ceiling, x peer), the CPU with its flags, the
load, and the issue's goal verdicts. Exit 0 with a report, 2 for bad arguments, 1 when a server fails.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipdeploy import cpu_features
from clipdeploy.errors import ClipDeployError, UsageError

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "src" / "clipdeploy" / "data" / "images"
CONTENDERS = ("serve", "serve-b1", "torch-peer", "ceiling")
MODALITIES = ("image", "text")
SERVED_NAME = "clip"  # the name the servers serve the artifact under
COSINE_MIN = 0.9999
# The issue's goals.
# The ceiling's calls: this many batches each, so encode_image decodes the next batches (its own worker
# threads) while one runs, the library's best in-process path.
CEILING_BATCHES = 4
GOAL_CEILING = 0.8  # serve items/s >= this x the in-process ceiling
GOAL_PEER_VNNI = 4.0  # serve items/s >= this x the PyTorch peer on a CPU with VNNI (AVX512-VNNI, AVX-VNNI, AMX)
GOAL_PEER_AVX2 = 2.0  # ... and this on a CPU without
GOAL_TAIL = 3.0  # serve p99 <= this x p50
GOAL_SETUP = {"clients": 32, "model": "ViT-B-32"}
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
TEXTS = (
    "a photo of a cat", "a dog running on the beach", "an astronaut in a white suit", "a rocket on the launch pad",
    "a cup of coffee on a wooden table", "old coins in a pile", "a clock on the wall", "a camera man in a park",
    "the night sky full of galaxies", "a red motorcycle parked by the road", "two people riding bicycles",
    "a bowl of fresh fruit", "a city street at night", "a snowy mountain at sunrise", "a plate of pasta",
    "a child flying a kite",
)  # fmt: skip


class BenchError(ClipDeployError):
    """A contender could not be measured: a server that did not start, or died."""

    exit_code = 1


@dataclass
class BenchConfig:
    """What one run measures; the defaults are the issue's goal setup."""

    artifact: Path  # the artifact directory every contender serves
    clients: int = 32  # concurrent clients, each with one request in flight
    seconds: float = 20.0  # measured seconds per contender, modality and round
    warmup: float = 3.0  # seconds of the same load before each measurement, not counted
    rounds: int = 3  # round-robin rounds; the report gives medians
    modality: str = "both"  # image, text or both
    contenders: list[str] = field(default_factory=lambda: list(CONTENDERS))
    checkpoint: Path | None = None  # the peer's weights, for an artifact exported from a checkpoint
    backend: str = "auto"  # passed to `clipdeploy serve --backend` and clipdeploy.load
    precision: str | None = None  # passed to `clipdeploy serve --precision`; None: its default path
    max_batch: int = 32  # serve's --max-batch (serve-b1 runs 1)
    image_size: int = 224  # side of the square JPEGs sent
    distinct: int = 64  # distinct images and texts the clients cycle through
    ceiling_batch: int | None = None  # the ceiling's batch; None: serve's mean batch (else min(clients, max_batch))
    out: Path = Path("bench-serve")
    start_timeout: float = 300.0  # seconds a server may take to become ready

    @property
    def modalities(self) -> list[str]:
        return list(MODALITIES) if self.modality == "both" else [self.modality]


# ---- what the clients send --------------------------------------------------------------------------


def make_jpegs(n: int, size: int, seed: int = 0) -> list[bytes]:
    """``n`` distinct square JPEGs of ``size`` px: crops of the bundled photographs, resized."""
    from PIL import Image

    rng = random.Random(seed)
    sources = [Image.open(p).convert("RGB") for p in sorted(BUNDLED.glob("*.jpg"))]
    out = []
    for _ in range(n):
        img = rng.choice(sources)
        w, h = img.size
        side = int(min(w, h) * rng.uniform(0.5, 1.0))
        x, y = rng.randint(0, w - side), rng.randint(0, h - side)
        buf = io.BytesIO()
        img.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def make_texts(n: int) -> list[str]:
    """``n`` distinct captions."""
    out = []
    for i in range(n):
        base = TEXTS[i % len(TEXTS)]
        k = i // len(TEXTS)
        out.append(base if k == 0 else f"{base}, picture {k + 1}")
    return out


def request_bodies(modality: str, items: list[Any]) -> list[bytes]:
    """One JSON body per item, in the shape both `clipdeploy serve` and the peer take."""
    if modality == "image":
        inputs: list[Any] = [{"image": base64.b64encode(b).decode("ascii")} for b in items]
    else:
        inputs = list(items)
    return [json.dumps({"model": SERVED_NAME, "input": x}).encode() for x in inputs]


# ---- measuring -------------------------------------------------------------------------------------


@dataclass
class Window:
    """One contender, modality and round."""

    items: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds, one per request (per call for the ceiling)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)

    def error(self, why: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5 and why not in self.error_samples:
            self.error_samples.append(why)

    def row(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        return {
            "items": self.items,
            "seconds": round(self.seconds, 3),
            "items_per_s": round(self.items / self.seconds, 3) if self.seconds > 0 else 0.0,
            "p50_ms": round(_percentile(lat, 50) * 1e3, 2) if lat else None,
            "p99_ms": round(_percentile(lat, 99) * 1e3, 2) if lat else None,
            "errors": self.errors,
            "error_samples": self.error_samples,
        }


def _percentile(sorted_values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(sorted_values), q))


def check_row(got: Any, ref: np.ndarray) -> str | None:
    """Why an embedding is not the reference's (cosine below COSINE_MIN), or None."""
    v = np.asarray(got, dtype=np.float64)
    if v.shape != ref.shape:
        return f"embedding of shape {v.shape}, expected {ref.shape}"
    cos = float(v @ ref / (np.linalg.norm(v) * np.linalg.norm(ref) or 1.0))
    return None if cos >= COSINE_MIN else f"cosine {cos:.6f} < {COSINE_MIN} against session.encode_*"


async def _drive(url: str, bodies: list[bytes], refs: np.ndarray, clients: int, seconds: float,
                 requests: int | None = None) -> Window:  # fmt: skip
    import httpx

    win = Window()
    issued = [0]
    last = [0.0]
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(limits=limits, timeout=120.0) as client:
        start = time.perf_counter()
        end = start + seconds

        async def one_client(k: int) -> None:
            i = k
            while time.perf_counter() < end:
                if requests is not None:
                    if issued[0] >= requests:
                        return
                    issued[0] += 1
                j = i % len(bodies)
                i += clients
                t0 = time.perf_counter()
                try:
                    r = await client.post(url, content=bodies[j], headers=headers)
                except Exception as e:  # a dropped connection is an error of the contender, counted
                    win.error(f"{type(e).__name__}: {e}"[:200])
                    continue
                t1 = time.perf_counter()
                if r.status_code != 200:
                    win.error(f"HTTP {r.status_code}: {r.text[:160]}")
                    continue
                try:
                    data = r.json()["data"]
                    why = "answer has not 1 row" if len(data) != 1 else check_row(data[0]["embedding"], refs[j])
                except (ValueError, KeyError, TypeError) as e:
                    why = f"unreadable answer ({type(e).__name__}: {e})"[:200]
                if why:
                    win.error(why)
                elif t1 <= end:
                    win.items += 1
                    win.latencies.append(t1 - t0)
                    last[0] = max(last[0], t1)

        await asyncio.gather(*(one_client(k) for k in range(clients)))
        win.seconds = seconds if requests is None else max(last[0] - start, 0.0)
    return win


def drive(url: str, bodies: list[bytes], refs: np.ndarray, clients: int, seconds: float,
          requests: int | None = None) -> Window:  # fmt: skip
    """``clients`` concurrent clients, one item per request, for ``seconds`` (or until ``requests`` were
    sent, within ``seconds``); every response checked against ``refs``."""
    return asyncio.run(_drive(url, bodies, refs, clients, seconds, requests))


def measure_ceiling(session: Any, modality: str, items: list[Any], refs: np.ndarray, batch: int,
                    seconds: float, warmup: float, batches_per_call: int = CEILING_BATCHES) -> Window:  # fmt: skip
    """``session.encode_image``/``encode_text`` on ``batches_per_call`` x ``batch`` items per call with
    ``batch_size=batch``, back to back; latencies are each call's time divided by ``batches_per_call``."""
    encode = session.encode_image if modality == "image" else session.encode_text
    n = len(items)
    per_call = batch * batches_per_call

    def call(start: int) -> tuple[list[int], np.ndarray]:
        idx = [(start + k) % n for k in range(per_call)]
        return idx, encode([items[i] for i in idx], batch_size=batch)

    pos = 0
    until = time.perf_counter() + warmup
    while time.perf_counter() < until:
        call(pos)
        pos += per_call
    win = Window()
    start = time.perf_counter()
    end = start + seconds
    t1 = start
    while t1 < end:
        t0 = time.perf_counter()
        idx, out = call(pos)
        t1 = time.perf_counter()
        pos += per_call
        for i, row in zip(idx, out, strict=True):
            why = check_row(row, refs[i])
            if why:
                win.error(why)
        win.items += per_call
        win.latencies.append((t1 - t0) / batches_per_call)
    win.seconds = t1 - start
    return win


# ---- servers ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """One server contender: a subprocess on 127.0.0.1, its log in the output folder."""

    def __init__(self, name: str, cmd: list[str], port: int, log: Path, probe: bytes | None) -> None:
        self.name, self.cmd, self.port, self.log = name, cmd, port, log
        self.probe = probe  # None: wait for GET /ready; else POST this body until it answers 200
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "src"), str(REPO),
                                                                       os.environ.get("PYTHONPATH", "")) if p)}  # fmt: skip
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)

    def tail(self, lines: int = 5) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise BenchError(f"{self.name} exited with code {self.proc.returncode}; its log {self.log}: {self.tail()}")

    def wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=30.0) as client:
            while True:
                self.alive()
                try:
                    if self.probe is None:
                        r = client.get(self.base + "/ready")
                    else:
                        r = client.post(self.base + "/v1/embeddings", content=self.probe,
                                        headers={"content-type": "application/json"})  # fmt: skip
                    if r.status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise BenchError(f"{self.name} was not ready after {timeout:.0f} s; its log {self.log}: {self.tail()}")
                time.sleep(0.3)

    def get(self, path: str) -> Any:
        import httpx

        r = httpx.get(self.base + path, timeout=30.0)
        r.raise_for_status()
        return r

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def batch_totals(metrics_text: str, model: str = SERVED_NAME) -> dict[str, tuple[float, float]]:
    """tower -> (sum, count) of the ``clipdeploy_batch_size`` histogram in a /metrics page."""
    totals: dict[str, list[float]] = {}
    for line in metrics_text.splitlines():
        for suffix, slot in (("_sum{", 0), ("_count{", 1)):
            head = "clipdeploy_batch_size" + suffix
            if not line.startswith(head):
                continue
            labels, _, value = line[len(head):].partition("} ")
            pairs = dict(p.split("=", 1) for p in labels.split(",") if "=" in p)
            if pairs.get("model", "").strip('"') != model:
                continue
            tower = pairs.get("tower", "").strip('"')
            totals.setdefault(tower, [0.0, 0.0])[slot] = float(value)
    return {t: (v[0], v[1]) for t, v in totals.items()}


def peer_weights(manifest: dict[str, Any], checkpoint: Path | None, tmp: Path) -> list[str]:
    """serve_peer.py's arguments that give it the artifact's weights; one line when it cannot have them."""
    from clipdeploy.artifact.view import ModelFacts
    from clipdeploy.benchmarks.torch_reference import check_reference_weights

    model = manifest["model"]
    if model.get("reduced_depth"):
        raise UsageError(f"the artifact was exported at reduced depth ({model['reduced_depth']}), which the "
                         "PyTorch peer cannot rebuild; leave torch-peer out of --contenders")  # fmt: skip
    check_reference_weights(ModelFacts.from_dict(model), checkpoint)
    args = ["--model", str(model["name"])]
    if model.get("model_config"):
        config = tmp / f"{model['name']}.json"
        config.write_text(json.dumps(model["model_config"]), encoding="utf-8")
        args += ["--model-config", str(config)]
    if model.get("checkpoint_sha256"):
        args += ["--checkpoint", str(Path(checkpoint).resolve())]  # type: ignore[arg-type]
    elif model.get("pretrained"):
        args += ["--pretrained", str(model["pretrained"])]
    elif model.get("random_init_seed") is not None:
        args += ["--seed", str(int(model["random_init_seed"]))]
    return args


def server_commands(cfg: BenchConfig, manifest: dict[str, Any], tmp: Path) -> dict[str, list[str]]:
    """The command line of each server contender."""
    serve = [sys.executable, "-m", "clipdeploy.cli", "serve", f"{SERVED_NAME}={cfg.artifact}", "--backend", cfg.backend]
    if cfg.precision:
        serve += ["--precision", cfg.precision]
    cmds: dict[str, list[str]] = {}
    if "serve" in cfg.contenders:
        cmds["serve"] = serve + ["--max-batch", str(cfg.max_batch)]
    if "serve-b1" in cfg.contenders:
        cmds["serve-b1"] = serve + ["--max-batch", "1"]
    if "torch-peer" in cfg.contenders:
        cmds["torch-peer"] = [sys.executable, str(REPO / "tools" / "serve_peer.py"),
                              *peer_weights(manifest, cfg.checkpoint, tmp)]  # fmt: skip
    return cmds


# ---- the run ----------------------------------------------------------------------------------------


def run(cfg: BenchConfig, argv: list[str]) -> dict[str, Any]:
    """Measure every contender (round-robin) and return the report (also written to cfg.out)."""
    manifest = json.loads((cfg.artifact / "manifest.json").read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        cmds = server_commands(cfg, manifest, Path(tmp))  # refuses a peer without the artifact's weights first
        return _run(cfg, argv, manifest, cmds)


def _run(cfg: BenchConfig, argv: list[str], manifest: dict[str, Any], cmds: dict[str, list[str]]) -> dict[str, Any]:
    import clipdeploy
    from clipdeploy.benchmarks import environment

    cfg.out.mkdir(parents=True, exist_ok=True)
    env = environment.collect(threads=environment.available_cores(), device="cpu")
    env["cpu_flags"] = sorted(set(REPORTED_FLAGS) & cpu_features.flags())
    env["vnni"] = cpu_features.has_vnni()
    session = clipdeploy.load(cfg.artifact, backend=cfg.backend, precision=cfg.precision)
    payload = {"image": make_jpegs(cfg.distinct, cfg.image_size), "text": make_texts(cfg.distinct)}
    bodies = {m: request_bodies(m, payload[m]) for m in cfg.modalities}
    encode = {"image": session.encode_image, "text": session.encode_text}
    refs = {m: encode[m](payload[m]).astype(np.float64) for m in cfg.modalities}
    peer_refs: dict[str, np.ndarray] = {}
    servers: dict[str, Server] = {}
    if "torch-peer" in cmds:  # the peer runs fp32 PyTorch: compared with the artifact's fp32 variant
        fp32 = clipdeploy.load(cfg.artifact, backend=cfg.backend, precision="fp32")
        peer_encode = {"image": fp32.encode_image, "text": fp32.encode_text}
        peer_refs = {m: peer_encode[m](payload[m]).astype(np.float64) for m in cfg.modalities}
        del fp32
    try:
        for name, cmd in cmds.items():
            port = free_port()
            probe = bodies[cfg.modalities[0]][0] if name == "torch-peer" else None
            servers[name] = Server(name, [*cmd, "--port", str(port)], port, cfg.out / f"{name}.log", probe)
            servers[name].start()
        for s in servers.values():
            _log(f"waiting for {s.name} on port {s.port}")
            s.wait_ready(cfg.start_timeout)
        for name in ("serve", "serve-b1"):
            if name in servers:
                _same_variants(servers[name], session)
        results = _rounds(cfg, servers, session, payload, bodies, refs, peer_refs)
    finally:
        for s in servers.values():
            s.stop()
    env["load_average_end"] = environment.load_average()
    report = {
        "command": "python tools/bench_serve.py " + shlex.join(argv),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "model": manifest["model"]["name"],
        "served": session.describe(),
        "environment": env,
        "results": results,
    }
    report["summary"] = {m: summarize(results[m]) for m in results}
    report["goals"] = goal_verdicts(report["summary"], env["vnni"], setup_notes(cfg, report["model"]))
    (cfg.out / "bench-serve.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    (cfg.out / "bench-serve.md").write_text(markdown(report), encoding="utf-8")
    return report


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _log(msg: str) -> None:
    print(f"bench_serve: {msg}", file=sys.stderr, flush=True)


def _same_variants(server: Server, session: Any) -> None:
    card = next(c for c in server.get("/v1/models").json()["data"] if c["id"] == SERVED_NAME)
    mine = {t: f"{v.precision} {v.format}" for t, v in session.variants.items()}
    if card.get("variants") != mine or card.get("backend") != session.backend:
        raise BenchError(f"{server.name} runs {card.get('backend')} {card.get('variants')}, this process "
                         f"{session.backend} {mine}: the responses could not be checked; pass --backend/--precision")  # fmt: skip


def _rounds(cfg: BenchConfig, servers: dict[str, Server], session: Any, payload: dict[str, list[Any]],
            bodies: dict[str, list[bytes]], refs: dict[str, np.ndarray],
            peer_refs: dict[str, np.ndarray]) -> dict[str, dict[str, list[dict[str, Any]]]]:  # fmt: skip
    # The ceiling runs after serve in each round: its batch is the mean batch serve reached so far.
    order = [c for c in cfg.contenders if c != "ceiling"] + (["ceiling"] if "ceiling" in cfg.contenders else [])
    results: dict[str, dict[str, list[dict[str, Any]]]] = {m: {c: [] for c in order} for m in cfg.modalities}
    batches: dict[str, list[float]] = {m: [0.0, 0.0] for m in cfg.modalities}  # serve's batch sum, count
    for r in range(cfg.rounds):
        for m in cfg.modalities:
            for c in order:
                if c == "ceiling":
                    b = cfg.ceiling_batch or (round(batches[m][0] / batches[m][1]) if batches[m][1]
                                              else min(cfg.clients, cfg.max_batch))  # fmt: skip
                    win = measure_ceiling(session, m, payload[m], refs[m], max(1, b), cfg.seconds, cfg.warmup)
                    row = {**win.row(), "batch": max(1, b)}
                else:
                    row = _measure_server(cfg, servers[c], m, bodies[m], peer_refs[m] if c == "torch-peer" else refs[m],
                                          batches[m] if c == "serve" else None)  # fmt: skip
                row["round"] = r + 1
                row["load_average"] = _load()  # the 1-minute load as the window ends: how busy the machine was
                results[m][c].append(row)
                _log(f"round {r + 1}/{cfg.rounds} {m} {c}: {row['items_per_s']:.1f} items/s, p50 {row['p50_ms']} ms, "
                     f"p99 {row['p99_ms']} ms, {row['errors']} errors")  # fmt: skip
    return results


def _measure_server(cfg: BenchConfig, server: Server, modality: str, bodies: list[bytes], refs: np.ndarray,
                    batches: list[float] | None) -> dict[str, Any]:  # fmt: skip
    url = server.base + "/v1/embeddings"
    warm = drive(url, bodies, refs, cfg.clients, cfg.warmup) if cfg.warmup > 0 else Window()
    server.alive()
    before = batch_totals(server.get("/metrics").text) if batches is not None else {}
    win = drive(url, bodies, refs, cfg.clients, cfg.seconds)
    server.alive()
    row = win.row()
    row["errors"] += warm.errors
    row["error_samples"] = (row["error_samples"] + warm.error_samples)[:5]
    if batches is not None:
        after = batch_totals(server.get("/metrics").text)
        s0, n0 = before.get(modality, (0.0, 0.0))
        s1, n1 = after.get(modality, (0.0, 0.0))
        if n1 > n0:
            row["mean_batch"] = round((s1 - s0) / (n1 - n0), 2)
            batches[0] += s1 - s0
            batches[1] += n1 - n0
    return row


# ---- the report -------------------------------------------------------------------------------------


def summarize(per_contender: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Medians over rounds per contender, with the ratios to the ceiling and to the peer."""
    out: dict[str, dict[str, Any]] = {}
    for c, rows in per_contender.items():
        if not rows:
            continue

        def med(key: str, rows: list[dict[str, Any]] = rows) -> float | None:
            values = [r[key] for r in rows if r.get(key) is not None]
            return float(statistics.median(values)) if values else None

        s: dict[str, Any] = {"rounds": len(rows), "items_per_s": med("items_per_s"), "p50_ms": med("p50_ms"),
                             "p99_ms": med("p99_ms"), "errors": sum(r["errors"] for r in rows)}  # fmt: skip
        s["p99_over_p50"] = s["p99_ms"] / s["p50_ms"] if s["p50_ms"] and s["p99_ms"] is not None else None
        if "mean_batch" in rows[0] or c == "serve":
            s["mean_batch"] = med("mean_batch")
        if c == "ceiling":
            s["batch"] = rows[-1].get("batch")
            s["batches"] = [r.get("batch") for r in rows]
        out[c] = s
    # A ratio is the median of the per-round ratios: each pairs two windows measured minutes apart at most,
    # so a load that drifts over the run (other jobs on the machine) moves both sides of each ratio alike.
    for ref, key in (("ceiling", "x_ceiling"), ("torch-peer", "x_peer")):
        base_rows = per_contender.get(ref) or []
        for c, s in out.items():
            pairs = [a["items_per_s"] / b["items_per_s"]
                     for a, b in zip(per_contender[c], base_rows) if b["items_per_s"]]  # fmt: skip
            s[key] = float(statistics.median(pairs)) if pairs and len(base_rows) == len(per_contender[c]) else None
    return out


def setup_notes(cfg: BenchConfig, model: str) -> list[str]:
    """How this run differs from the issue's goal setup (empty when it matches)."""
    notes = []
    if cfg.clients != GOAL_SETUP["clients"]:
        notes.append(f"{cfg.clients} clients, not {GOAL_SETUP['clients']}")
    if model != GOAL_SETUP["model"]:
        notes.append(f"model {model}, not {GOAL_SETUP['model']}")
    if cfg.precision is not None:
        notes.append(f"--precision {cfg.precision}, not the default path")
    if cfg.image_size != 224:
        notes.append(f"{cfg.image_size}-px images, not 224")
    return notes


def goal_verdicts(summary: dict[str, dict[str, dict[str, Any]]], vnni: bool, notes: list[str]) -> list[dict[str, Any]]:
    """The issue's goals for `serve`, per modality: each with the measured value and whether it passed."""
    goals = []
    need_peer = GOAL_PEER_VNNI if vnni else GOAL_PEER_AVX2
    cpu = "a CPU with VNNI" if vnni else "a CPU without VNNI (AVX2 only)"
    for m, s in summary.items():
        serve = s.get("serve")
        if serve is None:
            continue
        if serve.get("x_ceiling") is not None:
            goals.append({"modality": m, "goal": f"serve >= {GOAL_CEILING}x the in-process ceiling",
                          "value": serve["x_ceiling"], "passed": serve["x_ceiling"] >= GOAL_CEILING})  # fmt: skip
        if serve.get("x_peer") is not None:
            goals.append({"modality": m, "goal": f"serve >= {need_peer:g}x the PyTorch peer on {cpu}",
                          "value": serve["x_peer"], "passed": serve["x_peer"] >= need_peer})  # fmt: skip
        if serve.get("p99_over_p50") is not None:
            goals.append({"modality": m, "goal": f"serve p99 <= {GOAL_TAIL:g}x p50", "value": serve["p99_over_p50"],
                          "passed": serve["p99_over_p50"] <= GOAL_TAIL})  # fmt: skip
        errors = sum(c["errors"] for c in s.values())
        goals.append({"modality": m, "goal": "zero errors (every contender)", "value": errors, "passed": errors == 0})
    for g in goals:
        g["setup_differs"] = notes
    return goals


def _fmt(v: Any, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def _load_range(report: dict[str, Any]) -> str:
    loads = [r["load_average"] for per in report["results"].values() for rows in per.values() for r in rows
             if r.get("load_average") is not None]  # fmt: skip
    return f"{min(loads)}-{max(loads)}" if loads else "unknown"


def markdown(report: dict[str, Any]) -> str:
    env, cfg = report["environment"], report["config"]
    flags = ", ".join(env["cpu_flags"]) or "none of " + ", ".join(REPORTED_FLAGS)
    lines = [
        f"# Serving benchmark: {report['model']}",
        "",
        f"- machine: {env['cpu']}, {env['available_cores']} cores, {env['memory_gb']} GB; flags: {flags}",
        f"- load average (1 min): {env['load_average_start']} at the start, {_load_range(report)} as the windows "
        f"ended, {env['load_average_end']} at the end; the {cfg['clients']} clients run in one asyncio process "
        "on the same machine and take CPU from the servers",
        f"- served: {report['served']}",
        f"- {cfg['clients']} concurrent clients, one item per request, {cfg['seconds']:g} s measured after "
        f"{cfg['warmup']:g} s warm-up, {cfg['rounds']} round(s) round-robin; medians over rounds, "
        "x ceiling and x peer the median of the per-round ratios",
        f"- command: `{report['command']}`",
    ]
    what = {"image": f"one {cfg['image_size']}-px JPEG per request", "text": "one caption per request"}
    for m, s in report["summary"].items():
        lines += ["", f"## {m} ({what[m]})", "",
                  "| contender | items/s | p50 ms | p99 ms | p99/p50 | errors | x ceiling | x peer |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for c, r in s.items():
            lines.append(f"| {c} | {_fmt(r['items_per_s'], '.1f')} | {_fmt(r['p50_ms'], '.1f')} | "
                         f"{_fmt(r['p99_ms'], '.1f')} | {_fmt(r['p99_over_p50'], '.2f')} | {r['errors']} | "
                         f"{_fmt(r['x_ceiling'], '.2f')} | {_fmt(r['x_peer'], '.2f')} |")  # fmt: skip
        notes = []
        if s.get("serve", {}).get("mean_batch") is not None:
            notes.append(f"serve's mean batch: {s['serve']['mean_batch']:.1f} items")
        if "ceiling" in s:
            b = s["ceiling"]["batch"]
            call = (f"encode_image({CEILING_BATCHES * b} JPEG bytes, batch_size={b})" if m == "image"
                    else f"encode_text({CEILING_BATCHES * b} strings, batch_size={b})")  # fmt: skip
            if len(set(s["ceiling"]["batches"])) > 1:
                call += f" (B by round: {', '.join(map(str, s['ceiling']['batches']))})"
            notes.append(f"ceiling: session.{call} back to back in this process, decode or tokenization included, "
                         f"no HTTP; its p50/p99 are per batch (a call's time / {CEILING_BATCHES})")  # fmt: skip
        if notes:
            lines += ["", "; ".join(notes) + "."]
        for c, r in s.items():
            rows = report["results"][m][c]
            samples = sorted({x for row in rows for x in row.get("error_samples", [])})
            if samples:
                lines.append(f"\n{c} errors, e.g.: " + "; ".join(samples[:3]))
    lines += ["", "## Goals (issue #21)", ""]
    for g in report["goals"]:
        value = f"{g['value']}" if isinstance(g["value"], int) else f"{g['value']:.2f}x"
        lines.append(f"- {'PASS' if g['passed'] else 'FAIL'} {g['modality']}: {g['goal']}: {value}")
    if report["goals"] and report["goals"][0]["setup_differs"]:
        lines.append(f"- this run differs from the goal setup ({'; '.join(report['goals'][0]['setup_differs'])}): "
                     "the verdicts are for information")  # fmt: skip
    return "\n".join(lines) + "\n"


# ---- the command ------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> BenchConfig:
    d = BenchConfig(artifact=Path("."))
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()), formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2])  # fmt: skip
    ap.add_argument("artifact", type=Path, help="artifact directory (`clipdeploy export`)")
    ap.add_argument("--clients", type=int, default=d.clients, help=f"concurrent clients (default {d.clients})")
    ap.add_argument("--seconds", type=float, default=d.seconds, help=f"measured seconds per window (default {d.seconds:g})")
    ap.add_argument("--warmup", type=float, default=d.warmup, help=f"warm-up seconds per window (default {d.warmup:g})")
    ap.add_argument("--rounds", type=int, default=d.rounds, help=f"round-robin rounds (default {d.rounds})")
    ap.add_argument("--modality", choices=("image", "text", "both"), default=d.modality)
    ap.add_argument("--contenders", default=",".join(CONTENDERS), help=f"comma list of {', '.join(CONTENDERS)}")
    ap.add_argument("--checkpoint", type=Path, help="the peer's weights when the artifact came from a checkpoint")
    ap.add_argument("--backend", default=d.backend, help="serve's backend (default auto)")
    ap.add_argument("--precision", help="serve's variant (default: serve's own default path)")
    ap.add_argument("--max-batch", type=int, default=d.max_batch, help=f"serve's --max-batch (default {d.max_batch})")
    ap.add_argument("--image-size", type=int, default=d.image_size, help=f"JPEG side in px (default {d.image_size})")
    ap.add_argument("--ceiling-batch", type=int, help="the ceiling's batch (default: serve's mean batch)")
    ap.add_argument("--out", type=Path, default=d.out, help=f"report folder (default {d.out})")
    ap.add_argument("--start-timeout", type=float, default=d.start_timeout, help="seconds a server may take to start")
    a = ap.parse_args(argv)
    names = [c.strip() for c in a.contenders.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONTENDERS]
    if unknown or not names:
        raise UsageError(f"--contenders {a.contenders!r}: unknown {', '.join(unknown) or 'empty list'}; "
                         f"pick from {', '.join(CONTENDERS)}")  # fmt: skip
    if not (a.artifact / "manifest.json").is_file():
        raise UsageError(f"{str(a.artifact)!r} is not an artifact directory (no manifest.json); pass one "
                         "`clipdeploy export` made")  # fmt: skip
    for flag, value, low in (("--clients", a.clients, 1), ("--rounds", a.rounds, 1), ("--max-batch", a.max_batch, 1),
                             ("--image-size", a.image_size, 8), ("--ceiling-batch", a.ceiling_batch or 1, 1)):  # fmt: skip
        if value < low:
            raise UsageError(f"{flag} {value} must be {low} or more")
    if not a.seconds > 0 or a.warmup < 0:
        raise UsageError(f"--seconds {a.seconds:g} must be more than 0 and --warmup {a.warmup:g} 0 or more")
    if a.checkpoint is not None and "torch-peer" not in names:
        raise UsageError("--checkpoint is for the PyTorch peer; add torch-peer to --contenders or drop --checkpoint")
    return BenchConfig(
        artifact=a.artifact.resolve(), clients=a.clients, seconds=a.seconds, warmup=a.warmup, rounds=a.rounds,
        modality=a.modality, contenders=list(dict.fromkeys(names)), checkpoint=a.checkpoint, backend=a.backend,
        precision=a.precision, max_batch=a.max_batch, image_size=a.image_size, ceiling_batch=a.ceiling_batch,
        out=a.out, start_timeout=a.start_timeout,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = parse_args(argv)
        report = run(cfg, argv)
    except ClipDeployError as e:
        print(f"bench_serve: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("bench_serve: interrupted", file=sys.stderr)
        return 130
    print(markdown(report), end="")
    print(f"bench_serve: wrote {cfg.out / 'bench-serve.json'} and bench-serve.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
