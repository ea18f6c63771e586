#!/usr/bin/env python3
"""Benchmarks of the delete contract (issue 9), Berth embedded (SQLite + filesystem), with the
reference registry (CNCF distribution 2.8.2) beside it where it can do the same thing:

* manifest GET/HEAD by tag and by digest at 64 connections in a repository holding 10,000
  tombstones, next to the same in a repository without any, and next to the reference with the
  same 10,000 manifests deleted — the tombstone check must cost nothing measurable;
* DELETE by digest of a manifest that carries 1,000 tags, in a repository of 100,000 tags:
  latency percentiles over 100 such deletes (target: p99 < 20 ms);
* the delete preview of a repository of 10,000 manifests (target: < 1 s), and of one manifest.

Run through `bench/run deletes`, which installs the tools and builds Berth. Standard library only;
the load generators are wrk (GET) and ab (HEAD), as in bench.py, whose helpers this reuses.
"""

import argparse
import concurrent.futures
import http.client
import json
import os
import statistics
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (the shared helpers)

MEDIA = "application/vnd.oci.image.manifest.v1+json"

# A push with 1,000 `?tag=` parameters is answered with an `OCI-Tag` header per tag; Python's
# HTTP client stops at 100 headers by default.
http.client._MAXHEADERS = 100_000


def manifest_bytes(base, n):
    """A distinct manifest over the same two blobs: `base` with an annotation `n`."""
    body = json.loads(base)
    body["annotations"] = {"bench.n": str(n)}
    return json.dumps(body, separators=(",", ":")).encode()


def digest_of(body):
    import hashlib
    return "sha256:" + hashlib.sha256(body).hexdigest()


def request(method, url, body=None, headers=None):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    with urllib.request.urlopen(req) as r:
        r.read()
        return r.status


def parallel(fn, items, workers=8):
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(fn, items):
            pass


def mount_blobs(server, repo, base):
    body = json.loads(base)
    for d in [body["config"]["digest"]] + [layer["digest"] for layer in body["layers"]]:
        bench.curl("-X", "POST", f"{server.base}/v2/{repo}/blobs/uploads/?mount={d}&from=bench/manifests")


def push_and_delete(server, repo, base, count):
    """Pushes `count` distinct manifests into `repo` and deletes them all by digest."""
    mount_blobs(server, repo, base)

    def one(i):
        body = manifest_bytes(base, i)
        url = f"{server.base}/v2/{repo}/manifests/{digest_of(body)}"
        assert request("PUT", url, body, {"Content-Type": MEDIA}) == 201
        assert request("DELETE", url) == 202
    parallel(one, range(count))


def load(server, repo, ref, seconds):
    url = f"{server.base}/v2/{repo}/manifests/{ref}"
    out = {}
    for method in ["GET", "HEAD"]:
        bench.reset_peak_rss(server.pid)
        c0 = bench.cpu_seconds(server.pid)
        accept = f"Accept: {MEDIA}"
        r = bench.wrk(url, "GET", seconds, headers=[accept]) if method == "GET" else \
            bench.ab_head(url, seconds, headers=[accept])
        r["cpu_ms_per_req"] = (bench.cpu_seconds(server.pid) - c0) * 1000 / max(r["total"], 1)
        assert r["errors"] == 0, f"{server.name} {method} {url}: {r['errors']} errors"
        out[method] = r
    return out


