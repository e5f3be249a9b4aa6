"""The event-loop stall log (versionstore/stall_log.py, VERSIONSTORE_STALL_LOG_MS)."""

import asyncio
import logging
import os
import re
import sys
import threading
import time

import pytest

from versionstore import stall_log
from versionstore.config import ConfigError


def hold_the_loop(seconds: float) -> None:
    time.sleep(seconds)  # a blocking call on the loop's thread: what the log must name


async def test_a_stall_is_logged_with_the_loop_threads_stack(caplog: pytest.LogCaptureFixture) -> None:
    # Thresholds well above the lateness a busy CI machine gives a timer, so only the held loop counts.
    with caplog.at_level(logging.INFO, logger="versionstore.stall"):
        watch = stall_log.install(100.0, asyncio.get_running_loop())
        assert watch is not None
        await asyncio.sleep(0.05)
        hold_the_loop(0.4)
        await asyncio.sleep(0.05)
        stall_log.uninstall(watch)
    assert watch.stalls == 1 and watch.worst_ms >= 300, (watch.stalls, watch.worst_ms)
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0] == "stall: logging event-loop stalls over 100 ms (VERSIONSTORE_STALL_LOG_MS)"
    stalls = [line for line in lines if line.startswith("stall: the event loop was blocked for ")]
    sleeping = f'test_stall_log.py", line {hold_the_loop.__code__.co_firstlineno + 1}, in hold_the_loop'
    assert len(stalls) == 1 and stalls[0].endswith(sleeping), lines  # innermost last, no source lines read
    assert "; CPU meanwhile: this process " in stalls[0], stalls  # asleep: no thread is named busy
    assert lines[-1].startswith("stall: 1 event-loop stall(s) over 100 ms; worst ")


def spin(seconds: float, spun: threading.Event, done: threading.Event) -> None:
    """Pure Python for `seconds`, then stay alive (as a pool's thread does) until `done`."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    spun.set()
    done.wait(5)


async def test_a_thread_holding_the_gil_is_named_by_its_cpu_time(caplog: pytest.LogCaptureFixture) -> None:
    """Neither the loop nor the watcher runs while another thread keeps the GIL. A stack taken
    as the GIL comes free shows only where the loop waited for it: the CPU line names the
    thread that spent the stall's time."""
    switch = sys.getswitchinterval()
    sys.setswitchinterval(2.0)  # the spinning thread keeps the GIL until it ends
    try:
        with caplog.at_level(logging.WARNING, logger="versionstore.stall"):
            watch = stall_log.install(100.0, asyncio.get_running_loop())
            assert watch is not None
            await asyncio.sleep(0.05)
            spun, done = threading.Event(), threading.Event()
            spinner = threading.Thread(target=spin, args=(0.4, spun, done), name="gil-holder")
            spinner.start()
            await asyncio.to_thread(spun.wait, 5)
            await asyncio.sleep(0.05)
            stall_log.uninstall(watch)
            done.set()
            spinner.join()
    finally:
        sys.setswitchinterval(switch)
    stalls = [record.getMessage() for record in caplog.records if "was blocked for" in record.getMessage()]
    assert len(stalls) == 1 and "; CPU meanwhile: this process " in stalls[0] and "(gil-holder " in stalls[0], stalls
    if os.path.exists("/proc/stat"):  # the watcher's reading from before the stall, not one it finished after
        assert re.search(r"; the machine's CPUs [1-9]\d*% busy over \d+ ms", stalls[0]), stalls


async def test_a_busy_but_responsive_loop_logs_no_stall(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="versionstore.stall"):
        watch = stall_log.install(200.0, asyncio.get_running_loop())
        assert watch is not None
        for _ in range(20):  # short pieces of work between turns of the loop
            hold_the_loop(0.005)
            await asyncio.sleep(0.01)
        stall_log.uninstall(watch)
    assert watch.stalls == 0
    assert [record.getMessage() for record in caplog.records] == ["stall: 0 event-loop stall(s) over 200 ms; worst 0.0 ms"]


def test_off_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(stall_log.STALL_LOG_VARIABLE, raising=False)
    assert stall_log.threshold_from_env() is None
    assert stall_log.install(None, asyncio.new_event_loop()) is None  # no timer, no thread
    monkeypatch.setenv(stall_log.STALL_LOG_VARIABLE, "50")
    assert stall_log.threshold_from_env() == 50.0
    for bad in ("often", "-1", "0", "nan", "inf"):
        monkeypatch.setenv(stall_log.STALL_LOG_VARIABLE, bad)
        with pytest.raises(ConfigError, match=stall_log.STALL_LOG_VARIABLE):
            stall_log.threshold_from_env()
