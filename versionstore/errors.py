"""Domain errors. Each carries the HTTP status the SDKs expect, so handlers never map them.

Only statuses both official SDKs accept are used (200, 400, 401, 403, 404, 409, 420, 429, 500):
see ../shared/spec/cloudinary-wire.md section 4.
"""


class ApiError(Exception):
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ApiError):
    status = 400


class Unauthorized(ApiError):
    status = 401


class Forbidden(ApiError):
    status = 403


class NotFound(ApiError):
    status = 404


class Conflict(ApiError):
    """One-at-a-time operations (an initial backup already running)."""

    status = 409


class RateLimited(ApiError):
    """Cloudinary's Admin API rate limit: 420, which both SDKs map to RateLimited."""

    status = 420


class TooLarge(BadRequest):
    """Cloudinary answers oversize files with 400, not 413 (Node rejects 413)."""


class Unavailable(ApiError):
    """A backup target that cannot be used right now. Only `download_backup` (a URL opened by
    browsers and scripts, never parsed by an SDK) answers 503; elsewhere it is a per-item error."""

    status = 503


class AppendOnlyRefused(Forbidden):
    """A request made with an environment's append-only key tried to delete or replace
    history (versionstore/http/append_only.py); the dispatcher audits it as refused."""
