"""pytest plugin: the file part of every Content-Length body of which bytes are still on their
way when the part's headers have been read goes through http/body_tap.py, in small blocks. Run
the body-parsing suites with it to check the tapped path on their hostile inputs:
`pytest -p tests.tap_everywhere tests/test_hostile.py ...` (e2e servers run in their own
process and keep the defaults). Small bodies are read whole by http/small_body.py, not
tapped, except in the `stream` runs of the modules conftest.BOTH_READERS_MODULES runs twice."""

from collections.abc import Iterator

import pytest

from versionstore.http import body_tap


@pytest.fixture(autouse=True)
def _tap_everywhere(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(body_tap, "TAP_MIN", 1)
    monkeypatch.setattr(body_tap, "BLOCK", 4093)  # prime: blocks end anywhere in the data; 64 MiB still reads quickly
    yield
