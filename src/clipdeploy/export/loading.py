"""Build an open_clip model, with its tokenizer, from a name, a pretrained tag, a checkpoint or a JSON config.

Every way this can go wrong for a user gets a one-line error that names the bad value and says what
to do. Checkpoints load with ``weights_only=True``, so a checkpoint cannot run code.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipdeploy.errors import CheckpointError, DependencyError, UsageError
from clipdeploy.export.hf_configs import bundled_config_dir
from clipdeploy.manifest import file_sha256

log = logging.getLogger(__name__)

_SCHEMAS = ("hf-hub:", "local-dir:")


@dataclass
class LoadedModel:
    """An eval-mode open_clip model with what the artifact needs to describe where it came from."""

    model: Any
    tokenizer: Any  # open_clip's tokenizer; None when it needs hub files that could not be had
    name: str
    source: dict[str, Any]  # how the weights were chosen: pretrained tag, checkpoint sha256, config
    # Set when the tokenizer is missing: which one, why, and how to supply it (recorded in the manifest).
    tokenizer_missing: dict[str, Any] | None = None
    hf_tokenizer_name: str | None = None  # the hub name of a Hugging Face tokenizer, from the model config


def import_open_clip() -> Any:
    try:
        import open_clip
    except ImportError as e:
        raise DependencyError(
            f"exporting needs torch and open_clip ({e.name} is missing); install: pip install 'clipdeploy[export]'"
        ) from e
    return open_clip


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


def _load_checkpoint(open_clip: Any, model: Any, name: str, path: Path) -> None:
    try:
        open_clip.load_checkpoint(model, str(path), weights_only=True)
    except Exception as e:  # torch, pickle, zipfile and safetensors each raise their own types
        text = " ".join(str(e).split())
        if "Weights only load failed" in text:
            reason = text.split("Unsupported global:")[-1].split(".")[0].strip() if "Unsupported global" in text else ""
            detail = f": it references {reason}" if reason else ""
            raise CheckpointError(
                f"checkpoint {str(path)!r} cannot be loaded safely{detail}; save a plain state_dict "
                "(torch.save(model.state_dict(), f)) or a .safetensors file"
            ) from e
        # open_clip asserts on mismatched position embeddings before load_state_dict reports the rest.
        if "Error(s) in loading state_dict" in text or isinstance(e, AssertionError):
            raise CheckpointError(
                f"checkpoint {str(path)!r} does not fit {name} ({text[:300]}); pass the architecture it was trained with"
            ) from e
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or not a PyTorch checkpoint ({type(e).__name__}: {text[:200]}); "
            "pass a file saved with torch.save or safetensors"
        ) from e


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
    import torch

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
        if not ckpt_path.is_file():
            raise CheckpointError(f"checkpoint {str(ckpt_path)!r} does not exist; pass the path of a saved state_dict")
        source["checkpoint"] = ckpt_path.name
        source["checkpoint_sha256"] = file_sha256(ckpt_path)

    torch.manual_seed(seed)
    if pretrained is None and checkpoint is None and not name.startswith(_SCHEMAS):
        source["random_init_seed"] = seed
    overrides = _hf_text_overrides(open_clip, name)
    if depth is not None:
        if pretrained or checkpoint is not None:
            raise UsageError("a reduced depth applies to random weights only; drop --pretrained/--checkpoint")
        overrides = reduced_depth_overrides(open_clip, name, depth, overrides)
    try:
        with _timm_depth(depth):
            model = open_clip.create_model(
                name, pretrained=pretrained, device="cpu", precision="fp32", pretrained_text=False, **overrides
            )
    except RuntimeError as e:
        if pretrained and "download" in str(e).lower():
            raise CheckpointError(
                f"could not download weights {name}/{pretrained} ({' '.join(str(e).split())[:200]}); "
                "check the network, or download once and pass --checkpoint FILE"
            ) from e
        raise
    if ckpt_path is not None:
        _load_checkpoint(open_clip, model, name, ckpt_path)
    model.eval()
    if overrides.get("text_cfg", {}).get("hf_model_name"):
        source["hf_text_config"] = "bundled"
    tokenizer, missing = load_tokenizer(open_clip, name, tokenizer_dir)
    if type(getattr(model, "text", None)).__name__ == "HFTextEncoder":
        # An HF tower reports max_position_embeddings (514 for roberta) as its context length; the ids
        # it gets are the tokenizer's, padded to the text_cfg context length (77 by default).
        length = tokenizer.context_length if tokenizer is not None else _text_cfg(open_clip, name).get("context_length")
        model.clipdeploy_context_length = int(length or 77)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        source=source,
        tokenizer_missing=missing,
        hf_tokenizer_name=_text_cfg(open_clip, name).get("hf_tokenizer_name"),
    )


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
    import timm

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
