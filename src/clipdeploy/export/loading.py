"""Build an open_clip model, with its tokenizer, from a name, a pretrained tag, a checkpoint or a JSON config.

Every way this can go wrong for a user gets a one-line error that names the bad value and says what
to do. Checkpoints load with ``weights_only=True``, so a checkpoint cannot run code.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipdeploy.deps import require
from clipdeploy.errors import CheckpointError, UsageError
from clipdeploy.export.geometry import TowerGeometry, read_geometry
from clipdeploy.export.hf_configs import bundled_config_dir
from clipdeploy.artifact.manifest import file_sha256

log = logging.getLogger(__name__)

_SCHEMAS = ("hf-hub:", "local-dir:")


@dataclass
class LoadedModel:
    """An eval-mode open_clip model with what the artifact needs to describe where it came from."""

    model: Any
    tokenizer: Any  # open_clip's tokenizer; None when it needs hub files that could not be had
    name: str
    source: dict[str, Any]  # how the weights were chosen: pretrained tag, checkpoint sha256, config
    # What the towers take (image size, context length, text layout), read once here: the exporter
    # and the bench take these facts instead of reading them off the torch module again.
    geometry: TowerGeometry
    # Set when the tokenizer is missing: which one, why, and how to supply it (recorded in the manifest).
    tokenizer_missing: dict[str, Any] | None = None
    hf_tokenizer_name: str | None = None  # the hub name of a Hugging Face tokenizer, from the model config


def import_open_clip() -> Any:
    return require("open_clip", "export")


def check_model_name(name: str) -> None:
    """Refuse an unknown architecture, suggesting the close ones."""
    open_clip = import_open_clip()
    if name.startswith(_SCHEMAS):
        return
    models = open_clip.list_models()
    if name in models:
        return
    close = difflib.get_close_matches(name, models, n=5, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else "run `clipdeploy models` for the list"
    raise UsageError(f"unknown model {name!r}: {hint}")


def check_pretrained_tag(name: str, tag: str) -> None:
    open_clip = import_open_clip()
    if name.startswith(_SCHEMAS):
        raise UsageError(f"--pretrained does not apply to {name!r}: the weights come from that source; drop --pretrained")
    if open_clip.get_pretrained_cfg(name, tag):
        return
    tags = open_clip.list_pretrained_tags_by_model(name)
    if tags:
        raise UsageError(f"unknown pretrained tag {tag!r} for {name}; valid tags: {', '.join(tags)}")
    raise UsageError(
        f"unknown pretrained tag {tag!r}: {name} has no published weights; pass --checkpoint FILE or export random weights"
    )


def register_model_config(name: str, config_path: Path) -> dict[str, Any]:
    """Make a user's open_clip-format architecture JSON available under ``name``."""
    open_clip = import_open_clip()
    config_path = Path(config_path)
    if config_path.is_dir():
        raise UsageError(
            f"model config {str(config_path)!r} is a directory, not a file; pass an open_clip architecture JSON file"
        )
    if not config_path.is_file():
        raise UsageError(f"model config {str(config_path)!r} does not exist; pass an open_clip architecture JSON file")
    try:
        cfg = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"model config {str(config_path)!r} is not valid JSON ({e}); fix the file") from e
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise UsageError(
            f"model config {str(config_path)!r} lacks {', '.join(missing)}; "
            "an open_clip architecture JSON has embed_dim, vision_cfg and text_cfg"
        )
    if name in open_clip.list_models() and open_clip.get_model_config(name) != cfg:
        raise UsageError(
            f"model name {name!r} is a built-in open_clip architecture; give your --model-config another name"
        )
    # open_clip names a config after its file, so register a copy named after the model.
    with tempfile.TemporaryDirectory(prefix="clipdeploy-cfg-") as tmp:
        staged = Path(tmp) / f"{name}.json"
        shutil.copyfile(config_path, staged)
        open_clip.add_model_config(staged)
    return cfg


# What a checkpoint file is, from its first bytes (never from its name).
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format (and .npz archives)
_PICKLE_PROTO = 0x80  # torch.save(..., _use_new_zipfile_serialization=False): a bare pickle stream
_RESIZABLE = ("visual.positional_embedding", "positional_embedding", "text.positional_embedding")


