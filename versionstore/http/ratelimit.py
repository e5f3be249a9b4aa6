"""Cloudinary's Admin API rate limit: a count per environment per clock hour.

Every authenticated Admin API call counts (Upload API calls and signed downloads do not, as
on Cloudinary). Responses carry `X-FeatureRateLimit-Limit`, `-Remaining` and `-Reset` (an
RFC 1123 date, the start of the next hour); past the limit the answer is 420, which both SDKs
map to RateLimited, with a `Retry-After` until the reset. The counters live in this process:
several processes serving one environment would each allow the limit (docs/api.md).
"""

import time
from collections.abc import Callable
from email.utils import formatdate

from versionstore.errors import RateLimited

WINDOW = 3600
#: Upload API paths (signed or Basic) and the signed download are not Admin API calls.
_NOT_ADMIN = ("image/", "video/", "raw/", "auto/", "download_backup", "download_archive")


def is_admin_call(rest: str) -> bool:
    """`rest` is the path after /v1_1/<cloud>/."""
    return not rest.startswith(_NOT_ADMIN)


class AdminRateLimit:
    """`limit` calls per environment per hour; 0 turns the limit (and its headers) off, but
    calls are still counted for `usage`."""

    def __init__(self, limit: int, clock: Callable[[], float] = time.time) -> None:
        self.limit = limit
        self._clock = clock
        self._counts: dict[str, tuple[int, int]] = {}  # cloud -> (window start, calls in it)
        #: The headers that change once an hour, made once (formatdate showed in profiles).
        self._fixed: tuple[tuple[int, int], dict[str, str]] = ((-1, -1), {})

    def hit(self, cloud: str) -> dict[str, str]:
        """Count one call; the headers to send. Raises RateLimited (with them) past the limit."""
        now = self._clock()
        window = int(now // WINDOW) * WINDOW
        start, used = self._counts.get(cloud, (window, 0))
        if start != window:
            used = 0
        if self.limit <= 0:
            self._counts[cloud] = (window, used + 1)
            return {}
        reset = window + WINDOW
        if self._fixed[0] != (window, self.limit):
            fixed = {"X-FeatureRateLimit-Limit": str(self.limit), "X-FeatureRateLimit-Reset": formatdate(reset, usegmt=True)}
            self._fixed = ((window, self.limit), fixed)
        headers = dict(self._fixed[1])
        if used >= self.limit:
            headers["X-FeatureRateLimit-Remaining"] = "0"
            headers["Retry-After"] = str(max(1, int(reset - now)))
            raise RateLimitExceeded(headers, self.limit)
        self._counts[cloud] = (window, used + 1)
        headers["X-FeatureRateLimit-Remaining"] = str(self.limit - used - 1)
        return headers

    def used(self, cloud: str) -> int:
        """Calls counted in the current hour (the `requests` figure of `usage`)."""
        start, used = self._counts.get(cloud, (0, 0))
        return used if start == int(self._clock() // WINDOW) * WINDOW else 0


class RateLimitExceeded(RateLimited):
    def __init__(self, headers: dict[str, str], limit: int) -> None:
        super().__init__(f"Rate Limit Exceeded: {limit} Admin API calls per hour")
        self.headers = headers
