"""The README written at the root of a generated repository: what is in it and how to start Triton on it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipdeploy.triton import releases

# What the Python-backend models import besides numpy (which Triton's Python backend itself needs).
PYTHON_PACKAGES = ("pillow", "ftfy", "regex")


def release_line(engine_info: dict[str, Any]) -> tuple[str, str]:
    """(a sentence on which release to use, the image to put in the commands)."""
    if not engine_info:
        newest = releases.RELEASES[-1].name
        return (
            f"The repository holds ONNX models only: any recent Triton release serves it (e.g. {newest}).",
            releases.image(newest),
        )
    version = engine_info["engines_tensorrt"]
    matching = engine_info.get("matching_releases") or []
    if engine_info.get("target_release"):
        release = engine_info["target_release"]
    elif matching:
        release = matching[-1]["release"]
    else:
        release = "YY.MM"
    names = ", ".join(f"{m['release']}{'' if m['verified'] else ' (unverified)'}" for m in matching)
    compat = (
        " (version-compatible plans: that release or a later one of the same TensorRT major)"
        if engine_info.get("version_compatible")
        else ""
    )
    text = (
        f"The engines were built with TensorRT {version}{compat}. Triton releases known to match: "
        f"{names or 'none in clipdeploy’s table; pick one from NVIDIA’s support matrix'}."
    )
    return text, releases.image(release)


def readme(summary: dict[str, Any], output: Path) -> str:
    engine_info = summary.get("tensorrt") or {}
    which, image = release_line(engine_info)
    gpus = "--gpus all " if engine_info else ""
    flags = " --backend-config=tensorrt,version-compatible=true" if engine_info.get("version_compatible") else ""
    lines = [
        "# Triton model repository",
        "",
        f"Written by `clipdeploy triton` (clipdeploy {summary['clipdeploy']}, {summary['created']}). Clients send",
        "raw image bytes or strings to an `*_embed_*` ensemble and get L2-normalized float32 embeddings, the",
        "same as `clipdeploy.load(...).encode_image` / `encode_text`.",
        "",
        "| ensemble | input | runs | precision | format |",
        "|---|---|---|---|---|",
    ]
    for art in summary["artifacts"]:
        for e in art["ensembles"]:
            name = f"**{e['name']}**" if e.get("default") else e["name"]
            lines.append(
                f"| {name} | {e['input']} (TYPE_STRING, [1]) | {e['model']} | {e['precision']} | {e['format']} |"
            )
    lines += [
        "",
        "Bold: the variant the clipdeploy runtime would pick. Preprocessing and tokenization run in",
        "`*_preprocess` / `*_tokenize` (Python backend, clipdeploy's own torch-free code, vendored).",
        "",
        "## Start Triton",
        "",
        which,
        "",
        f"The Python models need {', '.join(PYTHON_PACKAGES)} in the server's Python (and `tokenizers` for",
        "Hugging Face tokenizers). Build a small image once, then serve this directory:",
        "",
        "```bash",
        "mkdir -p /tmp/triton-image && cat > /tmp/triton-image/Dockerfile <<'EOF'",
        f"FROM {image}",
        f"RUN pip install --no-cache-dir {' '.join(PYTHON_PACKAGES)}",
        "EOF",
        "docker build -t clipdeploy-triton /tmp/triton-image",
        f"docker run {gpus}--rm --shm-size=1g -p 8000:8000 -p 8001:8001 -p 8002:8002 \\",
        f'  -v "$(realpath {output})":/models clipdeploy-triton \\',
        f"  tritonserver --model-repository=/models{flags}",
        "```",
        "",
        "## Query it",
        "",
        "```python",
        "import numpy as np",
        "import tritonclient.http as http",
        "",
        'client = http.InferenceServerClient("localhost:8000")',
        'blob = np.array([[open("cat.jpg", "rb").read()]], dtype=object)   # [batch, 1]',
        'image = http.InferInput("IMAGE", list(blob.shape), "BYTES")',
        "image.set_data_from_numpy(blob)",
    ]
    first = next((e for a in summary["artifacts"] for e in a["ensembles"] if e.get("default")), None)
    model = first["name"] if first else "MODEL_embed_image"
    lines += [
        f'embedding = client.infer("{model}", [image]).as_numpy("EMBEDDING")   # float32 [1, D]',
        "```",
    ]
    if summary.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in summary["warnings"]]
    return "\n".join(lines) + "\n"
