"""The pipeline config: a YAML file of defaults and model entries, resolved into the stages' own configs.

```yaml
version: 1
output: ../artifacts/quickstart        # output root; relative paths start at this file
defaults:                              # merged under every model entry (mappings key by key)
  stages: [export, quantize, build, validate, bench]
  precisions: [fp16, int8]             # variants to make (quantize) and compile (build); fp32 is always exported
  export: {opset: 18}                  # ExportConfig fields
  quantize:                            # QuantizeConfig fields ...
    calib_images: [../photos]
    int8: {min_mean_cosine: 0.985}     # ... and per-precision overrides
  build: {batch: "1:8:64"}             # BuildConfig fields
  bench: {batches: [1, 8]}             # BenchConfig fields; timing: TimingConfig fields
models:
  - name: vit-b-32                     # directory and summary name (default: from model)
    model: ViT-B-32
    pretrained: openai                 # or checkpoint: FILE, model_config: FILE.json
```

Every section's keys are the fields of that stage's dataclass (ExportConfig, QuantizeConfig, BuildConfig,
BenchConfig), checked against their type hints; the defaults are the dataclasses' own. Each model
becomes a :class:`ModelPlan` holding those dataclasses, ready to run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipdeploy.benchmarks.bench import BenchConfig
from clipdeploy.engines.config import BuildConfig, parse_size
from clipdeploy.errors import UsageError
from clipdeploy.export.config import MIN_OPSET, ExportConfig
from clipdeploy.pipeline.schema import (
    ConfigError,
    Invalid,
    Origin,
    Problems,
    YList,
    YMap,
    coerce,
    field_names,
    load_yaml,
    merged,
    section_kwargs,
    unknown_key_message,
)
from clipdeploy.quantize.config import QuantizeConfig
from clipdeploy.precisions import names as precision_names
from clipdeploy.precisions import quantized as quantized_precisions

STAGES = ("export", "quantize", "build", "validate", "bench")
SCHEMA_VERSION = 1
ARTIFACT_DIR = "artifact"  # <output>/<model name>/artifact: the deployable artifact directory
BENCH_DIR = "bench"  # <output>/<model name>/bench: bench.json, bench.md, bench.png
_SECTIONS = ("export", "quantize", "build", "bench")
_MODEL_KEYS = ("name", "model", "pretrained", "checkpoint", "model_config", "stages", "precisions", *_SECTIONS)
_DEFAULT_KEYS = ("stages", "precisions", *_SECTIONS)
_TOP_KEYS = ("version", "output", "defaults", "models")
# Fields the pipeline sets itself, per stage dataclass; everything else is the YAML's to set.
_PIPELINE_SET = {
    "export": ("model", "output", "force", "pretrained", "checkpoint", "model_config"),
    "quantize": ("artifact", "precision", "force"),
    "build": ("artifact", "precision", "validate"),
    "bench": ("artifact", "output", "checkpoint"),
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class ModelPlan:
    """One model entry, resolved: the stage configs the pipeline runs, and where it was written."""

    name: str  # directory and summary name, unique in the file
    export: Any  # ExportConfig; output is <root>/<name>/artifact
    precisions: tuple[str, ...]  # variants to make and compile; fp32 comes from export
    stages: tuple[str, ...]  # stages this model runs, in pipeline order
    quantize: dict[str, Any] = field(default_factory=dict)  # precision -> QuantizeConfig (fp32 excluded)
    build: dict[str, Any] = field(default_factory=dict)  # precision -> BuildConfig
    bench: Any = None  # BenchConfig; output is <root>/<name>/bench
    line: int = 0  # line of the entry in the config file

    @property
    def artifact(self) -> Path:
        return Path(self.export.output)

    @property
    def root(self) -> Path:
        """<output>/<name>: the artifact, the bench reports and the stage state live here."""
        return self.artifact.parent


@dataclass
class PipelineConfig:
    """A whole pipeline file, resolved."""

    file: Path  # the YAML file
    output: Path  # output root
    models: list[ModelPlan]  # in file order


def _default_name(model: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", model.lower()).strip("-") or "model"


def _stage_config(
    cls: type, stage: str, kwargs: dict[str, Any], fixed: dict[str, Any], where: Origin, problems: Problems
) -> Any:
    """``cls(**fixed, **kwargs)``, with the dataclass's own checks; a refusal becomes a problem at ``where``."""
    try:
        cfg = cls(**fixed, **kwargs)
        check = getattr(cfg, "check", None)
        if callable(check):
            check()
        return cfg
    except UsageError as e:
        problems.add(where, str(e))
    except TypeError as e:  # a required field the YAML cannot set
        problems.add(where, f"{stage} settings are incomplete ({e})")
    return None


