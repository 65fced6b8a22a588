"""Triton Python-backend models, copied into a model repository as ``<model>/1/model.py``.

They are not imported by clipdeploy itself: they import ``triton_python_backend_utils``, which only
Triton's Python backend provides, and the clipdeploy modules vendored beside them.
"""
