#!/usr/bin/env python3
"""The fixed CPU cost of a small upload (issue 10's batch client): event-loop CPU per upload.

Starts `versionstore serve` (automatic backup on) from this tree and, with `--against TREE`,
from another source tree (e.g. the start of a change, `git archive`d to /tmp), each on its
own data dir, and drives both with the same signed multipart uploads the Python SDK sends
(fields, then the file; urllib3's encoding): `--count` uploads one after the other and
`--count` uploads over `--concurrency` connections, per file size (1 KiB and 100 KiB by
default), each a new asset with `backup=1` and random bytes (no deduplication). The trees
take turns within every round (interleaved, the order alternating), so a change in the
machine's load hits both.

Per tree, size and mode it prints the medians over `--runs` rounds of: the CPU of the
service's event-loop thread per upload (`/proc/<pid>/task/<pid>/stat`), the whole process's
CPU per upload (loop + worker threads), and uploads per second. `--profile SECONDS` then
samples each tree's event loop with `py-spy record -d SECONDS` during concurrent 1 KiB uploads
and prints where its time goes.

    .venv/bin/python scripts/bench_small_uploads.py --quick
    git archive <start> | tar -x -C /tmp/start && \\
        .venv/bin/python scripts/bench_small_uploads.py --against /tmp/start --runs 3 --profile 10
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from urllib3 import encode_multipart_formdata

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib.py sits next to this script, whatever the cwd
from benchlib import (
    Server,
    add_load_option,
    check_load,
    fold_profile,
    free_port,
    interrupt_on_sigterm,
    log,
    print_profile,
    process_cpu,
    remove_temp_dir,
    run_bench,
    stop_servers,
)

CLOUD = "demo"
API_KEY = "key123"
API_SECRET = "secret456"
KiB = 1024
WARMUP = 20


def loop_cpu(pid: int) -> float:
    """User + system CPU seconds of the process's main thread (the event loop) so far."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def signed_body(public_id: str, data: bytes) -> tuple[bytes, str]:
    """A multipart body as the Python SDK sends it (urllib3's encoding, fields before the file)."""
    params = {"public_id": public_id, "backup": "1", "overwrite": "1", "timestamp": str(int(time.time()))}
    to_sign = "&".join(f"{k}={v}" for k, v in sorted(params.items()))
    signature = hashlib.sha1((to_sign + API_SECRET).encode()).hexdigest()
    fields: list[tuple[str, str | tuple[str, bytes, str]]] = [
        *params.items(), ("signature", signature), ("api_key", API_KEY), ("file", ("photo.jpg", data, "image/jpeg"))]
    body, content_type = encode_multipart_formdata(fields)
    return body, content_type


@dataclass
class Phase:
    loop_ms: list[float] = field(default_factory=list)  # event-loop CPU per upload, one value per round
    process_ms: list[float] = field(default_factory=list)
    rate: list[float] = field(default_factory=list)  # uploads per second


