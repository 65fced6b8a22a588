"""The artifact contract between stages: the manifest (schema, typed read-only view, atomic locked
updates), confined paths and ONNX external data, staging (temporaries, renames, locks), `inspect`.

Importing this package imports nothing heavy; each module is imported where it is used.
"""