def _list_of(value: Any, choices: tuple[str, ...], origin: Origin, what: str, problems: Problems) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.add(origin, f"got {value!r}, expected a list of {what} from {', '.join(choices)}")
        return ()
    bad = [v for v in value if v not in choices]
    if bad:
        problems.add(origin, f"{bad[0]!r} is not one of {', '.join(choices)}")
        return ()
    if len(set(value)) != len(value):
        problems.add(origin, f"{value} lists a {what[:-1]} twice; list each once")
    return tuple(c for c in choices if c in value)


def _quantize_configs(
    entry: YMap, precisions: tuple[str, ...], artifact: Path, base_dir: Path, problems: Problems, origin: Origin
) -> dict[str, Any]:
    section = entry.get("quantize")
    if section is not None and not isinstance(section, YMap):
        problems.add(entry.at("quantize"), f"got {section!r}, expected a mapping of QuantizeConfig fields")
        return {}
    allowed = [f for f in field_names(QuantizeConfig) if f not in _PIPELINE_SET["quantize"]]
    common = section_kwargs(QuantizeConfig, section, allowed, base_dir, problems, skip=quantized_precisions())
    out = {}
    for precision in quantized_precisions():
        sub = section.get(precision) if section is not None else None
        if sub is not None and not isinstance(sub, YMap):
            problems.add(
                section.at(precision), f"got {sub!r}, expected a mapping of QuantizeConfig fields for {precision}"
            )
            continue
        if precision not in precisions:
            continue
        kwargs = {**common, **section_kwargs(QuantizeConfig, sub, allowed, base_dir, problems)}
        where = section.at(precision) if sub is not None else entry.at("quantize") if section is not None else origin
        cfg = _stage_config(
            QuantizeConfig,
            "quantize",
            kwargs,
            {"artifact": artifact, "precision": precision, "force": True},
            where,
            problems,
        )
        if cfg is not None and not cfg.calib_images:
            problems.add(
                where,
                f"quantize {precision} needs real calibration images: set quantize.calib_images to folders or .tar "
                "shards of photos like the ones you will embed",
            )
        out[precision] = cfg
    return out


def _resolve_model(
    index: int, entry: Any, defaults: YMap | None, root: Path, base_dir: Path, problems: Problems
) -> ModelPlan | None:
    here = Origin(entry.origin.line if isinstance(entry, (YMap, YList)) else 0, f"models[{index}]")
    if not isinstance(entry, YMap):
        problems.add(here, f"got {entry!r}, expected a mapping with at least `model:`")
        return None
    for key in entry:
        if key not in _MODEL_KEYS:
            problems.add(entry.at(key), unknown_key_message(key, _MODEL_KEYS))
    if "model" not in entry:
        problems.add(here, "missing `model:`, the open_clip architecture (e.g. ViT-B-32)")
        return None
    m = merged(defaults, entry, entry.origin)
    try:
        model = coerce(m["model"], str, base_dir)
        name = coerce(m.get("name", _default_name(model)), str, base_dir)
        pretrained = coerce(m.get("pretrained"), str | None, base_dir)  # type: ignore[arg-type]
        checkpoint = coerce(m.get("checkpoint"), Path | None, base_dir)  # type: ignore[arg-type]
        model_config = coerce(m.get("model_config"), Path | None, base_dir)  # type: ignore[arg-type]
    except Invalid as e:
        problems.add(here, str(e))
        return None
    if not _NAME.match(name):
        problems.add(m.at("name"), f"name {name!r} must be letters, digits, '.', '_' or '-' (it names a directory)")
    if pretrained and checkpoint:
        problems.add(m.at("checkpoint"), "both pretrained and checkpoint are set; keep one source of weights")
    stages = _list_of(m.get("stages", list(STAGES)), STAGES, m.at("stages"), "stages", problems)
    precisions = _list_of(m.get("precisions", []), precision_names(), m.at("precisions"), "precisions", problems)
    for key in _SECTIONS:
        if key in m and m[key] is not None and not isinstance(m[key], YMap):
            problems.add(m.at(key), f"got {m[key]!r}, expected a mapping of settings")
    section = {k: (m[k] if isinstance(m.get(k), YMap) else None) for k in _SECTIONS}
    artifact = root / name / ARTIFACT_DIR

    allowed = [f for f in field_names(ExportConfig) if f not in _PIPELINE_SET["export"]]
    export = _stage_config(
        ExportConfig,
        "export",
        section_kwargs(ExportConfig, section["export"], allowed, base_dir, problems),
        {
            "model": model,
            "output": artifact,
            "force": True,
            "pretrained": pretrained,
            "checkpoint": checkpoint,
            "model_config": model_config,
        },
        m.at("export") if section["export"] is not None else here,
        problems,
    )
    if export is not None and export.opset < MIN_OPSET:
        where = section["export"].at("opset") if section["export"] is not None else here
        problems.add(where, f"opset {export.opset} is too old: LayerNormalization needs opset {MIN_OPSET} or higher")
    quantize = _quantize_configs(m, precisions, artifact, base_dir, problems, here)

    allowed = [f for f in field_names(BuildConfig) if f not in _PIPELINE_SET["build"]]
    build_kwargs = section_kwargs(
        BuildConfig, section["build"], allowed, base_dir, problems, special={"workspace": parse_size}
    )
    build_where = m.at("build") if section["build"] is not None else here
    build = {
        p: _stage_config(
            BuildConfig,
            "build",
            build_kwargs,
            {"artifact": artifact, "precision": p, "validate": False},
            build_where,
            problems,
        )
        for p in precisions
    }

    allowed = [f for f in field_names(BenchConfig) if f not in _PIPELINE_SET["bench"]]
    bench = _stage_config(
        BenchConfig,
        "bench",
        section_kwargs(BenchConfig, section["bench"], allowed, base_dir, problems),
        {"artifact": artifact, "output": root / name / BENCH_DIR, "checkpoint": checkpoint},
        m.at("bench") if section["bench"] is not None else here,
        problems,
    )
    return ModelPlan(
        name=name,
        export=export,
        precisions=precisions,
        stages=stages,
        quantize=quantize,
        build=build,
        bench=bench,
        line=here.line,
    )


