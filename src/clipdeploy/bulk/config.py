"""What `clipdeploy embed-dataset` takes: one dataclass, so the CLI's defaults and the API's are the same."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from clipdeploy.errors import UsageError
from clipdeploy.options import THREADS, integer, opt
from clipdeploy.runtime.backends import registry as backends


@dataclass
class EmbedDatasetConfig:
    """Everything `clipdeploy embed-dataset` takes. CLI and API both resolve through this."""

    artifact: Path  # an artifact directory made by `clipdeploy export`
    sources: list[str]  # folders, .tar shards, parquet/CSV files, text files (globs and braces expanded)
    output: Path  # OUT: the parquet shards and the run's records
    texts: bool = field(
        default=False, metadata=opt("embed text: a text file (one caption a line) or a parquet/CSV text column")
    )
    column: str | None = field(
        default=None,
        metadata=opt("the parquet/CSV column with image paths or, with --texts, texts", metavar="NAME",
                     default_text="path, or text with --texts"),
    )  # fmt: skip
    batch_size: int = field(default=32, metadata=opt("items per inference call", parse=integer(1)))
    shard_size: int = field(default=10000, metadata=opt("items per output shard (the unit of resume)", parse=integer(1)))
    workers: int = field(default=1, metadata=opt("local processes, or Ray actors with --ray", parse=integer(1)))
    # --ray takes an optional value (no value: start a local Ray), which opt() has no spelling for: the
    # command adds the option itself, with no default of its own.
    ray: str | None = None  # None: local processes; "local": start a local Ray; else an address or "auto"
    max_errors: int = field(
        default=0,
        metadata=opt("exit 1 when more than N items could not be read, else 0 (they are always listed)",
                     metavar="N", parse=integer(0)),
    )  # fmt: skip
    backend: str = field(default=backends.AUTO, metadata=opt("inference backend", choices=backends.choices))
    precision: str | None = field(
        default=None, metadata=opt("variant to run", metavar="P", default_text="the fastest accepted one")
    )
    fast_decode: bool = field(
        default=False, metadata=opt("decode JPEGs of 2x the model's input size or more at 1/2, 1/4 or 1/8 scale "
                                    "(faster, approximate pixels)")
    )  # fmt: skip
    threads: int | None = field(default=None, metadata=THREADS)

    def check(self) -> None:
        """One line for a value no run can use (the CLI's parse functions catch these first)."""
        for name, least in (("batch_size", 1), ("shard_size", 1), ("workers", 1), ("max_errors", 0), ("threads", 1)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < least):
                raise UsageError(f"--{name.replace('_', '-')} {value!r} must be a whole number of {least} or more")
        if not self.sources:
            raise UsageError("no SOURCE given; pass image folders, .tar shards, or parquet/CSV files")
