"""The runtime's exceptions: one base class, one subclass per thing a user can get wrong.

Every one of them leaves the engine usable; its str() is the whole message a user needs.
"""

from __future__ import annotations

from runtime.artifact import ArtifactError


class EngineError(Exception):
    """Base of every error the runtime raises on purpose."""


class LoadError(EngineError, ArtifactError):
    """The directory cannot be served: missing, incomplete, another format version, or a manifest
    that does not describe its graph."""


class BackendError(EngineError):
    """The requested backend is not installed here or could not start."""


class RequestError(EngineError, ValueError):
    """A request the engine refuses (empty prompt, unknown token, too long, bad sampling settings)."""
