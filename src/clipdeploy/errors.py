"""One exception root for clipdeploy, with a few meaningful subclasses.

Every message says what it got, what it expected and what to do next. The CLI prints the message
on one line and exits with ``exit_code``: 2 for usage and input errors, 1 for failed checks.
"""

from __future__ import annotations


class ClipDeployError(Exception):
    """Root of every error clipdeploy raises on purpose."""

    exit_code = 2


class UsageError(ClipDeployError):
    """A bad argument or option: unknown model, unknown tag, existing output, empty input."""


class CheckpointError(ClipDeployError):
    """A checkpoint that is missing, unreadable or does not fit the architecture."""


class InputError(ClipDeployError):
    """Bad data given to the runtime: an unreadable image, an empty text list, a wrong shape."""


class CalibrationError(ClipDeployError):
    """Calibration or held-out data that is missing, empty or too small to trust."""


class ArtifactError(ClipDeployError):
    """An artifact directory that is missing, corrupt, too new, or whose files fail their checksum."""


class DependencyError(ClipDeployError):
    """An optional dependency is missing; the message names the extra to install."""


class ExportError(ClipDeployError):
    """The model could not be traced or saved as ONNX."""

    exit_code = 1


class AccuracyError(ClipDeployError):
    """A variant failed its comparison with the reference. Never downgraded to a warning."""

    exit_code = 1

    def __init__(self, message: str, report: dict | None = None) -> None:
        super().__init__(message)
        # The full figures, for callers that want more than the one-line message.
        self.report = report or {}


class ServeError(ClipDeployError):
    """A server that could not be started or deployed (Ray Serve replicas that never came up)."""

    exit_code = 1


class EngineError(ClipDeployError):
    """A TensorRT engine could not be built, loaded or run."""

    exit_code = 1


def unreadable(path: object, e: OSError) -> ArtifactError:
    """The one-line error for an artifact file this user may not read."""
    name = str(e.filename or path)
    return ArtifactError(
        f"{name!r} cannot be read ({e.strerror or e}): it belongs to another user or its mode forbids reading; "
        "make the artifact readable (chmod -R a+rX DIR) or run as its owner"
    )
