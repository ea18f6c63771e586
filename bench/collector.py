#!/usr/bin/env python3
"""Benchmarks of the online collector (issue 10):

* collecting 1,000 deleted images (each a unique config and a unique 64 KiB layer) in a store of
  1,000 images and in one of 100,000: wall time and CPU of `berth gc run` must not grow with the
  store, while `berth serve` keeps answering manifest GETs (measured during the collection);
* the reclaim rate — blobs and bytes collected per second once due — on the filesystem (SQLite)
  and on S3 (PostgreSQL + Garage);
* the price of the bookkeeping: manifest GET/HEAD requests/s and a 1 GiB push with the
  collector running (its workers, the sweep and the scrub) against switched off, with the
  reference registry beside them for the targets' ratios.

Run through `bench/run gc [--quick]`, which installs the tools, builds Berth and starts PostgreSQL
and Garage. Standard library only; the load generators are wrk and ab, as in bench.py.
"""

import argparse
import concurrent.futures
import hashlib
import http.client
import json
import os
import resource
import subprocess
import sys
import threading
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (the shared helpers)

MEDIA = "application/vnd.oci.image.manifest.v1+json"
WINDOWS = 3  # seconds: restore window, untagged grace and blob grace of the collection runs
GC = f"""
[gc]
enabled = false
restore_window = "{WINDOWS}s"
untagged_grace = "{WINDOWS}s"
blob_grace = "{WINDOWS}s"
"""


def digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Client:
    """Keep-alive HTTP connections, one per thread."""

    def __init__(self, base):
        self.netloc = urllib.parse.urlsplit(base).netloc
        self.local = threading.local()

    def request(self, method, path, body=None, headers=None):
        for attempt in range(2):
            conn = getattr(self.local, "conn", None)
            if conn is None:
                conn = self.local.conn = http.client.HTTPConnection(self.netloc, timeout=60)
            try:
                conn.request(method, path, body=body, headers=headers or {})
                r = conn.getresponse()
                r.read()
                return r.status
            except (http.client.HTTPException, ConnectionError):
                self.local.conn = None
                if attempt:
                    raise

    def upload(self, repo, data):
        d = digest(data)
        status = self.request("POST", f"/v2/{repo}/blobs/uploads/?digest={d}", data,
                              {"Content-Type": "application/octet-stream"})
        assert status == 201, f"upload to {repo}: {status}"
        return d

    def image(self, repo, tag, config, layer_digest, layer_size):
        body = json.dumps({
            "schemaVersion": 2, "mediaType": MEDIA,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": self.upload(repo, config), "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": layer_digest, "size": layer_size}],
        }).encode()
        status = self.request("PUT", f"/v2/{repo}/manifests/{tag}", body, {"Content-Type": MEDIA})
        assert status == 201, f"manifest {repo}:{tag}: {status}"
        return digest(body)


def parallel(fn, items, workers=12):
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def fill(server, count):
    """`count` tagged images sharing one layer, each with its own config blob."""
    client = Client(server.base)
    layer = os.urandom(1024)
    layer_digest = client.upload("bench/fill", layer)
    parallel(lambda i: client.image("bench/fill", f"f{i}", b'{"fill":%d}' % i, layer_digest, len(layer)),
             range(count))


def push_victims(server, count, layer_size):
    """`count` tagged images, each with a unique config and a unique layer; returns their digests."""
    client = Client(server.base)

    def one(i):
        layer = os.urandom(layer_size)
        return client.image("bench/victims", f"v{i}", b'{"victim":%d}' % i, client.upload("bench/victims", layer),
                            layer_size)
    return parallel(one, range(count))


