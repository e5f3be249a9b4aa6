"""What a request may hold before it is authenticated: a little, from a budget all share.

Anyone can open a connection and send fields or a file part before (or instead of) a signature.
Until the request is authenticated every byte it holds in memory (fields, a JSON or form body)
or on disk (a file part sent before the signature) is charged to a `Lease`; a lease may hold
at most `per_request` bytes, and all open leases together at most `total`. Past either limit
the request is refused. Once authenticated the lease is returned and the request streams at
full speed, charged nothing.
"""

from versionstore.errors import ApiError, TooLarge


class RateLimited(ApiError):
    """420/429 map to RateLimited in both SDKs (spec section 4): "try again later"."""

    status = 429


class UnauthBudget:
    def __init__(self, total: int, per_request: int) -> None:
        self.total = total
        self.per_request = min(per_request, total)
        self.used = 0

    def lease(self) -> "Lease":
        return Lease(self)


class Lease:
    """One request's share of the budget; `settle()` ends it (authenticated or finished)."""

    def __init__(self, budget: UnauthBudget) -> None:
        self.budget = budget
        self.held = 0
        self.open = True

    def take(self, size: int) -> None:
        if not self.open:
            return
        if self.held + size > self.budget.per_request:
            raise TooLarge(
                f"Request too large before authentication: at most {self.budget.per_request} bytes may come "
                "before api_key, timestamp and signature (send them before the file)"
            )
        if self.budget.used + size > self.budget.total:
            raise RateLimited("Too many unauthenticated requests in progress, try again later")
        self.held += size
        self.budget.used += size

    def settle(self) -> None:
        """Authenticated (or done): give the bytes back; nothing is charged from now on."""
        if self.open:
            self.budget.used -= self.held
            self.held = 0
            self.open = False
