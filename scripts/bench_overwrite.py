#!/usr/bin/env python3
"""The latency of an overwrite with backup, and the fsyncs it costs (issue 10's upload row).

Starts `versionstore serve` (automatic backup on) from this tree and, with `--against TREE`,
from another source tree, each on its own data dir; uploads `--assets` assets once, then
overwrites them one after the other with new random bytes (a signed upload as the Python SDK
sends it, `overwrite=1`, `backup=1`), the trees taking turns in every round. Per tree it prints
the p50/p99 latency of an overwrite, the process's CPU per overwrite and, with `--strace`
(strace attached to the server during one more pass), the fsync and fdatasync calls per
overwrite: load-robust figures, unlike the latency on a shared machine. CPU figures are
medians of the passes' per-overwrite means (process, and its event-loop thread).

    .venv/bin/python scripts/bench_overwrite.py --strace
    git archive <start> | tar -x -C /tmp/start && \
        .venv/bin/python scripts/bench_overwrite.py --against /tmp/start --runs 3 --strace
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_small_uploads import CLOUD, Tree, loop_cpu, signed_body  # noqa: E402
from benchlib import log, median, process_cpu, remove_temp_dir, stop_servers  # noqa: E402


def overwrite(tree: Tree, conn: http.client.HTTPConnection, public_id: str, size: int) -> float:
    body, content_type = signed_body(public_id, os.urandom(size))
    started = time.perf_counter()
    conn.request("POST", f"/v1_1/{CLOUD}/image/upload", body, {"Content-Type": content_type})
    response = conn.getresponse()
    text = response.read()
    took = time.perf_counter() - started
    if response.status != 200:
        raise RuntimeError(f"{tree.name}: upload answered {response.status}: {text[:300]!r}")
    return took


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def one_pass(tree: Tree, ids: list[str], size: int) -> tuple[list[float], float, float]:
    """Overwrite every id once: (latencies s, process CPU s and event-loop CPU s per overwrite)."""
    proc = psutil.Process(tree.server.pid)
    conn = http.client.HTTPConnection("127.0.0.1", tree.server.port, timeout=60)
    try:
        cpu0, loop0 = process_cpu(proc), loop_cpu(tree.server.pid)
        times = [overwrite(tree, conn, public_id, size) for public_id in ids]
        return times, (process_cpu(proc) - cpu0) / len(ids), (loop_cpu(tree.server.pid) - loop0) / len(ids)
    finally:
        conn.close()


def traced_pass(tree: Tree, ids: list[str], size: int, root: Path) -> dict[str, float]:
    """One more pass with strace attached: system calls of interest per overwrite."""
    out = root / f"strace-{tree.name}.txt"
    tracer = subprocess.Popen(["strace", "-f", "-c", "-o", str(out), "-e", "trace=fsync,fdatasync,link,mkdir,unlink",
                               "-p", str(tree.server.pid)], stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # strace attaches to every thread before the first request
    try:
        one_pass(tree, ids, size)
    finally:
        tracer.terminate()
        tracer.wait(timeout=30)
    counts: dict[str, float] = {}
    for line in out.read_text().splitlines():
        match = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$", line)
        if match:
            counts[match.group(2)] = int(match.group(1)) / len(ids)
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", metavar="TREE", help="also serve another source tree (e.g. a `git archive` in /tmp)")
    parser.add_argument("--assets", type=int, default=50, help="assets overwritten per pass (default 50)")
    parser.add_argument("--runs", type=int, default=3, help="interleaved passes (default 3)")
    parser.add_argument("--size", type=int, default=2048, help="bytes per upload (default 2048)")
    parser.add_argument("--strace", action="store_true", help="then count fsync/fdatasync per overwrite with strace")
    parser.add_argument("--keep", action="store_true", help="keep the data dirs and logs")
    args = parser.parse_args()
    if args.strace and shutil.which("strace") is None:
        parser.error("--strace needs strace on the PATH")
    root = Path(tempfile.mkdtemp(prefix="versionstore-overwrite-"))
    here = Path(__file__).resolve().parent.parent
    named = [("this", here)] + ([("against", Path(args.against).resolve())] if args.against else [])
    trees = [Tree(name, tree, root, sys.executable) for name, tree in named]
    ids = [f"ow/{i}" for i in range(args.assets)]
    results: dict[str, tuple[list[float], list[float], list[float]]] = {tree.name: ([], [], []) for tree in trees}
    try:
        for tree in trees:
            tree.server.start()
            one_pass(tree, ids, args.size)  # the assets exist from here on; warms the process up
        for run in range(args.runs):
            for tree in trees if run % 2 == 0 else trees[::-1]:
                times, cpu, loop = one_pass(tree, ids, args.size)
                results[tree.name][0].extend(times)
                results[tree.name][1].append(cpu)
                results[tree.name][2].append(loop)
        log(f"{args.assets} overwrites with backup per pass, {args.runs} interleaved passes, {args.size} bytes, "
            f"load average {os.getloadavg()[0]:.2f}")
        for tree in trees:
            times, cpus, loops = results[tree.name]
            line = (f"{tree.name:8} p50 {percentile(times, 0.5) * 1000:6.1f} ms  p99 {percentile(times, 0.99) * 1000:6.1f} ms  "
                    f"CPU per overwrite {median(cpus) * 1000:5.2f} ms (loop {median(loops) * 1000:5.2f} ms)")
            if args.strace:
                counts = traced_pass(tree, ids, args.size, root)
                line += "  per overwrite: " + ", ".join(f"{name} {n:.2f}" for name, n in sorted(counts.items()))
            log(line)
    finally:
        stop_servers([tree.server for tree in trees])
        remove_temp_dir(root, args.keep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