class Tree:
    """One service process, serving one source tree on a data dir of its own."""

    def __init__(self, name: str, tree: Path, root: Path, python: str) -> None:
        self.name = name
        self.data_dir = root / f"data-{name}"
        env = {"PYTHONPATH": str(tree)}
        subprocess.run([python, "-m", "versionstore", "cloud", "create", CLOUD, "--api-key", API_KEY, "--api-secret",
                        API_SECRET, "--auto-backup", "on", "--data-dir", str(self.data_dir)],
                       check=True, stdout=subprocess.DEVNULL, env={**os.environ, **env}, cwd=tree)
        port = free_port()
        self.server = Server(name, [python, "-m", "versionstore", "serve", "--data-dir", str(self.data_dir), "--host",
                                    "127.0.0.1", "--port", str(port)], port, root / f"{name}.log", env=env, cwd=tree)
        self.uploaded = 0

    def upload(self, conn: http.client.HTTPConnection, size: int) -> None:
        self.uploaded += 1  # under the GIL: unique enough for one process's threads
        body, content_type = signed_body(f"bench/{size}/{self.uploaded}-{threading.get_ident()}", os.urandom(size))
        conn.request("POST", f"/v1_1/{CLOUD}/image/upload", body, {"Content-Type": content_type})
        response = conn.getresponse()
        text = response.read()
        if response.status != 200:
            raise RuntimeError(f"{self.name}: upload answered {response.status}: {text[:300]!r}")

    def run(self, size: int, count: int, concurrency: int) -> tuple[float, float, float]:
        """`count` uploads over `concurrency` connections: (loop CPU s, process CPU s, wall s)."""
        proc = psutil.Process(self.server.pid)
        per_worker = [count // concurrency + (i < count % concurrency) for i in range(concurrency)]
        errors: list[BaseException] = []

        def work(n: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=60)
            try:
                for _ in range(n):
                    self.upload(conn, size)
            except BaseException as exc:  # reported below
                errors.append(exc)
            finally:
                conn.close()

        loop0, cpu0, t0 = loop_cpu(self.server.pid), process_cpu(proc), time.perf_counter()
        threads = [threading.Thread(target=work, args=(n,)) for n in per_worker]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - t0
        if errors:
            raise errors[0]
        return loop_cpu(self.server.pid) - loop0, process_cpu(proc) - cpu0, wall


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root = Path(tempfile.mkdtemp(prefix="versionstore-small-", dir=args.tmp_dir))
        here = Path(__file__).resolve().parent.parent
        trees = [("this", here)] + ([("against", Path(args.against).resolve())] if args.against else [])
        self.trees = [Tree(name, tree, self.root, sys.executable) for name, tree in trees]
        self.sizes = [int(float(s) * KiB) for s in args.sizes.split(",")]
        self.results: dict[tuple[str, int, str], Phase] = {}

    def cleanup(self) -> None:
        stop_servers([t.server for t in self.trees])
        remove_temp_dir(self.root, self.args.keep)

    def run(self) -> bool:
        a = self.args
        for tree in self.trees:
            tree.server.start()
            conn = http.client.HTTPConnection("127.0.0.1", tree.server.port, timeout=60)
            for _ in range(WARMUP):
                tree.upload(conn, KiB)
            conn.close()
        log(f"{a.runs} rounds; per round, tree and size: {a.count} sequential uploads, then {a.count} over "
            f"{a.concurrency} connections; trees: {', '.join(t.server.name for t in self.trees)}")
        for round_ in range(a.runs):
            order = self.trees if round_ % 2 == 0 else self.trees[::-1]
            for size in self.sizes:
                for tree in order:
                    for mode, concurrency in (("sequential", 1), (f"concurrency {a.concurrency}", a.concurrency)):
                        loop, cpu, wall = tree.run(size, a.count, concurrency)
                        phase = self.results.setdefault((tree.name, size, mode), Phase())
                        phase.loop_ms.append(loop / a.count * 1e3)
                        phase.process_ms.append(cpu / a.count * 1e3)
                        phase.rate.append(a.count / wall)
                        log(f"  round {round_ + 1} {tree.name:8} {size // KiB:4} KiB {mode:14}: loop {loop / a.count * 1e3:5.2f} ms, "
                            f"process {cpu / a.count * 1e3:5.2f} ms per upload, {a.count / wall:6.1f} uploads/s")
        if a.profile:
            for tree in self.trees:
                self.profile(tree)
        ok = check_load(a.allow_load)
        self.report()
        return ok

    def profile(self, tree: Tree) -> None:
        """py-spy on the event loop during concurrent uploads of `--profile-size` KiB, for `--profile` seconds."""
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        out = self.root / f"profile-{tree.name}.txt"
        argv = [spy, "record", "-p", str(tree.server.pid), "-r", "500", "-d", str(self.args.profile), "--nonblocking",
                "--format", "raw", "--nolineno", "-o", str(out)]
        sampler = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)  # py-spy attaches before the load starts
        loop = count = 0.0
        deadline = time.monotonic() + self.args.profile
        while time.monotonic() < deadline:
            used, _, _ = tree.run(self.args.profile_size * KiB, self.args.count, self.args.concurrency)
            loop, count = loop + used, count + self.args.count
        _, err = sampler.communicate(timeout=self.args.profile + 60)
        if sampler.returncode != 0 or not out.exists():
            raise RuntimeError(f"py-spy failed (rc={sampler.returncode}): {err.decode(errors='replace')[-2000:]}")
        log(f"profile {tree.name}: {loop / count * 1e6:.0f} us of event-loop CPU per {self.args.profile_size} KiB upload "
            f"under py-spy; {out}")
        print_profile(fold_profile(out, within="_run_once"), loop / count * 1e6, self.args.profile_top)

    def report(self) -> None:
        print(f"\nmedians of {self.args.runs} rounds, {self.args.count} uploads each (backup on):")
        print(f"{'tree':8} {'size':>8} {'mode':16} {'loop ms/upload':>15} {'process ms/upload':>18} {'uploads/s':>10}")
        for (name, size, mode), phase in self.results.items():
            print(f"{name:8} {size // KiB:5} KiB {mode:16} {statistics.median(phase.loop_ms):15.2f} "
                  f"{statistics.median(phase.process_ms):18.2f} {statistics.median(phase.rate):10.1f}")
        if len(self.trees) < 2:
            return
        print("\nthis tree against --against (medians; < 1 is less CPU, > 1 more uploads/s):")
        for (name, size, mode), phase in self.results.items():
            if name != "this":
                continue
            base = self.results[("against", size, mode)]
            print(f"{size // KiB:5} KiB {mode:16} loop CPU {statistics.median(phase.loop_ms) / statistics.median(base.loop_ms):5.2f}x, "
                  f"process CPU {statistics.median(phase.process_ms) / statistics.median(base.process_ms):5.2f}x, "
                  f"uploads/s {statistics.median(phase.rate) / statistics.median(base.rate):5.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", metavar="TREE", help="also serve another source tree (e.g. a `git archive` in /tmp)")
    parser.add_argument("--count", type=int, default=200, help="uploads per tree, size and mode in each round (default 200)")
    parser.add_argument("--concurrency", type=int, default=4, help="connections of the concurrent mode (default 4)")
    parser.add_argument("--sizes", default="1,100", help="file sizes in KiB, comma-separated (default 1,100)")
    parser.add_argument("--runs", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--quick", action="store_true", help="one round of 100 uploads per phase")
    parser.add_argument("--profile", type=int, metavar="SECONDS", help="then py-spy each tree's loop this long (-d)")
    parser.add_argument("--profile-size", type=int, default=1, metavar="KIB", help="upload size while profiling (default 1)")
    parser.add_argument("--profile-top", type=int, default=15, help="functions listed per profile (default 15)")
    parser.add_argument("--tmp-dir", help="where the data dirs go (default: the system's temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the data dirs and logs")
    add_load_option(parser)
    args = parser.parse_args()
    if args.quick:
        args.runs, args.count = 1, 100
    interrupt_on_sigterm()
    return run_bench(Bench(args))


if __name__ == "__main__":
    sys.exit(main())
