"""The server in-process (httpx ASGI transport): every response equals the session's own result,
however requests interleave; every bad request is a 4xx in OpenAI's shape and the next good one works."""

from __future__ import annotations

import asyncio
import json
import io
import threading
from typing import Any

import numpy as np
import pytest

from clipdeploy.serve.app import create_app
from clipdeploy.artifact.view import ArtifactView
from tests.serve.conftest import (
    SlowSession,
    assert_rows_equal,
    b64,
    client_for,
    config,
    jpeg,
    png,
    rows,
)

TEXTS = ["a photo of a cat", "a red square on the left", "", "🚀 rocket", "a dog " * 60]  # the last one is cut


def test_texts_and_images_mixed_equal_the_session_float_and_base64(sessions: dict[str, Any]) -> None:
    s = sessions["a"]
    images = [jpeg((224, 224), 1), png((50, 31), 2), jpeg((640, 480), 3)]
    want_text, want_image = s.encode_text(TEXTS), s.encode_image(images)

    async def main() -> None:
        async with client_for(create_app(config(sessions), sessions)) as c:
            mixed = [TEXTS[0], {"image": b64(images[0])}, TEXTS[1], {"image": "data:image/png;base64," + b64(images[1])}]
            for fmt in ("float", "base64"):
                r = await c.post("/v1/embeddings", json={"model": "a", "input": mixed, "encoding_format": fmt})
                assert r.status_code == 200, r.text
                body = r.json()
                assert body["object"] == "list" and body["model"] == "a"
                assert [d["index"] for d in body["data"]] == [0, 1, 2, 3]
                got = rows(r)
                assert_rows_equal(got[[0, 2]], want_text[:2], f"texts ({fmt})")
                assert_rows_equal(got[[1, 3]], want_image[:2], f"images ({fmt})")
                ids = s.tokenize(TEXTS[:2])
                assert body["usage"]["prompt_tokens"] == int((ids != 0).sum()), "usage counts our tokenizer's tokens"
            r = await c.post("/v1/embeddings", json={"model": "a", "input": TEXTS})  # incl. empty and too long
            assert r.status_code == 200, r.text
            assert_rows_equal(rows(r), want_text, "texts, one cut to the context length as open_clip cuts it")
            # infinity's convention: strings are images when modality is "image"
            r = await c.post("/v1/embeddings", json={"model": "a", "modality": "image", "input": [b64(i) for i in images]})
            assert r.status_code == 200, r.text
            assert_rows_equal(rows(r), want_image, "modality=image")
            r = await c.post("/embeddings", json={"model": "a", "input": "a photo of a cat"})  # infinity's path
            assert_rows_equal(rows(r), want_text[:1], "/embeddings alias")

    asyncio.run(main())


def test_64_concurrent_mixed_requests_on_two_models_never_cross_rows(sessions: dict[str, Any]) -> None:
    rng = np.random.default_rng(7)
    requests = []
    for k in range(64):
        model = "ab"[k % 2]
        items: list[Any] = []
        for j in range(int(rng.integers(1, 6))):
            if rng.random() < 0.5:
                items.append(("text", f"request {k} item {j}: a {['red', 'green', 'blue'][j % 3]} thing"))
            else:
                size = (int(rng.integers(16, 400)), int(rng.integers(16, 400)))
                items.append(("image", jpeg(size, seed=1000 * k + j)))
        requests.append((model, items))

    def expected(model: str, items: list[Any]) -> np.ndarray:
        s = sessions[model]
        return np.stack([s.encode_text([x])[0] if kind == "text" else s.encode_image([x])[0] for kind, x in items])

    want = [expected(m, items) for m, items in requests]
    # the two models really differ, so a row from the wrong model would fail the comparison
    cross = float(np.dot(sessions["a"].encode_text(["a red thing"])[0], sessions["b"].encode_text(["a red thing"])[0]))
    assert cross < 0.99, f"the two test models embed alike (cosine {cross:.4f}); the test could not see a crossed row"

    async def main() -> dict[str, float]:
        app = create_app(config(sessions, max_batch=8, max_wait_ms=20), sessions)
        async with client_for(app) as c:
            async def send(model: str, items: list[Any]) -> Any:
                body = [x if kind == "text" else {"image": b64(x)} for kind, x in items]
                return await c.post("/v1/embeddings", json={"model": model, "input": body})

            responses = await asyncio.gather(*(send(m, items) for m, items in requests))
            for k, r in enumerate(responses):
                assert r.status_code == 200, f"request {k}: {r.text}"
                assert_rows_equal(rows(r), want[k], f"request {k} ({requests[k][0]})")
            metrics = (await c.get("/metrics")).text
        return _histogram(metrics, "clipdeploy_batch_size")

    counts = asyncio.run(main())
    items = sum(len(i) for _, i in requests)
    assert counts["sum"] == items, f"batches held {counts['sum']} items; sent {items}"
    assert counts["count"] < counts["sum"], "every batch held one item: nothing was batched under concurrency"


