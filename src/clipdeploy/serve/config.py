"""What `clipdeploy serve` takes: one dataclass, so the CLI's defaults and the API's are the same."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from clipdeploy.errors import UsageError
from clipdeploy.options import THREADS, integer, number, opt
from clipdeploy.runtime.backends import registry as backends

API_KEY_ENV = "CLIPDEPLOY_API_KEY"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")


@dataclass
class ServeConfig:
    """Everything `clipdeploy serve` takes. CLI, API (``create_app``) and Ray Serve resolve through this."""

    # (served name, artifact directory), in the order given; the name is the directory's name or NAME= given
    models: list[tuple[str, Path]]
    host: str = field(default="127.0.0.1", metadata=opt("address to bind; 0.0.0.0 serves other machines"))
    port: int = field(default=8080, metadata=opt("port to bind", parse=integer(0)))
    backend: str = field(default=backends.AUTO, metadata=opt("inference backend", choices=backends.choices))
    precision: str | None = field(
        default=None, metadata=opt("variant to run", metavar="P", default_text="the fastest accepted one")
    )
    threads: int | None = field(default=None, metadata=THREADS)
    max_batch: int = field(default=32, metadata=opt("most items one inference call takes", parse=integer(1)))
    max_wait_ms: float = field(
        default=5.0,
        metadata=opt("how long a batch waits for more items after its first", metavar="MS",
                     parse=number(0, 10_000, unit="milliseconds")),
    )
    max_queue: int = field(
        default=512,
        metadata=opt("items admitted per model and tower (decoding, queued or running); "
                     "past it requests get 503 with Retry-After", parse=integer(1)),
    )  # fmt: skip
    max_items: int = field(default=256, metadata=opt("most inputs in one request", parse=integer(1)))
    max_body_mb: float = field(
        default=32.0, metadata=opt("largest request body accepted, in MB (413 past it)", metavar="MB",
                                   parse=number(0, unit="MB", above=True))
    )  # fmt: skip
    max_inflight_mb: float = field(
        default=1024.0, metadata=opt("request bodies held at once, in MB; past it new requests get 503 "
                                     "with Retry-After (memory stays bounded)", metavar="MB",
                                     parse=number(0, unit="MB", above=True))
    )  # fmt: skip
    max_image_pixels: int = field(
        default=40_000_000,
        metadata=opt("largest image accepted, width x height (413 past it, checked before decoding)",
                     parse=integer(1)),
    )  # fmt: skip
    decode_workers: int = field(
        default=min(4, os.cpu_count() or 1),
        metadata=opt("threads decoding and preprocessing images before batching", parse=integer(1),
                     default_text="min(4, cores)"),
    )  # fmt: skip
    api_key_file: Path | None = field(
        default=None,
        metadata=opt(f"require 'Authorization: Bearer KEY' with the key in this file (or in ${API_KEY_ENV}); "
                     "/health stays open", metavar="FILE"),
    )  # fmt: skip
    open_metrics: bool = field(default=False, metadata=opt("serve /metrics without the API key"))
    graceful_timeout: float = field(
        default=30.0,
        metadata=opt("on SIGTERM, how long in-flight requests may take to finish", metavar="S",
                     parse=number(0, unit="seconds")),
    )
    label_cache: int = field(
        default=256, metadata=opt("label sets whose text embeddings /v1/classify keeps, per model", parse=integer(0))
    )
    # --ray takes an optional value (no value: start a local Ray): the command adds the option itself.
    ray: str | None = None  # None: this process; "local": start a local Ray; else an address or "auto"
    replicas: int = field(default=1, metadata=opt("Ray Serve replicas (with --ray)", parse=integer(1)))
    api_key: str | None = field(default=None, repr=False)  # resolved from api_key_file or the environment

    def check(self) -> None:
        """One line for a value no server can use (the CLI's parse functions catch most first)."""
        if not self.models:
            raise UsageError("no ARTIFACT given; pass at least one artifact directory (or NAME=DIR)")
        seen: set[str] = set()
        for name, path in self.models:
            if not _NAME.fullmatch(name):
                raise UsageError(f"model name {name!r} is not usable; use letters, digits and . _ : / - (NAME=DIR)")
            if name in seen:
                raise UsageError(f"two artifacts are served as {name!r}; give one a name of its own with NAME=DIR")
            seen.add(name)
            if not (Path(path) / "manifest.json").is_file():
                raise UsageError(f"{str(path)!r} is not an artifact directory (no manifest.json); "
                                 "pass one `clipdeploy export` made")
        for name in ("max_batch", "max_queue", "max_items", "max_image_pixels", "decode_workers", "replicas"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UsageError(f"--{name.replace('_', '-')} {value!r} must be a whole number of 1 or more")
        if self.ray is None and self.replicas != 1:
            raise UsageError(f"--replicas {self.replicas} needs --ray: replicas run on Ray Serve (--ray alone starts a "
                             "local Ray, --ray ADDRESS joins a cluster); without it one process serves")  # fmt: skip
        if self.max_queue < self.max_items:
            raise UsageError(f"--max-queue {self.max_queue} is smaller than --max-items {self.max_items}: "
                             "a full-size request could never be admitted; raise --max-queue")
        if not self.max_body_mb > 0:
            raise UsageError(f"--max-body-mb {self.max_body_mb!r} must be more than 0")
        if not self.max_inflight_mb >= self.max_body_mb:
            raise UsageError(f"--max-inflight-mb {self.max_inflight_mb!r} is smaller than --max-body-mb "
                             f"{self.max_body_mb!r}: a full-size body could never be admitted; raise it")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def max_inflight_bytes(self) -> int:
        return int(self.max_inflight_mb * 1024 * 1024)

    def resolve_api_key(self) -> str | None:
        """The key from --api-key-file, else $CLIPDEPLOY_API_KEY, else None (no auth); one line if unreadable."""
        if self.api_key_file is not None:
            try:
                key = Path(self.api_key_file).read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as e:
                raise UsageError(f"--api-key-file {str(self.api_key_file)!r} cannot be read ({e.__class__.__name__}: "
                                 f"{e}); pass a readable text file holding the key") from None
            if not key:
                raise UsageError(f"--api-key-file {str(self.api_key_file)!r} is empty; put the key in it")
            return key
        return os.environ.get(API_KEY_ENV) or None


def parse_model_args(values: list[str]) -> list[tuple[str, Path]]:
    """``DIR`` or ``NAME=DIR`` -> (name, path); the name defaults to the directory's own name."""
    models = []
    for value in values:
        name, sep, path = value.partition("=")
        if sep and name and not os.path.exists(value):
            models.append((name, Path(path)))
        else:
            p = Path(value)
            models.append((p.resolve().name or str(p), p))
    return models