def load_config(file: str | Path, output: str | Path | None = None) -> PipelineConfig:
    """Read, check and resolve a pipeline file; every schema problem is reported at once (ConfigError)."""
    file = Path(file)
    doc = load_yaml(file)
    problems = Problems(file)
    base_dir = file.resolve().parent
    for key in doc:
        if key not in _TOP_KEYS:
            problems.add(doc.at(key), unknown_key_message(key, _TOP_KEYS))
    version = doc.get("version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        problems.add(
            doc.at("version"), f"version {version!r} is not supported; this clipdeploy reads version {SCHEMA_VERSION}"
        )
    if output is not None:
        root = Path(output).resolve()
    elif "output" in doc:
        try:
            root = coerce(doc["output"], Path, base_dir)
        except Invalid as e:
            problems.add(doc.at("output"), str(e))
            root = base_dir
    else:
        problems.add(doc.origin, "no output root: set `output: DIR` in the file or pass --output DIR")
        root = base_dir
    defaults = doc.get("defaults")
    if defaults is not None and not isinstance(defaults, YMap):
        problems.add(doc.at("defaults"), f"got {defaults!r}, expected a mapping")
        defaults = None
    if defaults is not None:
        for key in defaults:
            if key not in _DEFAULT_KEYS:
                problems.add(defaults.at(key), unknown_key_message(key, _DEFAULT_KEYS))
        defaults = YMap(defaults.origin) if not defaults else _only(defaults, _DEFAULT_KEYS)
    entries = doc.get("models")
    models: list[ModelPlan] = []
    if not isinstance(entries, YList) or not entries:
        problems.add(doc.at("models"), "`models:` must be a list with at least one entry (`- model: ViT-B-32`)")
    else:
        for i, entry in enumerate(entries):
            plan = _resolve_model(i, entry, defaults, root, base_dir, problems)
            if plan is not None:
                models.append(plan)
        seen: dict[str, int] = {}
        for i, plan in enumerate(models):
            if plan.name in seen:
                problems.add(
                    Origin(plan.line, f"models[{i}]"),
                    f"name {plan.name!r} is also used at line {seen[plan.name]}; give each entry its own `name:`",
                )
            seen.setdefault(plan.name, plan.line)
    if problems.items:
        raise ConfigError(problems.items)
    return PipelineConfig(file=file, output=root, models=models)


def _only(m: YMap, keys: tuple[str, ...]) -> YMap:
    out = YMap(m.origin)
    for k in keys:
        if k in m:
            out[k] = m[k]
            out.origins[k] = m.at(k)
    return out


__all__ = ["ConfigError", "ModelPlan", "PipelineConfig", "STAGES", "load_config"]
