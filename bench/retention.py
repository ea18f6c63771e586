#!/usr/bin/env python3
"""Benchmark of retention (issue 12): a pass over 100,000 tags in 1,000 repositories — and
(issue 25) the same decision with 10,000 digests pinned by an in-use report.

Each repository holds 100 tagged images (its own manifests over one shared config and layer);
the rule keeps the 50 most recently pushed tags of each, so a real run removes 50,000 tags. We
measure the dry run without pins, the in-use report of 10 digests per repository (the oldest,
which the rule would remove), the dry run again with those pins (pins must be an index lookup,
not a scan), and the real run through the admin API (wall time, and the server's CPU),
and the latency of manifest pushes to another repository while the real run goes on, against the
same pushes with nothing else running (retention must never block pushes). Both deployments:
embedded (SQLite + filesystem) and scale-out (PostgreSQL + Garage).

Run through `bench/run retention [--quick]`. Standard library only.
"""

import hashlib
import json
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402
from collector import MEDIA, Client, parallel  # noqa: E402

PINNED_PER_REPO = 10

RULES = """
[gc]
enabled = false
[retention]
interval = "0s"
[[retention.rules]]
name = "keep-50"
repositories = "bench/r*"
keep_last = 50
"""


def fill(client, repos, tags):
    """`repos` repositories of `tags` tagged images each; returns {repo: [digest of t0, t1, …]}."""
    config = b'{"architecture":"amd64","os":"linux"}'
    layer = os.urandom(1024)

    digests = {}

    def repo(r):
        name = f"bench/r{r:04d}"
        cfg, lay = client.upload(name, config), client.upload(name, layer)
        digests[name] = []
        for t in range(tags):
            body = json.dumps({
                "schemaVersion": 2, "mediaType": MEDIA,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg,
                           "size": len(config)},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": lay,
                            "size": len(layer)}],
                "annotations": {"n": str(t)},
            }).encode()
            status = client.request("PUT", f"/v2/{name}/manifests/t{t}", body, {"Content-Type": MEDIA})
            assert status == 201, f"{name}:t{t}: {status}"
            digests[name].append("sha256:" + hashlib.sha256(body).hexdigest())
    parallel(repo, range(repos), workers=8)
    return digests


def push_latencies(client, stop, out):
    """Pushes manifests to a repository no rule covers until `stop` is set; appends latencies (s)."""
    config = b'{"os":"linux"}'
    cfg = client.upload("bench/live", config)
    i = 0
    while not stop.is_set():
        i += 1
        body = json.dumps({"schemaVersion": 2, "mediaType": MEDIA,
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg,
                                      "size": len(config)},
                           "layers": [], "annotations": {"i": str(i)}}).encode()
        t0 = time.perf_counter()
        status = client.request("PUT", f"/v2/bench/live/manifests/l{i % 100}", body, {"Content-Type": MEDIA})
        out.append(time.perf_counter() - t0)
        assert status == 201


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))] * 1000 if values else float("nan")


def run_retention(server, client, dry):
    c0, t0 = bench.cpu_seconds(server.pid), time.perf_counter()
    status = client.request("POST", f"/admin/v1/retention/run?dry_run={'true' if dry else 'false'}")
    wall, cpu = time.perf_counter() - t0, bench.cpu_seconds(server.pid) - c0
    assert status == 200, status
    return wall, cpu


def deployment(binary, work, name, storage, repos, tags):
    server = bench.start_berth(binary, work, name, config=storage + RULES)
    try:
        client = Client(server.base)
        t0 = time.perf_counter()
        digests = fill(client, repos, tags)
        fill_secs = time.perf_counter() - t0
        # Pushes with nothing else going on, for the baseline.
        idle, stop = [], threading.Event()
        pusher = threading.Thread(target=push_latencies, args=(Client(server.base), stop, idle))
        pusher.start()
        time.sleep(3)
        stop.set()
        pusher.join()
        dry_wall, dry_cpu = run_retention(server, client, True)
        # Pin the oldest ten of every repository (what the rule would remove first).
        pins = [f"{name}@{d}" for name, ds in sorted(digests.items()) for d in ds[:PINNED_PER_REPO]]
        body = json.dumps({"images": pins, "ttl": "1h"}).encode()
        c0, t0 = bench.cpu_seconds(server.pid), time.perf_counter()
        status = client.request("PUT", "/admin/v1/in-use/bench", body, {"Content-Type": "application/json"})
        report_wall, report_cpu = time.perf_counter() - t0, bench.cpu_seconds(server.pid) - c0
        assert status == 200, status
        pinned_wall, pinned_cpu = run_retention(server, client, True)
        # The real run, with pushes going on beside it.
        during, stop = [], threading.Event()
        pusher = threading.Thread(target=push_latencies, args=(Client(server.base), stop, during))
        pusher.start()
        real_wall, real_cpu = run_retention(server, client, False)
        stop.set()
        pusher.join()
        left = json.loads(bench.fetch(server.base + "/v2/bench/r0000/tags/list"))["tags"]
        assert len(left) == min(tags, 50 + PINNED_PER_REPO), left
        return {
            "name": name, "repositories": repos, "tags": repos * tags,
            "removed": repos * max(0, tags - 50 - PINNED_PER_REPO), "pinned": len(pins),
            "fill_s": fill_secs, "dry_s": dry_wall, "dry_cpu_s": dry_cpu, "real_s": real_wall, "real_cpu_s": real_cpu,
            "report_s": report_wall, "report_cpu_s": report_cpu,
            "dry_pinned_s": pinned_wall, "dry_pinned_cpu_s": pinned_cpu,
            "push_idle_p50_ms": percentile(idle, 0.5), "push_idle_p99_ms": percentile(idle, 0.99),
            "push_during_p50_ms": percentile(during, 0.5), "push_during_p99_ms": percentile(during, 0.99),
            "pushes_during": len(during), "push_during_max_ms": max(during) * 1000 if during else float("nan"),
        }
    finally:
        server.stop()


def main():
    args = bench.deployment_args("100 repositories instead of 1,000")
    repos, tags = (100, 100) if args.quick else (1000, 100)
    results = bench.run_recorded(
        args, lambda name, storage: deployment(args.berth, args.work, name, storage, repos, tags))
    lines = [f"Machine: {results['machine']}; {bench.hash_line(results)}", "",
             "| deployment | tags / repos | removed | dry run | in-use report | dry run, pinned | real run (pinned) | "
             "push p50 / p99 idle | push p50 / p99 / max during the run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        lines.append(
            f"| {r['name']} | {r['tags']:,} / {r['repositories']:,} | {r['removed']:,} | "
            f"{r['dry_s']:.2f} s ({r['dry_cpu_s']:.2f} CPU-s) | "
            f"{r['pinned']:,} pins: {r['report_s']:.2f} s ({r['report_cpu_s']:.2f} CPU-s) | "
            f"{r['dry_pinned_s']:.2f} s ({r['dry_pinned_cpu_s']:.2f} CPU-s) | "
            f"{r['real_s']:.2f} s ({r['real_cpu_s']:.2f} CPU-s) | "
            f"{r['push_idle_p50_ms']:.1f} / {r['push_idle_p99_ms']:.1f} ms | "
            f"{r['push_during_p50_ms']:.1f} / {r['push_during_p99_ms']:.1f} / {r['push_during_max_ms']:.0f} ms "
            f"({r['pushes_during']} pushes) |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