def _histogram(text: str, name: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {"sum": 0.0, "count": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name == name:
            for sample in family.samples:
                if sample.name.endswith("_sum"):
                    out["sum"] += sample.value
                elif sample.name.endswith("_count"):
                    out["count"] += sample.value
    return out


def _bomb_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (8000, 8000)).save(buf, "PNG")  # 64 Mpixels in a few kB
    return buf.getvalue()


BAD = {
    # name: (request body or raw bytes, expected status, a word the message must contain)
    "corrupt base64": ({"model": "a", "input": [{"image": "not base64 at all!"}]}, 400, "base64"),
    "a text file as an image": ({"model": "a", "input": [{"image": b64(b"hello, I am a text file\n" * 20)}]}, 400,
                                "input[0] is not a readable image"),
    "bomb png": ({"model": "a", "input": ["fine", {"image": b64(_bomb_png())}]}, 413, "input[1] is 8000x8000"),
    "too many items": ({"model": "a", "input": ["x"] * 257}, 400, "257 items"),
    "empty list": ({"model": "a", "input": []}, 400, "empty"),
    "unknown model": ({"model": "nope", "input": "x"}, 404, "served: a, b"),
    "token ids": ({"model": "a", "input": [[49406, 320, 49407]]}, 400, "token ids"),
    "flat token ids": ({"model": "a", "input": [49406, 320, 49407]}, 400, "token ids"),
    "wrong dimensions": ({"model": "a", "input": "x", "dimensions": 7}, 400, "dimensions=7"),
    "a url": ({"model": "a", "input": [{"image": "http://169.254.169.254/latest"}]}, 400, "fetches nothing"),
    "texts, then a bad image": ({"model": "a", "input": ["x", "y", {"image": b64(b"not an image")}]}, 400,
                                "input[2]"),
    "unknown key": ({"model": "a", "input": [{"image": b64(png((4, 4))), "url": "x"}]}, 400, "input"),
    "not json": (b"{this is not json", 400, "JSON"),
    "body too big": ({"model": "a", "input": ["x" * (2 * 1024 * 1024)]}, 413, "larger than"),
    "bad encoding format": ({"model": "a", "input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
}


def test_every_bad_request_is_a_4xx_in_openai_shape_and_the_next_good_one_works(sessions: dict[str, Any]) -> None:
    s = sessions["a"]
    want = s.encode_text(["a good request"])
    tiny = png((1, 1), 3)
    want_tiny = s.encode_image([tiny])

    async def main() -> None:
        app = create_app(config(sessions, max_body_mb=1.0), sessions)
        async with client_for(app) as c:
            for name, (body, status, word) in BAD.items():
                if isinstance(body, bytes):
                    r = await c.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
                else:
                    r = await c.post("/v1/embeddings", json=body)
                assert r.status_code == status, f"{name}: {r.status_code} {r.text[:300]}"
                err = r.json()["error"]
                assert set(err) == {"message", "type", "param", "code"}, f"{name}: {err}"
                assert word.lower() in err["message"].lower(), f"{name}: {err['message']!r} lacks {word!r}"
                good = await c.post("/v1/embeddings", json={"model": "a", "input": "a good request"})
                assert good.status_code == 200, f"after {name}: {good.text}"
                for tower, b in app.state.clipdeploy.models["a"].batchers.items():
                    assert b.queued == 0 and b.depth == 0, f"after {name}: {tower} holds {b.queued}/{b.depth}"
                assert_rows_equal(rows(good), want, f"after {name}")
                assert (await c.get("/ready")).status_code == 200, f"/ready after {name}"
            # a 1x1 image is a valid image (it broke other servers): it embeds like the session embeds it
            r = await c.post("/v1/embeddings", json={"model": "a", "input": [{"image": b64(tiny)}]})
            assert r.status_code == 200, r.text
            assert_rows_equal(rows(r), want_tiny, "1x1 image")

    asyncio.run(main())


def test_a_full_queue_answers_503_with_retry_after_and_nothing_hangs(sessions: dict[str, Any]) -> None:
    slow = {"a": SlowSession(sessions["a"], delay=0.2)}
    cfg = config(slow, max_batch=2, max_wait_ms=0, max_queue=4, max_items=4)

    async def main() -> None:
        app = create_app(cfg, slow)
        async with client_for(app) as c:
            batcher = app.state.clipdeploy.models["a"].batchers["text"]
            deepest = 0

            async def watch() -> None:
                nonlocal deepest
                while True:
                    deepest = max(deepest, batcher.depth)
                    await asyncio.sleep(0.005)

            watcher = asyncio.get_running_loop().create_task(watch())
            sends = [c.post("/v1/embeddings", json={"model": "a", "input": [f"text {k}", "x"]}) for k in range(12)]
            responses = await asyncio.wait_for(asyncio.gather(*sends), timeout=60)
            watcher.cancel()
            codes = [r.status_code for r in responses]
            assert set(codes) <= {200, 503}, codes
            assert codes.count(503) >= 1 and codes.count(200) >= 2, codes
            for r in responses:
                if r.status_code == 503:
                    assert r.headers.get("retry-after") == "1"
                    assert r.json()["error"]["code"] == "queue_full"
            assert deepest <= 4, f"{deepest} items admitted, more than --max-queue 4"
            # once the load is gone, the server answers again
            r = await c.post("/v1/embeddings", json={"model": "a", "input": "after the storm"})
            assert r.status_code == 200, r.text

    asyncio.run(main())


def test_api_key_missing_wrong_right_and_open_paths(sessions: dict[str, Any]) -> None:
    async def main(open_metrics: bool) -> None:
        cfg = config(sessions, open_metrics=open_metrics, api_key="s3cret-key")
        app = create_app(cfg, sessions)
        async with client_for(app) as c:
            body = {"model": "a", "input": "x"}
            r = await c.post("/v1/embeddings", json=body)
            assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
            r = await c.post("/v1/embeddings", json=body, headers={"Authorization": "Bearer s3cret-kez"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            r = await c.post("/v1/embeddings", json=body, headers={"Authorization": "Bearer s3cret-key"})
            assert r.status_code == 200, r.text
            assert (await c.get("/health")).status_code == 200
            assert (await c.get("/ready")).status_code == 200
            assert (await c.get("/v1/models")).status_code == 401
            assert (await c.get("/metrics")).status_code == (200 if open_metrics else 401)

    asyncio.run(main(False))
    asyncio.run(main(True))


def test_api_key_from_the_environment(sessions: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPDEPLOY_API_KEY", "from-env")

    async def main() -> None:
        async with client_for(create_app(config(sessions), sessions)) as c:
            assert (await c.post("/v1/embeddings", json={"model": "a", "input": "x"})).status_code == 401
            r = await c.post("/v1/embeddings", json={"model": "a", "input": "x"},
                             headers={"Authorization": "Bearer from-env"})  # fmt: skip
            assert r.status_code == 200

    asyncio.run(main())


def test_ready_is_503_until_every_model_warmed_up(sessions: dict[str, Any]) -> None:
    release = threading.Event()

    def load(cfg: Any, name: str, path: Any) -> Any:
        release.wait(30)
        return sessions[name]

    async def main() -> None:
        app = create_app(config(sessions), None, loader=load)
        async with client_for(app, wait_ready=False) as c:
            await asyncio.sleep(0.1)
            assert (await c.get("/health")).status_code == 200
            r = await c.get("/ready")
            assert r.status_code == 503 and "warming up" in r.json()["reason"]
            r = await c.post("/v1/embeddings", json={"model": "a", "input": "x"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading", r.text
            release.set()
            for _ in range(400):
                if (await c.get("/ready")).status_code == 200:
                    break
                await asyncio.sleep(0.05)
            assert (await c.get("/ready")).status_code == 200
            models = (await c.get("/v1/models")).json()["data"]
            assert [m["id"] for m in models] == ["a", "b"]
            assert all(m["ready"] and m["dimensions"] == sessions[m["id"]].embed_dim for m in models)
            assert models[0]["variants"] == {t: f"{v.precision} {v.format}" for t, v in sessions["a"].variants.items()}
            lengths = {m["id"]: ArtifactView.read(sessions[m["id"]].root).context_length for m in models}
            assert all(m["context_length"] == lengths[m["id"]] > 0 for m in models), (models, lengths)

    asyncio.run(main())


def test_metrics_parse_and_count_the_requests_sent(sessions: dict[str, Any]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    async def main() -> str:
        async with client_for(create_app(config(sessions), sessions)) as c:
            for _ in range(3):
                assert (await c.post("/v1/embeddings", json={"model": "a", "input": ["x", "y"]})).status_code == 200
            for _ in range(2):
                assert (await c.post("/v1/embeddings", json={"model": "zz", "input": "x"})).status_code == 404
            return (await c.get("/metrics")).text

    text = asyncio.run(main())
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}  # fmt: skip
    assert samples[("clipdeploy_requests_total", (("route", "/v1/embeddings"), ("status", "200")))] == 3
    assert samples[("clipdeploy_requests_total", (("route", "/v1/embeddings"), ("status", "404")))] == 2
    # 6 texts from the requests, plus the warm-up's one per model
    assert samples[("clipdeploy_items_embedded_total", (("model", "a"), ("tower", "text")))] == 6 + 1
    assert samples[("clipdeploy_request_seconds_count", (("route", "/v1/embeddings"),))] == 5
    assert ("clipdeploy_queue_depth", (("model", "a"), ("tower", "image"))) in samples


def test_classify_matches_session_similarity_and_caches_labels(sessions: dict[str, Any]) -> None:
    s = sessions["a"]
    image = jpeg((200, 150), 11)
    labels = ["red", "green", "blue"]
    want = s.similarity(s.encode_image([image]), s.encode_text([f"a photo of a {x}." for x in labels]))[0]

    async def main() -> None:
        app = create_app(config(sessions), sessions)
        async with client_for(app) as c:
            body = {"model": "a", "image": b64(image), "labels": labels, "template": "a photo of a {}."}
            first = await c.post("/v1/classify", json=body)
            again = await c.post("/v1/classify", json=body)
            for r in (first, again):
                assert r.status_code == 200, r.text
                got = np.array([d["score"] for d in r.json()["data"]])
                np.testing.assert_allclose(got, want, atol=1e-5)
                assert r.json()["label"] == labels[int(np.argmax(want))]
                assert abs(got.sum() - 1) < 1e-5, "CLIP scores are a softmax over the labels"
            assert first.json()["usage"]["prompt_tokens"] > 0 and again.json()["usage"]["prompt_tokens"] == 0, \
                "the second call reuses the cached label embeddings"
            odd = await c.post("/v1/classify", content=json.dumps({**body, "labels": ["\ud800 lone surrogate", "é"]}),
                               headers={"content-type": "application/json"})  # valid JSON; httpx's json= refuses it
            assert odd.status_code == 200, odd.text  # any string a client sends comes back (escaped)
            assert [d["label"] for d in odd.json()["data"]] == ["\ud800 lone surrogate", "é"]
            bad = await c.post("/v1/classify", json={**body, "template": "no slot"})
            assert bad.status_code == 400 and "{}" in bad.json()["error"]["message"]
            bad = await c.post("/v1/classify", json={**body, "labels": []})
            assert bad.status_code == 400

    asyncio.run(main())


def test_config_refusals_are_one_line(tmp_path: Any, sessions: dict[str, Any]) -> None:
    from clipdeploy.errors import UsageError
    from clipdeploy.serve.config import ServeConfig, parse_model_args

    root = sessions["a"].root
    assert parse_model_args([str(root), f"other={root}"]) == [(root.resolve().name, root), ("other", root)]
    with pytest.raises(UsageError, match="two artifacts are served as 'x'"):
        ServeConfig(models=[("x", root), ("x", root)]).check()
    with pytest.raises(UsageError, match="not an artifact directory"):
        ServeConfig(models=[("x", tmp_path)]).check()
    with pytest.raises(UsageError, match="smaller than --max-items"):
        ServeConfig(models=[("x", root)], max_queue=8, max_items=16).check()
    empty = tmp_path / "key"
    empty.write_text("\n")
    with pytest.raises(UsageError, match="is empty"):
        ServeConfig(models=[("x", root)], api_key_file=empty).resolve_api_key()
    with pytest.raises(UsageError, match="cannot be read"):
        ServeConfig(models=[("x", root)], api_key_file=tmp_path / "missing").resolve_api_key()


def test_request_bodies_held_at_once_are_bounded_503_past_the_budget(sessions: dict[str, Any]) -> None:
    slow = {"a": SlowSession(sessions["a"], delay=0.0)}
    cfg = config(slow, max_body_mb=1.0, max_inflight_mb=1.0, max_wait_ms=0)
    big = "a cat " + "x" * 600_000  # about 0.6 MB: two of them do not fit a 1 MB budget

    async def main() -> None:
        app = create_app(cfg, slow)
        async with client_for(app) as c:
            slow["a"].delay = 1.0
            first = asyncio.get_running_loop().create_task(c.post("/v1/embeddings", json={"model": "a", "input": big}))
            await asyncio.sleep(0.3)  # the first body is held while its inference runs
            second = await c.post("/v1/embeddings", json={"model": "a", "input": big})
            assert second.status_code == 503, second.text
            assert second.headers.get("retry-after") == "1" and "max-inflight-mb" in second.json()["error"]["message"]
            small = await c.post("/v1/embeddings", json={"model": "a", "input": "small"})
            assert small.status_code == 200, "a small body still fits beside the held one"
            assert (await first).status_code == 200
            slow["a"].delay = 0.0
            again = await c.post("/v1/embeddings", json={"model": "a", "input": big})
            assert again.status_code == 200, "the budget is given back when a request ends"

    asyncio.run(main())
