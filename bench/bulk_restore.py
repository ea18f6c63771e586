#!/usr/bin/env python3
"""Benchmark of bulk restore (issue 25): undoing a retention run that removed 50,000 tags in 50
repositories — the rate, the server's CPU, and the latency of pushes and GETs elsewhere while it
runs, against the same with nothing else running.

Each repository holds 1,000 tagged images (their own manifests over one shared config and
layer); a rule removing tags not pushed within 1 ms removes every one, in one run. We then time
the undo's dry run (the same transactions, rolled back) and the real undo (`POST /admin/v1/restore?run=ID`), with a
pusher and a reader on another repository beside it. Both deployments: embedded (SQLite +
filesystem) and scale-out (PostgreSQL + Garage).

Run through `bench/run bulk-restore [--quick]`. Standard library only.
"""

import json
import os
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402
from collector import Client  # noqa: E402
from retention import fill, percentile, push_latencies  # noqa: E402

RULES = """
[gc]
enabled = false
[retention]
interval = "0s"
[[retention.rules]]
name = "all"
repositories = "bench/r*"
remove_not_pushed_within = "1ms"
"""


def get_latencies(client, stop, out):
    """GETs manifests of `bench/live` (pushed by the pusher) until `stop` is set; appends
    latencies (s)."""
    i = 0
    while not stop.is_set():
        i += 1
        t0 = time.perf_counter()
        status = client.request("GET", f"/v2/bench/live/manifests/l{i % 10}")
        if status == 200:
            out.append(time.perf_counter() - t0)


def post(url):
    """POSTs to an admin endpoint that may take minutes; its JSON answer."""
    with urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=3600) as r:
        return json.loads(r.read())


def timed(server, path):
    """POSTs `path`; (wall seconds, server CPU seconds, the answer)."""
    c0, t0 = bench.cpu_seconds(server.pid), time.perf_counter()
    answer = post(server.base + path)
    return time.perf_counter() - t0, bench.cpu_seconds(server.pid) - c0, answer


def with_load(server, work):
    """Runs `work()` while one client pushes and one reads `bench/live`; returns (its result,
    push latencies, GET latencies)."""
    pushes, gets, stop = [], [], threading.Event()
    threads = [threading.Thread(target=push_latencies, args=(Client(server.base), stop, pushes)),
               threading.Thread(target=get_latencies, args=(Client(server.base), stop, gets))]
    for t in threads:
        t.start()
    try:
        result = work()
    finally:
        stop.set()
        for t in threads:
            t.join()
    return result, pushes, gets


def deployment(binary, work, name, storage, repos, tags):
    server = bench.start_berth(binary, work, name, config=storage + RULES)
    try:
        client = Client(server.base)
        fill(client, repos, tags)
        removal = post(server.base + "/admin/v1/retention/run?dry_run=false")
        run_id = removal["run_id"]
        removed = sum(1 for t in removal["tags"] if t["outcome"] == "removed")
        assert removed == repos * tags, removed
        # Pushes and GETs with nothing else going on, for the baseline.
        _, idle_push, idle_get = with_load(server, lambda: time.sleep(3))
        dry_wall, dry_cpu, dry = timed(server, f"/admin/v1/restore?run={run_id}&dry_run=true")
        assert dry["restored"] == removed, dry["restored"]
        (real_wall, real_cpu, real), push, get = with_load(
            server, lambda: timed(server, f"/admin/v1/restore?run={run_id}"))
        assert real["restored"] == removed, real["restored"]
        left = json.loads(bench.fetch(server.base + "/v2/bench/r0000/tags/list"))["tags"]
        assert len(left) == tags, len(left)
        return {
            "name": name, "repositories": repos, "restored": removed,
            "dry_s": dry_wall, "dry_cpu_s": dry_cpu, "real_s": real_wall, "real_cpu_s": real_cpu,
            "rate_per_s": removed / real_wall,
            "push_idle_p50_ms": percentile(idle_push, 0.5), "push_idle_p99_ms": percentile(idle_push, 0.99),
            "get_idle_p50_ms": percentile(idle_get, 0.5), "get_idle_p99_ms": percentile(idle_get, 0.99),
            "push_p50_ms": percentile(push, 0.5), "push_p99_ms": percentile(push, 0.99),
            "push_max_ms": max(push) * 1000 if push else float("nan"), "pushes": len(push),
            "get_p50_ms": percentile(get, 0.5), "get_p99_ms": percentile(get, 0.99),
            "get_max_ms": max(get) * 1000 if get else float("nan"), "gets": len(get),
        }
    finally:
        server.stop()


def main():
    args = bench.deployment_args("5,000 tags instead of 50,000")
    repos, tags = (50, 100) if args.quick else (50, 1000)
    results = bench.run_recorded(
        args, lambda name, storage: deployment(args.berth, args.work, name, storage, repos, tags))
    lines = [f"Machine: {results['machine']}; {bench.hash_line(results)}", "",
             "| deployment | deletes undone | dry run | real undo | rate | push p50 / p99 idle → during (max) | "
             "GET p50 / p99 idle → during (max) |",
             "|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        lines.append(
            f"| {r['name']} | {r['restored']:,} in {r['repositories']} repos | "
            f"{r['dry_s']:.1f} s ({r['dry_cpu_s']:.1f} CPU-s) | {r['real_s']:.1f} s ({r['real_cpu_s']:.1f} CPU-s) | "
            f"{r['rate_per_s']:,.0f} /s | "
            f"{r['push_idle_p50_ms']:.1f} / {r['push_idle_p99_ms']:.1f} → {r['push_p50_ms']:.1f} / "
            f"{r['push_p99_ms']:.1f} ({r['push_max_ms']:.0f}) ms, {r['pushes']} pushes | "
            f"{r['get_idle_p50_ms']:.1f} / {r['get_idle_p99_ms']:.1f} → {r['get_p50_ms']:.1f} / "
            f"{r['get_p99_ms']:.1f} ({r['get_max_ms']:.0f}) ms, {r['gets']} GETs |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