def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    size = path.stat().st_size
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if head[:1] == bytes([_PICKLE_PROTO]):
        return "pickle"
    # safetensors: an 8-byte little-endian header length, then the JSON header
    if len(head) > 8 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    return "unknown"


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The tensors in a checkpoint file, read so that nothing in the file can run code.

    A pickle (``.pt``/``.bin``/``.pth``) is only ever given to ``torch.load(..., weights_only=True)``,
    never to a loader that may retry without it (open_clip's retries on ``TypeError``, which a
    crafted file can raise on purpose). ``weights_only=True`` is passed explicitly because torch reads
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` only when the call leaves ``weights_only`` unset
    (torch/serialization.py), so no environment variable can turn it off. Before that, a zip
    checkpoint's pickle is disassembled (not run) and any global outside torch's weights-only
    allowlist is refused by name: a second, independent check.
    """
    torch = require("torch", "export")
    p = str(path)
    refit = "re-save it with torch.save(model.state_dict(), f)"
    try:
        kind = _sniff(path)
    except OSError as e:
        raise CheckpointError(f"checkpoint {p!r} cannot be read ({e.strerror or e}); check its permissions") from e
    if kind == "unknown":
        raise CheckpointError(
            f"checkpoint {p!r} is not a PyTorch or safetensors file (it does not start like one); "
            "pass a file saved with torch.save(model.state_dict(), f) or safetensors"
        )
    if kind == "safetensors":
        st = require("safetensors.torch", "export")
        try:
            return dict(st.load_file(p, device="cpu"))
        except Exception as e:  # safetensors raises SafetensorError (not exported under one stable name)
            raise CheckpointError(
                f"checkpoint {p!r} is a damaged safetensors file ({' '.join(str(e).split())[:160]}); "
                "save it again with safetensors.torch.save_file"
            ) from e
    if kind == "zip":
        unsafe = _unsafe_globals(torch, path)
        if unsafe:
            raise CheckpointError(
                f"checkpoint {p!r} is not a weights-only checkpoint: it holds Python objects "
                f"({', '.join(sorted(unsafe)[:3])}); {refit}"
            )
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        text = " ".join(str(e).split())
        if "Weights only load failed" in text or "TorchScript" in text:
            glob = re.search(r"GLOBAL (\S+) was not an allowed global", text)
            what = (
                f"it holds Python objects ({glob.group(1)})" if glob
                else "it is a TorchScript archive" if "TorchScript" in text
                else "the weights-only loader refused it"
            )
            raise CheckpointError(f"checkpoint {p!r} is not a weights-only checkpoint: {what}; {refit}") from e
        if isinstance(e, (RuntimeError, EOFError, OSError)):  # zip reader, magic number, short read
            raise CheckpointError(
                f"checkpoint {p!r} is truncated or damaged ({type(e).__name__}: {text[:160]}); "
                "copy it again, or re-save it with torch.save(model.state_dict(), f)"
            ) from e
        # TypeError, ValueError, ... from inside the weights-only unpickler: records built to
        # be rejected (a tensor rebuild with wrong arguments). Refused, and never retried.
        raise CheckpointError(
            f"checkpoint {p!r} is not a weights-only checkpoint: the weights-only loader refused it "
            f"({type(e).__name__}: {text[:120]}); {refit}"
        ) from e
    return _state_dict_of(obj, p)


def _unsafe_globals(torch: Any, path: Path) -> list[str]:
    """Globals in a zip checkpoint's pickle that weights-only loading does not allow (read, not run)."""
    scan = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if scan is None:
        return []
    try:
        return list(scan(str(path)))
    except Exception:  # not a torch.save zip, or damaged: torch.load below says which
        return []


def _state_dict_of(obj: Any, p: str) -> dict[str, Any]:
    """The name -> tensor mapping in what a checkpoint holds (a bare state_dict, or one under 'state_dict')."""
    import torch

    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # open_clip's training checkpoints: {"epoch", "state_dict", "optimizer", ...}
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(
            f"checkpoint {p!r} holds a {type(obj).__name__}, not a state_dict; "
            "re-save it with torch.save(model.state_dict(), f)"
        )
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"checkpoint {p!r} is not a state_dict: {bad[0]!r} is a {type(obj[bad[0]]).__name__}, not a tensor; "
            "re-save it with torch.save(model.state_dict(), f)"
        )
    if all(k.startswith("module.") for k in obj):  # saved from DistributedDataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def _load_checkpoint(open_clip: Any, model: Any, name: str, path: Path) -> None:
    """Load a checkpoint's tensors into ``model``, as open_clip's load_checkpoint would, but safely."""
    torch = require("torch", "export")
    p = str(path)
    if path.suffix in (".npz", ".npy"):
        # big_vision (SigLIP) weights: numpy arrays, read by np.load, which refuses pickles by default.
        try:
            require("open_clip.convert", "export").load_big_vision_weights(model, p)
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {p!r} is not big_vision weights that fit {name} ({type(e).__name__}: "
                f"{' '.join(str(e).split())[:160]}); pass the architecture it was trained with"
            ) from e
        return
    sd = read_checkpoint(path)
    oc_model = require("open_clip.model", "export")
    # What open_clip's load_checkpoint does to a state dict before loading it (open_clip 3.x).
    sd = require("open_clip.convert", "export").convert_state_dict(model, sd)  # MobileCLIP's own key names
    if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
        sd = oc_model.convert_to_custom_text_state_dict(sd)  # a CLIP checkpoint for a CustomTextCLIP
    for key in ("logit_scale", "logit_bias"):  # a scalar where the model has shape [1], or the reverse
        own = getattr(model, key, None)
        if key in sd and own is not None and own.ndim != sd[key].ndim and sd[key].numel() == own.numel():
            sd[key] = sd[key].reshape(own.shape)
    if "logit_bias" not in sd and getattr(model, "logit_bias", None) is not None and "logit_scale" in sd:
        sd["logit_bias"] = torch.zeros_like(sd["logit_scale"])  # a CLIP checkpoint for a SigLIP head
    position_ids = "text.transformer.embeddings.position_ids"  # dropped by transformers >= 4.31
    if position_ids in sd and not hasattr(model, position_ids):
        del sd[position_ids]
    expected = model.state_dict()
    _check_fit(sd, expected, name, p, skip=_RESIZABLE)
    try:  # another image or text length: open_clip interpolates the position embeddings
        oc_model.resize_pos_embed(sd, model)
        oc_model.resize_text_pos_embed(sd, model)
    except Exception:  # a width that cannot be interpolated: _check_fit names the key below
        pass
    _check_fit(sd, expected, name, p)
    model.load_state_dict(sd, strict=True)


def _check_fit(sd: dict[str, Any], expected: dict[str, Any], name: str, p: str, skip: tuple[str, ...] = ()) -> None:
    fix = "pass the architecture it was trained with"
    for key, value in sd.items():
        want = expected.get(key)
        if want is None or key in skip:
            continue
        if tuple(value.shape) != tuple(want.shape):
            raise CheckpointError(
                f"checkpoint {p!r} does not fit {name}: {key} has shape {list(value.shape)}, "
                f"the model expects {list(want.shape)}; {fix}"
            )
    if skip:
        return
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"it lacks {len(missing)} of the model's tensors (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"it has {len(unexpected)} the model does not (e.g. {unexpected[0]})")
        raise CheckpointError(f"checkpoint {p!r} does not fit {name}: {' and '.join(parts)}; {fix}")


class _HubUnreachable(Exception):
    """Raised from a log filter at the Hugging Face Hub client's first failed request."""


class _StopAtFirstFailure(logging.Filter):
    """huggingface_hub retries a failed request 5 times with backoff (about 23 s per file, 46 s for
    open_clip's two candidate files), logging twice per try. Its logger reports each failure before
    the retry sleep, so stopping there ends the attempt at the first failure, silently; a user with
    network loses nothing but the retries of a request that already failed."""

    def __init__(self, failures: list[str]) -> None:
        super().__init__()
        self.failures = failures

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "thrown while requesting" in message or message.startswith(("Retrying in", "Rate limited")):
            self.failures.append(" ".join(message.split()))
            raise _HubUnreachable(message)
        return True


@contextlib.contextmanager
def _one_hub_attempt() -> Iterator[list[str]]:
    """While inside, a failed Hub request is not retried and not logged; yields the failures seen."""
    failures: list[str] = []
    hub_log = logging.getLogger("huggingface_hub.utils._http")
    stop = _StopAtFirstFailure(failures)
    level = hub_log.level
    if hub_log.getEffectiveLevel() > logging.WARNING:  # the filter must see the warnings to stop at one
        hub_log.setLevel(logging.WARNING)
    hub_log.addFilter(stop)
    try:
        yield failures
    finally:
        hub_log.removeFilter(stop)
        hub_log.setLevel(level)


def _download_pretrained(open_clip: Any, name: str, tag: str) -> tuple[Path, dict[str, Any]]:
    """The local file of open_clip's weights for ``name``/``tag`` (downloaded once, then cached)."""
    cfg = open_clip.get_pretrained_cfg(name, tag)
    with _one_hub_attempt() as failures:
        try:
            path = require("open_clip.pretrained", "export").download_pretrained(cfg)
        except Exception as e:  # hub, urllib and checksum failures, each of its own type
            cause = failures[0] if failures else f"{type(e).__name__}: {' '.join(str(e).split())}"
            raise CheckpointError(
                f"could not download weights {name}/{tag} ({cause[:200]}); without network, download the "
                f"file on a machine with it and pass --checkpoint FILE (with {name}) instead of --pretrained"
            ) from e
    if not path:
        raise CheckpointError(f"open_clip names no download for {name}/{tag}; pass --checkpoint FILE")
    tag_gelu, model_gelu = bool(cfg.get("quick_gelu")), bool((open_clip.get_model_config(name) or {}).get("quick_gelu"))
    if tag_gelu != model_gelu:  # what open_clip warns about too: the activation differs from training
        log.warning("%s/%s was trained with quick_gelu=%s, but %s uses quick_gelu=%s",
                    name, tag, tag_gelu, name, model_gelu)
    return Path(path), cfg


def _schema_weights(open_clip: Any, name: str) -> Path | None:
    """The weights file of an ``hf-hub:`` or ``local-dir:`` model (the hub one is cached by then)."""
    ident = name.split(":", 1)[1]
    if name.startswith("local-dir:"):
        found = open_clip.factory._find_checkpoint_in_dir(Path(ident))
    else:
        found = require("open_clip.pretrained", "export").download_pretrained_from_hf(ident)
    return Path(found) if found else None


def load_model(
    name: str,
    *,
    pretrained: str | None = None,
    checkpoint: str | Path | None = None,
    model_config: str | Path | None = None,
    seed: int = 0,
    tokenizer_dir: str | Path | None = None,
    depth: int | None = None,
) -> LoadedModel:
    """Build ``name`` in eval mode on CPU, in fp32, with the weights asked for.

    With neither ``pretrained`` nor ``checkpoint`` the weights are random, seeded by ``seed``.
    A Hugging Face text tower is built from a bundled config (no hub needed). A Hugging Face
    tokenizer comes from ``tokenizer_dir`` when given, else from the hub; when neither works the
    model still loads, with ``tokenizer=None`` and ``tokenizer_missing`` saying how to supply it.
    ``depth`` builds the architecture with fewer transformer blocks per tower (reduced-depth proofs
    of the giants only; never with weights).
    """
    open_clip = import_open_clip()
    torch = require("torch", "export")

    if pretrained and checkpoint:
        raise UsageError("--pretrained and --checkpoint both given; pass one source of weights")
    source: dict[str, Any] = {"pretrained": pretrained, "checkpoint": None, "checkpoint_sha256": None}
    if model_config is not None:
        cfg = register_model_config(name, Path(model_config))
        source["model_config"] = cfg
    check_model_name(name)
    if pretrained:
        check_pretrained_tag(name, pretrained)
    ckpt_path: Path | None = None
    if checkpoint is not None:
        ckpt_path = Path(checkpoint)
        if ckpt_path.is_dir():
            raise CheckpointError(
                f"checkpoint {str(ckpt_path)!r} is a directory, not a file; pass the saved state_dict file"
            )
        if not ckpt_path.is_file():
            raise CheckpointError(f"checkpoint {str(ckpt_path)!r} does not exist; pass the path of a saved state_dict")
        source["checkpoint"] = ckpt_path.name
        try:
            source["checkpoint_sha256"] = file_sha256(ckpt_path)
        except OSError as e:
            raise CheckpointError(
                f"checkpoint {str(ckpt_path)!r} cannot be read ({e.strerror or e}); check its permissions"
            ) from e

    torch.manual_seed(seed)
    if pretrained is None and checkpoint is None and not name.startswith(_SCHEMAS):
        source["random_init_seed"] = seed
    overrides = _hf_text_overrides(open_clip, name)
    if depth is not None:
        if pretrained or checkpoint is not None:
            raise UsageError("a reduced depth applies to random weights only; drop --pretrained/--checkpoint")
        overrides = reduced_depth_overrides(open_clip, name, depth, overrides)
    weights: Path | None = ckpt_path
    build: dict[str, Any] = {}
    if pretrained:
        # Downloaded here and read by read_checkpoint: open_clip's own loader may unpickle unsafely.
        weights, tag_cfg = _download_pretrained(open_clip, name, pretrained)
        build["force_preprocess_cfg"] = {
            k: v for k, v in require("open_clip.transform", "export").merge_preprocess_dict({}, tag_cfg).items()
            if k != "size"
        }
    elif name.startswith(_SCHEMAS):
        build["load_weights"] = False  # found below and read by read_checkpoint, as for a tag
    with _timm_depth(depth), _one_hub_attempt() as failures:
        try:
            model = open_clip.create_model(
                name, pretrained=None, device="cpu", precision="fp32", pretrained_text=False, **build, **overrides
            )
            if name.startswith(_SCHEMAS):
                weights = _schema_weights(open_clip, name)
        except Exception as e:
            if not failures:
                raise
            raise CheckpointError(
                f"could not reach the Hugging Face Hub for {name} ({failures[0][:160]}); "
                "without network, copy the weights file over and pass --checkpoint FILE with the architecture name"
            ) from e
    if weights is not None:
        _load_checkpoint(open_clip, model, name, weights)
    model.eval()
    if overrides.get("text_cfg", {}).get("hf_model_name"):
        source["hf_text_config"] = "bundled"
    tokenizer, missing = load_tokenizer(open_clip, name, tokenizer_dir)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        source=source,
        geometry=read_geometry(model, context_length=_hf_context_length(open_clip, name, model, tokenizer)),
        tokenizer_missing=missing,
        hf_tokenizer_name=_text_cfg(open_clip, name).get("hf_tokenizer_name"),
    )


def _hf_context_length(open_clip: Any, name: str, model: Any, tokenizer: Any) -> int | None:
    """The length of the ids a Hugging Face text tower is given; None for other towers.

    An HF tower reports max_position_embeddings (514 for roberta) as its context length; the ids it
    gets are the tokenizer's, padded to the text_cfg context length (77 by default).
    """
    if type(getattr(model, "text", None)).__name__ != "HFTextEncoder":
        return None
    length = tokenizer.context_length if tokenizer is not None else _text_cfg(open_clip, name).get("context_length")
    return int(length or 77)


def _text_cfg(open_clip: Any, name: str) -> dict[str, Any]:
    cfg = open_clip.get_model_config(name) if not name.startswith(_SCHEMAS) else None
    return dict((cfg or {}).get("text_cfg") or {})


def load_tokenizer(open_clip: Any, name: str, tokenizer_dir: str | Path | None) -> tuple[Any, dict[str, Any] | None]:
    """open_clip's tokenizer for ``name``; a Hugging Face one from ``tokenizer_dir`` when given.

    Returns (tokenizer, None), or (None, what is missing) when the hub cannot be reached.
    """
    text_cfg = _text_cfg(open_clip, name)
    hf_name = text_cfg.get("hf_tokenizer_name")
    if tokenizer_dir is not None:
        tokenizer_dir = Path(tokenizer_dir)
        if not hf_name:
            raise UsageError(
                f"--tokenizer-dir was given, but {name} uses open_clip's built-in BPE tokenizer; drop --tokenizer-dir"
            )
        if not tokenizer_dir.is_dir():
            raise UsageError(
                f"--tokenizer-dir {str(tokenizer_dir)!r} is not a directory; pass a folder holding the "
                f"{hf_name} tokenizer files (tokenizer.json, tokenizer_config.json)"
            )
        require("open_clip.tokenizer", "export")
        from open_clip.tokenizer import HFTokenizer

        # The arguments open_clip.get_tokenizer passes, with the local folder as the source.
        try:
            return (
                HFTokenizer(
                    str(tokenizer_dir),
                    context_length=text_cfg.get("context_length", 77),
                    tokenizer_mode=text_cfg.get("tokenizer_mode"),
                    **text_cfg.get("tokenizer_kwargs", {}),
                ),
                None,
            )
        except Exception as e:
            raise UsageError(
                f"could not build the {hf_name} tokenizer from --tokenizer-dir {str(tokenizer_dir)!r} "
                f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); pass a folder saved by "
                "AutoTokenizer.save_pretrained"
            ) from e
    try:
        with _one_hub_attempt():
            return open_clip.get_tokenizer(name), None
    except Exception as e:  # HF tokenizers reach for the hub
        if not hf_name:
            raise UsageError(
                f"could not build the tokenizer of {name} ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
            ) from e
        log.warning(
            "the %s tokenizer of %s could not be fetched (%s); the artifact will record it as missing; "
            "pass --tokenizer-dir DIR to include it",
            hf_name, name, " ".join(str(e).split())[:160],
        )
        return None, {
            "hf_tokenizer_name": hf_name,
            "reason": f"{type(e).__name__}: {' '.join(str(e).split())[:200]}",
            "fix": f"save the {hf_name} tokenizer on a machine with the hub "
            f"(AutoTokenizer.from_pretrained({hf_name!r}).save_pretrained(DIR)) and re-export with --tokenizer-dir DIR",
        }


def _hf_text_overrides(open_clip: Any, name: str) -> dict[str, Any]:
    """A Hugging Face text tower built from the bundled config, so no hub is needed to build it."""
    text_cfg = _text_cfg(open_clip, name)
    hf_model = text_cfg.get("hf_model_name")
    if not hf_model:
        return {}
    local = bundled_config_dir(hf_model)
    if local is None:
        return {}
    return {"text_cfg": {**text_cfg, "hf_model_name": str(local), "hf_model_pretrained": False}}


@contextlib.contextmanager
def _timm_depth(depth: int | None) -> Iterator[None]:
    """While building, timm towers get ``depth`` blocks (open_clip's TimmModel passes no such option)."""
    if depth is None:
        yield
        return
    timm = require("timm", "export")

    create = timm.create_model

    def shallow(*args: Any, **kwargs: Any) -> Any:
        try:
            return create(*args, **{**kwargs, "depth": depth})
        except TypeError as e:  # staged towers (ConvNeXt, Swin) take blocks per stage instead
            if "depth" not in str(e):
                raise
            return create(*args, **{**kwargs, "depths": (depth,) * 4})

    timm.create_model = shallow
    try:
        yield
    finally:
        timm.create_model = create


def reduced_depth_overrides(open_clip: Any, name: str, depth: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """The same architecture with at most ``depth`` blocks in each tower (for giants that cannot fit)."""
    cfg = open_clip.get_model_config(name) or {}
    out = dict(overrides)
    vision = dict(cfg.get("vision_cfg") or {})
    if isinstance(vision.get("layers"), int):
        vision["layers"] = min(vision["layers"], depth)
    out["vision_cfg"] = vision  # a timm tower gets its depth from _timm_depth at build time
    text = dict(out.get("text_cfg") or cfg.get("text_cfg") or {})
    if isinstance(text.get("layers"), int):
        text["layers"] = min(text["layers"], depth)
    out["text_cfg"] = text
    return out
