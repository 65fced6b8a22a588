"""The embedding server's app: ``create_app(cfg)`` builds one FastAPI object that tests drive in-process,
uvicorn serves, and Ray Serve replicates unchanged.

Routes: POST /v1/embeddings (OpenAI-compatible, texts and images), POST /v1/classify (zero-shot),
GET /v1/models, /health (liveness), /ready (a warm-up inference worked on every model, not draining),
/metrics (Prometheus). Every error is OpenAI's shape; a bad request never stops the server.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import functools
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import numpy as np

from clipdeploy.deps import require
from clipdeploy.errors import ClipDeployError
from clipdeploy.runtime.session import load
from clipdeploy.serve.batcher import QueueFullError
from clipdeploy.serve.config import ServeConfig
from clipdeploy.serve.errors import APIError, bad_request, error_body, overloaded
from clipdeploy.serve.inputs import Item, decode_base64, decode_image, split_input
from clipdeploy.serve.metrics import Metrics
from clipdeploy.serve.models import ServedModel, decode_pool
from clipdeploy.serve.schemas import (  # pydantic: this module is imported only when serving
    ClassifyRequest,
    ClassifyResponse,
    EmbeddingsRequest,
    EmbeddingsResponse,
    ImageInput,
)

log = logging.getLogger("clipdeploy.serve")

# Paths with their own metrics label; anything else is counted as "other" (no unbounded label values).
ROUTES = ("/v1/embeddings", "/embeddings", "/v1/classify", "/v1/models", "/health", "/ready", "/metrics",
          "/docs", "/openapi.json")  # fmt: skip
# Open without the API key: liveness and readiness (probes send no key), and the API's description.
OPEN_PATHS = ("/health", "/ready", "/docs", "/openapi.json", "/docs/oauth2-redirect")


class ServerState:
    """What the routes share: the config, the models once loaded, the decode pool, readiness."""

    def __init__(self, cfg: ServeConfig, metrics: Metrics) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.models: dict[str, ServedModel] = {}
        self.names = [name for name, _ in cfg.models]
        self.pool: Any = None
        self.draining = False
        self.failed: str | None = None  # why loading or warming a model failed

    @property
    def ready(self) -> bool:
        return (not self.draining and self.failed is None and len(self.models) == len(self.names)
                and all(m.warm for m in self.models.values()))  # fmt: skip

    def model(self, name: str) -> ServedModel:
        if name not in self.names:
            raise APIError(404, f"model {name!r} is not served here; served: {', '.join(self.names)}",
                           param="model", code="model_not_found")  # fmt: skip
        served = self.models.get(name)
        if served is None or not served.warm:
            raise APIError(503, f"model {name!r} is still loading; retry shortly", type="server_unavailable",
                           code="model_loading", headers={"Retry-After": "2"})  # fmt: skip
        return served


def create_app(
    cfg: ServeConfig,
    sessions: Mapping[str, Any] | None = None,
    *,
    loader: Callable[[ServeConfig, str, Any], Any] | None = None,
    wait_ready: bool = False,
) -> Any:
    """The FastAPI app serving ``cfg.models``.

    ``sessions`` (name -> ClipSession), when given, are served as they are; otherwise each artifact is
    loaded in the background when the app starts (``/health`` answers meanwhile, ``/ready`` says 503).
    ``loader(cfg, name, path)`` replaces ``load_session`` for that (tests, Ray replicas).
    ``wait_ready``: the app's startup returns only once every model is warm, and fails if one cannot load
    (Ray Serve routes to a replica only after its startup, and restarts one whose startup failed).
    """
    fastapi = require("fastapi", "serve")
    responses = require("fastapi.responses", "serve")
    api_key = cfg.api_key if cfg.api_key is not None else cfg.resolve_api_key()
    state = ServerState(cfg, Metrics())

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        state.pool = decode_pool(cfg)
        warming = asyncio.get_running_loop().create_task(_load_and_warm(state, sessions, loader))
        try:
            if wait_ready:
                await warming
                if state.failed is not None:
                    raise RuntimeError(state.failed)
            yield
        finally:
            state.draining = True
            warming.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await warming
            for served in state.models.values():
                await served.stop()
            state.pool.shutdown(wait=False, cancel_futures=True)

    app = fastapi.FastAPI(
        title="clipdeploy serve",
        description="OpenCLIP image and text embeddings: OpenAI-compatible /v1/embeddings, zero-shot /v1/classify.",
        lifespan=lifespan,
    )
    app.state.clipdeploy = state

    # ---- errors: one shape -----------------------------------------------------------------------

    @app.exception_handler(APIError)
    async def _api_error(request: Any, e: APIError) -> Any:
        return responses.JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    exceptions = require("fastapi.exceptions", "serve")

    @app.exception_handler(exceptions.RequestValidationError)
    async def _invalid(request: Any, e: Any) -> Any:
        errors = e.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid value")
        if first.get("type") == "json_invalid":
            message = "the request body is not valid JSON; send a JSON object"
        else:
            message = f"{param or 'body'}: {msg}" + (f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else "")
        return responses.JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(request: Any, e: Exception) -> Any:
        log.exception("clipdeploy serve: %s %s failed", request.method, request.url.path)
        return responses.JSONResponse(
            error_body(f"internal error ({type(e).__name__}); the server keeps serving", "server_error"),
            status_code=500,
        )

    starlette_exc = require("starlette.exceptions", "serve")

    @app.exception_handler(starlette_exc.HTTPException)
    async def _http(request: Any, e: Any) -> Any:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return responses.JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code,
                                      headers=getattr(e, "headers", None))  # fmt: skip

    # ---- routes ----------------------------------------------------------------------------------

    @app.post("/v1/embeddings", response_model=EmbeddingsResponse)
    async def embeddings(req: EmbeddingsRequest) -> Any:
        """Embeddings for texts and images, in input order, L2-normalized float32."""
        served = state.model(req.model)
        if req.dimensions is not None and req.dimensions != served.dimensions:
            raise bad_request(f"dimensions={req.dimensions}, but {req.model} embeds to {served.dimensions} "
                              "dimensions and does not shorten them; leave dimensions out",
                              param="dimensions", code="unsupported_dimensions")  # fmt: skip
        raw = req.input.model_dump() if isinstance(req.input, ImageInput) else req.input
        if isinstance(raw, list):
            raw = [x.model_dump() if isinstance(x, ImageInput) else x for x in raw]
        loop = asyncio.get_running_loop()
        listed = raw if isinstance(raw, list) else [raw]
        has_images = req.modality == "image" or any(isinstance(x, dict) for x in listed)
        if has_images:  # base64 of megabytes decodes off the event loop
            items = await loop.run_in_executor(state.pool, split_input, raw, req.modality, cfg.max_items)
        else:
            items = split_input(raw, req.modality, cfg.max_items)
        rows, tokens = await _embed(state, served, items)
        # A response as it stands: the shape is EmbeddingsResponse (for /docs), and re-validating 512-float
        # rows through pydantic on every request costs more than the text tower's inference.
        build = functools.partial(_embeddings_body, rows, req.encoding_format, req.model, tokens)
        if len(rows) > 16:  # a large body is built off the event loop
            return await loop.run_in_executor(state.pool, build)
        return build()

    app.post("/embeddings", include_in_schema=False)(embeddings)  # the path infinity's clients call

    @app.post("/v1/classify", response_model=ClassifyResponse)
    async def classify(req: ClassifyRequest) -> Any:
        """Zero-shot: one image against labels, scored by the model's own logit scale (softmax; sigmoid for SigLIP)."""
        served = state.model(req.model)
        if len(req.labels) > cfg.max_items:
            raise bad_request(f"'labels' has {len(req.labels)} items, more than this server's limit of "
                              f"{cfg.max_items}", param="labels", code="too_many_items")  # fmt: skip
        template = req.template
        if template is not None and "{}" not in template:
            raise bad_request(f"template {template!r} has no '{{}}' for the label; e.g. 'a photo of a {{}}.'",
                              param="template")  # fmt: skip
        prompts = [label if template is None else template.replace("{}", label) for label in req.labels]
        # The cache keeps a digest, not the labels: a label may be megabytes, and 256 of them must not stay.
        key = hashlib.sha256(json.dumps([template, req.labels]).encode("ascii")).hexdigest()
        image = Item(0, image=decode_base64(req.image, 0, param="image"))
        text_emb = served.cached_labels(key)
        tokens = 0
        if text_emb is None:
            rows, tokens = await _embed(state, served, [Item(i, text=p) for i, p in enumerate(prompts)])
            text_emb = np.stack(rows)
            served.cache_labels(key, text_emb)
        (img_row,), _ = await _embed(state, served, [image], image_param="image")
        probs = served.session.similarity(img_row[None, :], text_emb)[0]
        best = int(np.argmax(probs))
        return _json({"object": "classification", "model": req.model, "label": req.labels[best],
                      "data": [{"label": lab, "score": float(p)} for lab, p in zip(req.labels, probs, strict=True)],
                      "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})  # fmt: skip

    @app.get("/v1/models")
    async def models() -> Any:
        """The served models: dimension, backend, variant per tower, readiness."""
        data = []
        for name in state.names:
            served = state.models.get(name)
            data.append(served.card() if served is not None else {"id": name, "object": "model", "ready": False})
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health() -> Any:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> Any:
        """Readiness: every model ran a warm-up inference on both towers, and the server is not draining."""
        if state.ready:
            return {"status": "ready", "models": state.names}
        why = ("draining" if state.draining else state.failed or
               "warming up: " + ", ".join(n for n in state.names if not (n in state.models and state.models[n].warm)))  # fmt: skip
        return responses.JSONResponse({"status": "not ready", "reason": why}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Any:
        """Prometheus text format."""
        body, content_type = state.metrics.render()
        return responses.Response(body, media_type=content_type)

    app.add_middleware(_Guard, state=state, api_key=api_key)
    return app


# ---- the work of one request ---------------------------------------------------------------------


async def _embed(
    state: ServerState, served: ServedModel, items: list[Item], image_param: str | None = None
) -> tuple[list[np.ndarray], int]:
    """Embed items (texts and images, in order) through the batchers; rows in the items' order, token count."""
    texts = [it for it in items if it.text is not None]
    images = [it for it in items if it.image is not None]
    loop = asyncio.get_running_loop()
    cfg = state.cfg
    with contextlib.ExitStack() as admitted:
        try:
            if texts:
                admitted.enter_context(served.batchers["text"].reserve(len(texts)))
            if images:
                admitted.enter_context(served.batchers["image"].reserve(len(images)))
        except QueueFullError as e:
            raise overloaded(f"{served.name} is at capacity ({e}); retry after a second") from None
        waits: list[Any] = []
        order: list[int] = []
        tokens = 0
        decoded: list[Any] = []
        try:
            if images:  # first: a bad image fails the request before any of its texts is queued
                pre = served.preprocessor
                decoded = await asyncio.gather(
                    *(loop.run_in_executor(state.pool, decode_image, pre, it.image, it.index, cfg.max_image_pixels,
                                           image_param) for it in images),
                    return_exceptions=True,
                )  # fmt: skip
                for result in decoded:  # the first bad item fails this request only
                    if isinstance(result, BaseException):
                        raise result
            if texts:
                batch = [t.text for t in texts]
                # A few texts tokenize in microseconds: a thread hop would cost more than it frees the loop.
                if len(batch) <= 8 and sum(len(t) for t in batch) <= 4096:
                    ids, counts = served.tokenize(batch)
                else:
                    ids, counts = await loop.run_in_executor(state.pool, served.tokenize, batch)
                tokens = sum(counts)
                waits += served.batchers["text"].submit(list(ids))
                order += [t.index for t in texts]
            if images:
                waits += served.batchers["image"].submit(decoded)
                order += [it.index for it in images]
            rows = await asyncio.gather(*waits)
        except ClipDeployError as e:
            raise APIError(500, f"inference failed: {e}", type="server_error", code="inference_failed") from e
        finally:
            # Cancelled or failed: nothing of this request stays queued once its admission ends.
            unfinished = [w for w in waits if not w.done()]
            for w in unfinished:
                w.cancel()
            if unfinished:
                for tower in ("text", "image"):
                    served.batchers[tower].drop_done()
    by_index = dict(zip(order, rows, strict=True))
    return [by_index[it.index] for it in items], tokens


def _embeddings_body(rows: list[np.ndarray], fmt: str, model: str, tokens: int) -> Any:
    data = [{"object": "embedding", "index": i, "embedding": _encode(row, fmt)} for i, row in enumerate(rows)]
    return _json({"object": "list", "data": data, "model": model,
                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})  # fmt: skip


def _json(content: Any) -> Any:
    """A JSON response with non-ASCII escaped, so any string a client sent (a lone surrogate too) comes back."""
    responses = require("fastapi.responses", "serve")
    return responses.Response(json.dumps(content).encode("ascii"), media_type="application/json")


def _encode(row: np.ndarray, fmt: str) -> Any:
    if fmt == "base64":
        return base64.b64encode(np.asarray(row, dtype="<f4").tobytes()).decode("ascii")
    return np.asarray(row, dtype=np.float32).tolist()


async def _load_and_warm(state: ServerState, sessions: Mapping[str, Any] | None, loader: Any) -> None:
    """Load (unless given) and warm every model, one after the other, off the event loop."""
    for name, path in state.cfg.models:
        try:
            if sessions is not None and name in sessions:
                session = sessions[name]
            else:
                session = await asyncio.to_thread((loader or load_session), state.cfg, name, path)
            served = ServedModel(name, session, state.cfg, state.metrics)
            served.start()
            state.models[name] = served
            await asyncio.to_thread(served.warm_up)
            log.info("clipdeploy serve: %s ready: %s", name, session.describe())
        except asyncio.CancelledError:
            raise
        except Exception as e:
            state.failed = f"model {name!r} failed to load or warm up: {e}"
            log.error("clipdeploy serve: %s", state.failed)
            return


def load_session(cfg: ServeConfig, name: str, path: Any) -> Any:
    """The session a served model runs: ``clipdeploy.load`` with the server's backend, precision and threads."""
    return load(path, backend=cfg.backend, precision=cfg.precision, intra_op_num_threads=cfg.threads)


# ---- limits, auth and metrics around every request (plain ASGI: no body is read twice) ------------


class _Guard:
    """Body-size limit, API key, and the request metrics, in front of the app."""

    def __init__(self, app: Any, state: ServerState, api_key: str | None) -> None:
        self.app = app
        self.state = state
        self.api_key = api_key.encode() if api_key else None
        self.body_bytes = 0  # bytes of request bodies held now (read, or being read): bounded by the budget

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = path if path in ROUTES else "other"
        start = time.perf_counter()
        status = {"code": 500}

        async def send_counted(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope, path)
            if refusal is not None:
                await _send_error(send_counted, refusal)
                return
            held = self._claim_body(scope)
            if held is None:
                await _send_error(send_counted, overloaded(
                    f"request bodies of {self.body_bytes} bytes are being handled, the most this server holds "
                    f"at once (--max-inflight-mb {self.state.cfg.max_inflight_mb:g}); retry after a second"))
                return
            try:
                receive_body, refusal = await self._read_body(scope, receive)
                if refusal is not None:
                    await _send_error(send_counted, refusal)
                    return
                await self.app(scope, receive_body, send_counted)
            finally:
                self.body_bytes -= held
        finally:
            m = self.state.metrics
            m.requests.labels(route, str(status["code"])).inc()
            m.latency.labels(route).observe(time.perf_counter() - start)

    def _claim_body(self, scope: dict[str, Any]) -> int | None:
        """Reserve room for this request's body in the in-flight budget (its length, or the limit when
        unknown); None when the budget is spent. One event loop: no lock needed."""
        if scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return 0
        declared = dict(scope.get("headers") or []).get(b"content-length")
        limit = self.state.cfg.max_body_bytes
        size = min(int(declared), limit) if declared is not None and declared.isdigit() else limit
        if self.body_bytes and self.body_bytes + size > self.state.cfg.max_inflight_bytes:
            return None
        self.body_bytes += size
        return size

    def _refusal(self, scope: dict[str, Any], path: str) -> APIError | None:
        if self.api_key is None or path in OPEN_PATHS or (path == "/metrics" and self.state.cfg.open_metrics):
            return None
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"")
        scheme, _, given = auth.partition(b" ")
        if scheme.lower() != b"bearer" or not given:
            return APIError(401, "missing API key; send 'Authorization: Bearer KEY'", type="authentication_error",
                            code="missing_api_key", headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        if not hmac.compare_digest(given.strip(), self.api_key):
            return APIError(401, "wrong API key", type="authentication_error", code="invalid_api_key",
                            headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        return None

    async def _read_body(self, scope: dict[str, Any], receive: Any) -> tuple[Any, APIError | None]:
        """The whole body, up to the limit, replayed to the app; a 413 past the limit."""
        limit = self.state.cfg.max_body_bytes
        too_big = APIError(413, f"the request body is larger than this server's limit of {limit} bytes "
                                f"({self.state.cfg.max_body_mb:g} MB); send fewer or smaller items",
                           code="request_too_large")  # fmt: skip
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return receive, too_big
        if scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return receive, None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return _replay([message]), None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return receive, too_big
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}], receive), None


def _replay(messages: list[dict[str, Any]], then: Any = None) -> Any:
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        if queue:
            return queue.pop(0)
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}

    return receive


async def _send_error(send: Any, e: APIError) -> None:
    body = json.dumps(e.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in e.headers.items()]
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
