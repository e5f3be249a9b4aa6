"""What requests leave in long-lived caches must not be objects the garbage collector walks:
every full collection visits each one while holding the GIL (docs/performance.md, "GC").
And the opt-in log of slow collections (versionstore/gclog.py) is off unless asked for."""

import gc
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import Api
from tests.servers import free_port, wait_http_ready
from versionstore import gclog, stall_log
from versionstore.config import ConfigError
from versionstore.http import render
from versionstore.http.keys import RENDERED_ROWS


def _tracked_reachable(root: object) -> int:
    """Objects the collector tracks among everything reachable from `root` (root excluded)."""
    seen = {id(root)}
    todo = list(gc.get_referents(root))
    tracked = 0
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        tracked += gc.is_tracked(obj)
        todo.extend(gc.get_referents(obj))
    return tracked


async def test_kept_listing_rows_hold_no_tracked_objects(api: Api, client: TestClient) -> None:
    """Pages of assets with tags and context, as a listing, a search and with `fields`: the
    row cache keeps an entry per asset and page kind, and not one object the collector walks
    (kept as dicts with tag lists, each entry cost about three)."""
    count = 12
    for n in range(count):
        await api.upload(f"gc {n}".encode(), public_id=f"gc/{n:02}", tags=f"t{n % 3},u", context=f"n={n}|k=v")
    for _ in range(2):
        await api.admin("GET", "resources/image/upload", params={"max_results": "500"})
        await api.admin("GET", "resources/image", params={"max_results": "500", "fields": "tags,context,bytes"})
        await api.admin("POST", "resources/search", json={"max_results": 500, "expression": "tags=u"})
    held = client.app[RENDERED_ROWS]._entries
    assert len(held) == 3 * count
    for _ in range(3):  # a tuple stops being tracked at a collection that finds only untracked values in it:
        gc.collect()  # nested ones (an entry holds its row; a key its options) may take a collection per level
    assert _tracked_reachable(held) == 0


ITEM = {"asset_id": "a1", "public_id": "p/1", "version": 3, "tags": ["x", "y"], "context": {"custom": {"k": "v"}}}


@pytest.mark.parametrize("items", [
    [],
    [ITEM],
    [ITEM, {**ITEM, "public_id": 'quote " },{"asset_id": inside'}, {**ITEM, "tags": []}],
    [ITEM, {**ITEM, "metadata": {"list": [{"x": 1}, {"asset_id": "nested"}]}}, ITEM],  # the boundary nested
    [ITEM, {"public_id": "another first key"}, ITEM],
    # another first key AND a nested boundary: the count of pieces matches, the cuts do not
    [ITEM, {"public_id": "p/2", "metadata": {"list": [{"x": 1}, {"asset_id": "nested"}]}}, ITEM],
    [ITEM, {**ITEM, "metadata": {"big": 1 << 70}}, ITEM],  # orjson refuses; json encodes it
    [{**ITEM, "public_id": f"p/{n}"} for n in range(600)],
])
def test_encoded_items_equal_each_item_encoded_alone(items: list[dict[str, Any]]) -> None:
    assert render.encode_items(items) == [render.dumps(item) for item in items]


def test_slow_collections_are_logged_only_when_asked(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(gclog.GC_LOG_VARIABLE, raising=False)
    callbacks = list(gc.callbacks)
    deferred: list[Callable[[], None]] = []
    assert gclog.install(gclog.threshold_from_env(), deferred.append) is None  # off: no callback at all
    assert gc.callbacks == callbacks
    monkeypatch.setenv(gclog.GC_LOG_VARIABLE, "0")
    probe = gclog.install(gclog.threshold_from_env(), deferred.append)
    assert probe is not None and probe in gc.callbacks
    with caplog.at_level(logging.INFO, logger="versionstore.gc"):
        gc.collect()
        assert deferred  # reported after the collection, not from inside it
        for report in deferred:
            report()
        gclog.uninstall(probe)
    assert gc.callbacks == callbacks
    lines = [record.getMessage() for record in caplog.records]
    assert any(line.startswith("gc: generation 2 collection took ") and "tracked objects now in generation 2" in line
               for line in lines), lines
    assert lines[-1].startswith("gc: ") and "worst: " in lines[-1] and "generation 2 " in lines[-1]
    for bad in ("often", "-1"):
        monkeypatch.setenv(gclog.GC_LOG_VARIABLE, bad)
        with pytest.raises(ConfigError, match=gclog.GC_LOG_VARIABLE):
            gclog.threshold_from_env()


def test_serve_logs_slow_collections_when_asked(tmp_path: Path) -> None:
    """`serve` with VERSIONSTORE_GC_LOG_MS=0 logs every collection after start-up, and the
    worst per generation when it stops; with VERSIONSTORE_STALL_LOG_MS it watches the loop too."""
    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "versionstore", "serve", "--data-dir", str(tmp_path / "d"), "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
            env={**os.environ, gclog.GC_LOG_VARIABLE: "0", stall_log.STALL_LOG_VARIABLE: "50"},
        )
    try:
        assert wait_http_ready(proc, f"http://127.0.0.1:{port}/healthz"), log_path.read_text()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)
    text = log_path.read_text()
    assert "gc: logging collections over 0 ms (VERSIONSTORE_GC_LOG_MS)" in text, text
    assert "collection(s) over 0 ms; worst: " in text, text
    assert "stall: logging event-loop stalls over 50 ms (VERSIONSTORE_STALL_LOG_MS)" in text, text
    assert "event-loop stall(s) over 50 ms; worst " in text, text
