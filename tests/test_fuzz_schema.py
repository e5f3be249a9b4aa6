"""Schemathesis against a live `versionstore serve`, driven by versionstore/openapi.yaml.

Every operation in the document gets bounded, derandomized examples (positive and negative).
Credentials are supplied the way the SDKs supply them, so cases get past authentication and
reach the handlers: Basic auth for Admin endpoints, signed parameters for the Upload API
(`tests/conftest.py:sign`, the SDKs' signature version 2) and a signed query for
`download_backup`. Pass: no answer >= 500 and no traceback in the server log (docs/testing.md).
"""

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings

from tests.conftest import API_KEY, BASIC_HEADERS, sign
from tests.e2e.conftest import ServerProcess, running_server

ROOT = Path(__file__).resolve().parent.parent
MAX_EXAMPLES = 8
SIGNED = ("/upload", "/destroy", "/rename", "/explicit", "/tags", "/context", "/metadata")
# Pointing the backup target at a bucket dials out to the named host: not a fuzz target.
SKIP = {("PUT", "/v1_1/{cloud_name}/versionstore/backup"), ("POST", "/v1_1/{cloud_name}/versionstore/backup")}

STATUSES: Counter[tuple[str, str, int]] = Counter()
schema = schemathesis.openapi.from_path(ROOT / "versionstore" / "openapi.yaml")
# The coverage phase (deterministic boundary values, every operation) stays; the methods a
# path does not serve are one route-table check, not worth 8 requests per path.
schema.config.phases.coverage.unexpected_methods = {"patch"}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("fuzz-schema")) as server:
        yield server
    print("\nstatuses:", *sorted(STATUSES.items()), sep="\n  ")


def new_log(server: ServerProcess, offset: int) -> str:
    assert server.log_path is not None
    with open(server.log_path, "rb") as handle:
        handle.seek(offset)
        return handle.read().decode(errors="replace")


def log_size(server: ServerProcess) -> int:
    assert server.log_path is not None
    return server.log_path.stat().st_size


def authenticate(case: Any) -> None:
    """Sign or add Basic auth like the SDKs, over what the case will send."""
    path = case.operation.path
    if path.endswith(SIGNED) and isinstance(case.body, dict):
        params = {k: v for k, v in case.body.items() if k != "file"}
        lists = {k for k, v in params.items() if isinstance(v, list)}
        signed = sign({k: ([str(x) for x in v] if k in lists else str(v)) for k, v in params.items()})
        body = {(f"{k}[]" if k in lists else k): v for k, v in signed.items() if k not in lists}
        body.update({f"{k}[]": [str(x) for x in params[k]] for k in lists})
        if "file" in case.body:
            body["file"] = case.body["file"]
        case.body = body
        case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
    elif path.endswith("/download_backup") and isinstance(case.query, dict):
        signed = sign({k: str(v) for k, v in case.query.items() if k not in ("signature", "api_key", "timestamp")})
        case.query = {**signed, "api_key": API_KEY}
    else:
        case.headers = {**(case.headers or {}), **BASIC_HEADERS}
    if case.path_parameters and "cloud_name" in case.path_parameters:
        case.path_parameters = {**case.path_parameters, "cloud_name": "demo"}


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
def test_no_server_error(case: Any, live: ServerProcess) -> None:
    if (case.method.upper(), case.operation.path) in SKIP:
        return
    authenticate(case)
    offset = log_size(live)
    response = case.call(base_url=live.base_url, timeout=30)
    STATUSES[(case.method.upper(), case.operation.path, response.status_code)] += 1
    logged = new_log(live, offset)
    request = f"{case.method} {response.request.url}\n  body: {str(response.request.body)[:300]!r}"
    outcome = f"{request}\n  -> {response.status_code} {response.text[:300]}; server log:\n{logged[-2000:]}"
    assert response.status_code < 500 and "Traceback" not in logged, outcome