def gc_run(binary, server):
    """Runs `berth gc run --json` on the server's deployment: (report, wall s, CPU s)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run([binary, "gc", "run", "--json", "--config", server.config, "--data-dir", server.data],
                         check=True, capture_output=True, text=True).stdout
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return json.loads(out), wall, cpu


def stored_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def start(binary, work, name, config):
    server = bench.start_berth(binary, work, name, config=config)
    server.config = os.path.join(work, f"{name}.toml")
    server.data = os.path.join(work, name)
    return server


def collection(binary, work, name, store_size, victims, layer_size, storage_config, load_secs):
    """Fills a store, deletes `victims` images and measures the collection that follows."""
    server = start(binary, work, name, storage_config + GC)
    try:
        print(f"==> {name}: {store_size} images, then {victims} more to delete", file=sys.stderr)
        t0 = time.perf_counter()
        fill(server, store_size)
        digests = push_victims(server, victims, layer_size)
        fill_secs = time.perf_counter() - t0
        # The pushes' own reviews (every blob is reviewed once its grace passes) drain first, so
        # the measured pass does only the deletes' work.
        time.sleep(WINDOWS + 0.5)
        backlog, backlog_wall, backlog_cpu = gc_run(binary, server)
        client = Client(server.base)
        parallel(lambda d: client.request("DELETE", f"/v2/bench/victims/manifests/{d}"), digests)
        time.sleep(WINDOWS + 0.5)
        before = stored_bytes(server.blob_dir) if server.blob_dir and os.path.isdir(server.blob_dir) else None
        url = f"{server.base}/v2/bench/fill/manifests/f0"
        accept = [f"Accept: {MEDIA}"]
        quiet = bench.wrk(url, "GET", load_secs, headers=accept)
        # The same load again, with the collection running in its middle.
        during = {}
        loader = threading.Thread(target=lambda: during.update(bench.wrk(url, "GET", load_secs, headers=accept)))
        loader.start()
        time.sleep(1)
        report, wall, cpu = gc_run(binary, server)
        loader.join()
        after = stored_bytes(server.blob_dir) if before is not None else None
        assert report["manifests"] == victims and report["blobs"] == 2 * victims, report
        # `berth gc space`, derived on read: its cost on this store.
        space_total_ms = bench.median_ms(lambda: bench.fetch(f"{server.base}/admin/v1/space"), n=5)
        space_repo_ms = bench.median_ms(lambda: bench.fetch(f"{server.base}/admin/v1/space/bench/fill"), n=5)
        space = json.loads(bench.fetch(f"{server.base}/admin/v1/space"))
        assert quiet["errors"] == 0 and during["errors"] == 0
        return {"store": store_size, "victims": victims, "fill_secs": fill_secs,
                "backlog": {"reviews": backlog["reviews"], "wall_s": backlog_wall, "cpu_s": backlog_cpu},
                "report": report, "wall_s": wall, "cpu_s": cpu,
                "get_quiet": quiet, "get_during": during,
                "disk_before": before, "disk_after": after,
                "space_total_ms": space_total_ms, "space_repo_ms": space_repo_ms, "space": space}
    finally:
        server.stop()


def bookkeeping(binary, work, big_path, big_digest, load_secs):
    """Manifest reads and a push with the collector on and off, and the reference beside them."""
    on = start(binary, work, "berth-gc-on", '[storage]\nfsync = false\n[gc]\nsweep_interval = "5s"\n')
    off = start(binary, work, "berth-gc-off", "[storage]\nfsync = false\n[gc]\nenabled = false\n")
    reference = bench.start_reference(work)
    servers = [on, off, reference]
    out = {s.name: {} for s in servers}
    try:
        manifest, media = bench.tiny_image_manifest(servers)
        for s in servers:
            bench.tag_many(s, "bench/reads", manifest, media, 1)
        accept = [f"Accept: {media}"]
        for round_ in range(2):
            for s in servers:
                url = f"{s.base}/v2/bench/reads/manifests/t00000"
                for method in ["GET", "HEAD"]:
                    c0 = bench.cpu_seconds(s.pid)
                    r = bench.wrk(url, "GET", load_secs, headers=accept) if method == "GET" else \
                        bench.ab_head(url, load_secs, headers=accept)
                    r["cpu_ms_per_req"] = (bench.cpu_seconds(s.pid) - c0) * 1000 / max(r["total"], 1)
                    assert r["errors"] == 0, (s.name, method, r)
                    out[s.name].setdefault(method, []).append(r)
                wall, cpu = bench.measured(s, lambda: bench.push_monolithic(s, f"bench/push{round_}", big_path,
                                                                            big_digest))
                size = os.path.getsize(big_path)
                out[s.name].setdefault("push", []).append(
                    {"MBps": size / wall / 1e6, "cpu_s_per_GB": cpu / (size / 1e9)})
    finally:
        for s in servers:
            s.stop()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--berth", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--scale-out-env", help="file of KEY=VALUE lines: BERTH_TEST_PG_URL and BERTH_TEST_S3_*")
    ap.add_argument("--out", help="JSON results file")
    ap.add_argument("--quick", action="store_true", help="smaller sizes, shorter loads")
    ap.add_argument("--bookkeeping-only", action="store_true", help="only the collector on/off comparison")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    small, large = (1000, 10_000) if args.quick else (1000, 100_000)
    victims = 200 if args.quick else 1000
    layer = 64 * 1024
    load_secs = 3 if args.quick else 8
    fs = "[storage]\nfsync = false\n"
    results = {**bench.machine_facts(args.berth), "layer_bytes": layer}
    if not args.bookkeeping_only:
        results["collections"] = [
            collection(args.berth, args.work, "berth-small", small, victims, layer, fs, load_secs),
            collection(args.berth, args.work, "berth-large", large, victims, layer, fs, load_secs),
        ]
        if args.scale_out_env:
            s3 = bench.scale_out_toml(args.scale_out_env)
            results["s3_collection"] = collection(args.berth, args.work, "berth-s3", small, victims, layer, s3,
                                                  load_secs)
    big = os.path.join(args.work, "big.bin")
    big_digest = bench.make_file(big, (256 if args.quick else 1024) * bench.MiB)
    results["push_bytes"] = os.path.getsize(big)
    results["bookkeeping"] = bookkeeping(args.berth, args.work, big, big_digest, load_secs)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print(table(results))


def table(r):
    lines = [f"Machine: {r['machine']}; {bench.hash_line(r)}.", ""]
    if "collections" in r:
        lines += collection_table(r)
    lines += bookkeeping_table(r)
    return "\n".join(lines)


def collection_table(r):
    lines = ["Collecting deleted images (each a unique config and a unique "
             f"{r['layer_bytes'] // 1024} KiB layer) with `berth gc run`, while `berth serve` answers "
             "manifest GETs at 64 connections:", "",
             "| deployment | images stored | deleted | wall | CPU | per image | reclaim rate | GET req/s quiet → during | GET p99 quiet → during |",
             "|---|---|---|---|---|---|---|---|---|"]
    rows = [("embedded", c) for c in r["collections"]]
    if "s3_collection" in r:
        rows.append(("scale-out (PostgreSQL + S3)", r["s3_collection"]))
    for name, c in rows:
        rep = c["report"]
        lines.append(
            f"| {name} | {c['store'] + c['victims']:,} | {c['victims']:,} | {c['wall_s']:.2f} s | {c['cpu_s']:.2f} s | "
            f"{c['cpu_s'] * 1000 / c['victims']:.2f} CPU-ms | {rep['blobs'] / c['wall_s']:.0f} blobs/s, "
            f"{rep['bytes'] / c['wall_s'] / 1e6:.1f} MB/s | {c['get_quiet']['rps']:.0f} → {c['get_during']['rps']:.0f} | "
            f"{c['get_quiet']['p99']:.1f} → {c['get_during']['p99']:.1f} ms |")
    small, large = r["collections"]
    lines += ["", f"Large store ÷ small store: wall {large['wall_s'] / small['wall_s']:.2f}×, "
              f"CPU {large['cpu_s'] / small['cpu_s']:.2f}× (target: within 1.2×)."]
    for name, c in rows:
        if c["disk_before"] is not None:
            lines.append(f"{name}, {c['store']:,} images: blob storage {c['disk_before'] / 1e6:.1f} MB → "
                         f"{c['disk_after'] / 1e6:.1f} MB.")
    for name, c in rows:
        if "space_total_ms" in c:
            lines.append(f"{name}, {c['store'] + c['victims']:,} images: `gc space` whole registry "
                         f"{c['space_total_ms']:.0f} ms, the filled repository {c['space_repo_ms']:.0f} ms "
                         f"(medians; {c['space']['blobs']:,} blobs, {c['space']['bytes_stored']:,} bytes stored).")
    return lines + [""]


def bookkeeping_table(r):
    b = r["bookkeeping"]

    def best(s, k, key):
        return max(b[s][k], key=lambda x: x[key])
    ref_get, ref_head, ref_push = (best("reference", "GET", "rps"), best("reference", "HEAD", "rps"),
                                   best("reference", "push", "MBps"))
    size = "1 GiB" if r.get("push_bytes", 0) >= 1 << 30 else "256 MiB"
    lines = ["Collector on (workers, sweep every 5 s, scrub) against off; best of two interleaved rounds:", "",
             f"| | manifest GET | manifest HEAD | push {size} |", "|---|---|---|---|"]
    for s in ["berth-gc-on", "berth-gc-off", "reference"]:
        g, h, p = best(s, "GET", "rps"), best(s, "HEAD", "rps"), best(s, "push", "MBps")
        lines.append(f"| {s} | {g['rps']:.0f} req/s ({g['rps'] / ref_get['rps']:.1f}×), {g['cpu_ms_per_req']:.3f} CPU-ms | "
                     f"{h['rps']:.0f} req/s ({h['rps'] / ref_head['rps']:.1f}×), {h['cpu_ms_per_req']:.3f} CPU-ms | "
                     f"{p['MBps']:.0f} MB/s ({p['MBps'] / ref_push['MBps']:.1f}×), {p['cpu_s_per_GB']:.2f} CPU-s/GB |")
    return lines


if __name__ == "__main__":
    main()
