"""`clipdeploy run` and `clipdeploy triton` keep `import clipdeploy.cli` and their own modules light."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "open_clip", "onnx", "onnxruntime", "tensorrt", "tritonclient")


def test_pipeline_and_triton_modules_import_nothing_heavy():
    code = (
        "import sys\n"
        "from clipdeploy.cli import build_parser\n"
        "build_parser()\n"
        "import clipdeploy.pipeline.config, clipdeploy.pipeline.runner, clipdeploy.pipeline.stages\n"
        "import clipdeploy.triton.repository, clipdeploy.triton.command, clipdeploy.pipeline.command\n"
        f"print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"pulled in: {result.stdout}"
