"""The thin-runtime promise: importing clipdeploy, loading an artifact and embedding never import torch.

Each check runs in a fresh interpreter. The strongest form blocks the heavy modules outright, so the
runtime would fail if it needed them, rather than merely not having imported them yet.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import clipdeploy

HEAVY = ("torch", "torchvision", "open_clip", "onnx", "tensorrt", "onnxscript", "polygraphy")
SAMPLE = sorted((Path(clipdeploy.__file__).parent / "data" / "images").glob("*.jpg"))[0]

BLOCKER = textwrap.dedent(
    f"""
    import sys, importlib.abc
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] in {HEAVY!r}:
                raise ImportError(f'blocked heavy import: {{name}}')
    sys.meta_path.insert(0, Block())
    """
)


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)


def test_import_clipdeploy_is_light():
    result = _python(
        "import sys, clipdeploy, clipdeploy.cli, clipdeploy.artifact.manifest\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        f"{(*HEAVY, 'onnxruntime')!r})\n"
        "print(','.join(heavy))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"import clipdeploy pulled in: {result.stdout}"


def test_runtime_embeds_with_torch_blocked(micro_artifact):
    code = BLOCKER + textwrap.dedent(
        f"""
        import clipdeploy
        s = clipdeploy.load({str(micro_artifact.path)!r})
        img = s.encode_image([{str(SAMPLE)!r}])
        txt = s.encode_text(['a cat', 'café'])
        print(img.shape, txt.shape, s.similarity(img, txt).shape)
        heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})
        print('HEAVY=' + ','.join(heavy))
        """
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert "(1, 64) (2, 64) (1, 2)" in result.stdout
    assert "HEAVY=\n" in result.stdout + "\n"


def test_cli_embed_with_torch_blocked(micro_artifact):
    code = BLOCKER + textwrap.dedent(
        f"""
        from clipdeploy.cli import main
        raise SystemExit(main(['embed', {str(micro_artifact.path)!r}, '--text', 'hi', '--image', {str(SAMPLE)!r}]))
        """
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert '"similarity"' in result.stdout