def percentile(values, p):
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--berth", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", help="JSON results file")
    ap.add_argument("--quick", action="store_true", help="smaller sizes, shorter loads")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    tombstones = 1000 if args.quick else 10_000
    seconds = 3 if args.quick else 10
    manifests_with_tags, tags_each = (20, 100) if args.quick else (100, 1000)
    preview_size = 1000 if args.quick else 10_000

    berth = bench.start_berth(args.berth, args.work, "berth")
    reference = bench.start_reference(args.work)
    results = {**bench.machine_facts(args.berth),
               "tombstones": tombstones, "tags": manifests_with_tags * tags_each, "tags_each": tags_each,
               "preview_size": preview_size}
    try:
        base, _ = bench.tiny_image_manifest([berth, reference])
        live = manifest_bytes(base, -1)
        print(f"==> {tombstones} manifests pushed and deleted in each registry", file=sys.stderr)
        for server in [berth, reference]:
            push_and_delete(server, "bench/tomb", base, tombstones)
            mount_blobs(server, "bench/clean", base)
            for repo in ["bench/tomb", "bench/clean"]:
                assert request("PUT", f"{server.base}/v2/{repo}/manifests/live", live, {"Content-Type": MEDIA}) == 201

        print("==> manifest GET/HEAD (interleaved)", file=sys.stderr)
        loads = {}
        for ref_kind, ref in [("tag", "live"), ("digest", digest_of(live))]:
            loads[f"berth_tombstones_{ref_kind}"] = load(berth, "bench/tomb", ref, seconds)
            loads[f"berth_clean_{ref_kind}"] = load(berth, "bench/clean", ref, seconds)
            loads[f"reference_deleted_{ref_kind}"] = load(reference, "bench/tomb", ref, seconds)
        results["manifest_loads"] = loads

        print(f"==> DELETE of manifests with {tags_each} tags each "
              f"({manifests_with_tags * tags_each} tags in the repository)", file=sys.stderr)
        repo = "bench/manytags"
        mount_blobs(berth, repo, base)
        digests = []
        for m in range(manifests_with_tags):
            body = manifest_bytes(base, 1_000_000 + m)
            digests.append(digest_of(body))
            # OCI 1.1 `?tag=`: a thousand tags in one push.
            query = "&".join(f"tag=m{m:03d}-t{t:04d}" for t in range(tags_each))
            url = f"{berth.base}/v2/{repo}/manifests/{digests[-1]}?{query}"
            assert request("PUT", url, body, {"Content-Type": MEDIA}) == 201
        latencies = []
        c0 = bench.cpu_seconds(berth.pid)
        for d in digests:
            t0 = time.perf_counter()
            assert request("DELETE", f"{berth.base}/v2/{repo}/manifests/{d}") == 202
            latencies.append((time.perf_counter() - t0) * 1000)
        results["delete_many_tags"] = {
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
            "max_ms": max(latencies), "mean_ms": statistics.mean(latencies),
            "cpu_ms_per_delete": (bench.cpu_seconds(berth.pid) - c0) * 1000 / len(digests),
        }

        print(f"==> delete preview of a repository of {preview_size} manifests", file=sys.stderr)
        repo = "bench/preview"
        mount_blobs(berth, repo, base)

        def push(i):
            body = manifest_bytes(base, 2_000_000 + i)
            url = f"{berth.base}/v2/{repo}/manifests/{digest_of(body)}" + ("?tag=t%05d" % i if i % 10 == 0 else "")
            assert request("PUT", url, body, {"Content-Type": MEDIA}) == 201
        parallel(push, range(preview_size))
        one = digest_of(manifest_bytes(base, 2_000_000))
        results["preview_repository_ms"] = bench.median_ms(
            lambda: bench.fetch(f"{berth.base}/admin/v1/preview/{repo}"), n=5)
        results["preview_manifest_ms"] = bench.median_ms(
            lambda: bench.fetch(f"{berth.base}/admin/v1/preview/{repo}@{one}"), n=15)
        preview = json.loads(bench.fetch(f"{berth.base}/admin/v1/preview/{repo}"))
        assert len(preview["manifests"]) == preview_size, preview.keys()
    finally:
        berth.stop()
        reference.stop()

    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print(table(results))


def table(r):
    lines = [f"Machine: {r['machine']}; {bench.hash_line(r)}.", "",
             f"Manifest reads at 64 connections; Berth's repository holds {r['tombstones']} tombstones "
             f"(the reference: the same manifests deleted).", "",
             "| read | Berth, tombstones | Berth, none | reference | Berth ÷ reference |",
             "|---|---|---|---|---|"]
    loads = r["manifest_loads"]
    for kind in ["tag", "digest"]:
        for method in ["GET", "HEAD"]:
            t = loads[f"berth_tombstones_{kind}"][method]
            c = loads[f"berth_clean_{kind}"][method]
            ref = loads[f"reference_deleted_{kind}"][method]

            def cell(x):
                return f"{x['rps']:.0f} req/s, p99 {x['p99']:.1f} ms, {x['cpu_ms_per_req']:.3f} CPU-ms/req"
            lines.append(f"| {method} by {kind} | {cell(t)} | {cell(c)} | {cell(ref)} | {t['rps'] / ref['rps']:.1f}× |")
    d = r["delete_many_tags"]
    lines += ["", f"DELETE by digest of a manifest with {r['tags_each']} tags in a repository of {r['tags']} tags "
              f"(Berth, SQLite): p50 {d['p50_ms']:.1f} ms, p99 {d['p99_ms']:.1f} ms, max {d['max_ms']:.1f} ms, "
              f"{d['cpu_ms_per_delete']:.1f} CPU-ms per delete.",
              f"Delete preview: repository of {r['preview_size']} manifests {r['preview_repository_ms']:.0f} ms; "
              f"one manifest {r['preview_manifest_ms']:.1f} ms (medians)."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
