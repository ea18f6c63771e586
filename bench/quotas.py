#!/usr/bin/env python3
"""Benchmarks of quotas (issue 28), on the embedded deployment and (with --scale-out-env) the
scale-out one:

* blob upload (a one-request `POST ?digest=` of a distinct 1 KiB blob) and manifest PUT (a
  distinct manifest by tag) with no quota and with two quotas covering the repository (a team's
  and a registry-wide one) — two Berths side by side, the rounds interleaved, alternating which
  goes first (target: within noise: the flush is a few statements in a transaction that already
  writes);
* the usage of a scope holding 100,000 manifests (10,000 with --quick), read through
  `GET /admin/v1/quotas/RULE` (target < 10 ms: one kept row, never a count).

Run through `bench/run quotas`.
"""

import concurrent.futures
import hashlib
import json
import os
import statistics
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402
import deletes  # noqa: E402

MEDIA = "application/vnd.oci.image.manifest.v1+json"
request, manifest_bytes, mount = deletes.request, deletes.manifest_bytes, deletes.mount_blobs

QUOTAS = ('[[quotas]]\nname = "team"\nrepositories = "bench/**"\nmax_bytes = "10TB"\n'
          '[[quotas]]\nname = "all"\nrepositories = "**"\nmax_bytes = "100TB"\n')


def timed(server, fn, items, workers=8):
    """Runs `fn` over `items` on `workers` threads; (ops/s, server CPU-ms per op)."""
    c0 = bench.cpu_seconds(server.pid)
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(fn, items))
    elapsed = time.perf_counter() - t0
    return len(items) / elapsed, (bench.cpu_seconds(server.pid) - c0) * 1000 / len(items)


def blob(i):
    return hashlib.sha256(str(i).encode()).digest() * 32  # 1 KiB, distinct per i


def upload(server, repo, i):
    body = blob(i)
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    assert request("POST", f"{server.base}/v2/{repo}/blobs/uploads/?digest={digest}", body) == 201


def put(server, repo, base, i):
    assert request("PUT", f"{server.base}/v2/{repo}/manifests/t{i % 50}", manifest_bytes(base, i),
                   {"Content-Type": MEDIA}) == 201


def run_deployment(args, name, storage):
    if "scale-out" in name:
        def fresh():
            return bench.scale_out_toml(args.scale_out_env)
    else:
        def fresh():
            return storage
    quick = args.quick
    per_round = 300 if quick else 2000
    rounds = 4 if quick else 6
    out = {"name": name}
    servers = {"none": bench.start_berth(args.berth, args.work, f"{name}-none", config=fresh()),
               "quotas": bench.start_berth(args.berth, args.work, f"{name}-quotas", config=fresh() + QUOTAS)}
    try:
        base, _ = bench.tiny_image_manifest(list(servers.values()))
        for s in servers.values():
            mount(s, "bench/q", base)
        runs = {k: {"upload": [], "put": []} for k in servers}
        print(f"==> {name}: {rounds} alternating rounds of {per_round} uploads and manifest PUTs", file=sys.stderr)
        for r in range(rounds):
            order = ["none", "quotas"] if r % 2 == 0 else ["quotas", "none"]
            for k in order:
                s = servers[k]
                items = list(range(r * per_round, (r + 1) * per_round))
                runs[k]["upload"].append(timed(s, lambda i, s=s: upload(s, "bench/q", i), items))
                runs[k]["put"].append(timed(s, lambda i, s=s: put(s, "bench/q", base, i), items))
        for k, v in runs.items():
            out[k] = {op: {"per_s": statistics.median(p for p, _ in v[op]),
                           "cpu_ms": statistics.median(c for _, c in v[op]),
                           "cpu_ms_each": [round(c, 3) for _, c in v[op]]} for op in ("upload", "put")}
        kept = json.loads(urllib.request.urlopen(f"{servers['quotas'].base}/admin/v1/quotas/team").read())
        out["kept_after_rounds"] = kept["quotas"][0]
    finally:
        for s in servers.values():
            s.stop()

    manifests = 10_000 if quick else 100_000
    print(f"==> {name}: the usage of a scope of {manifests} manifests", file=sys.stderr)
    server = bench.start_berth(args.berth, args.work, f"{name}-big",
                               config=fresh() + '[[quotas]]\nname = "big"\nrepositories = "big/**"\nmax_bytes = "1TB"\n')
    try:
        base, _ = bench.tiny_image_manifest([server])
        repos = 100
        for r in range(repos):
            mount(server, f"big/r{r:03d}", base)

        def one(i):
            body = manifest_bytes(base, 50_000_000 + i)
            assert request("PUT", f"{server.base}/v2/big/r{i % repos:03d}/manifests/sha256:{hashlib.sha256(body).hexdigest()}",
                           body, {"Content-Type": MEDIA}) == 201

        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(manifests)))
        fill_s = time.perf_counter() - t0
        url = f"{server.base}/admin/v1/quotas/big"
        times = []
        for _ in range(200):
            t = time.perf_counter()
            status = json.loads(urllib.request.urlopen(url).read())["quotas"][0]
            times.append((time.perf_counter() - t) * 1000)
        times.sort()
        out["big"] = {"manifests": manifests, "repositories": repos, "fill_s": fill_s,
                      "used_bytes": status["used_bytes"], "used_repositories": status["used_repositories"],
                      "read_p50_ms": times[len(times) // 2], "read_p99_ms": times[int(len(times) * 0.99) - 1],
                      "read_max_ms": times[-1]}
    finally:
        server.stop()
    return out


def table(r):
    lines = [f"Machine: {r['machine']}; {bench.hash_line(r)}.", ""]
    for d in r["runs"]:
        none, quotas = d["none"], d["quotas"]
        lines += [f"### {d['name']}", "",
                  "No quota against two quotas covering the repository (alternating rounds, medians; the "
                  "per-round CPU in brackets):", "",
                  "| quotas | upload/s | CPU-ms/upload | manifest PUT/s | CPU-ms/PUT |", "|---|---|---|---|---|"]
        for k, e in (("none", none), ("two", quotas)):
            lines.append(f"| {k} | {e['upload']['per_s']:.0f} | {e['upload']['cpu_ms']:.3f} {e['upload']['cpu_ms_each']} | "
                         f"{e['put']['per_s']:.0f} | {e['put']['cpu_ms']:.3f} {e['put']['cpu_ms_each']} |")
        ratio = lambda op, key: quotas[op][key] / none[op][key]  # noqa: E731
        big = d["big"]
        lines += ["", f"Ratios (two quotas / none): upload/s {ratio('upload', 'per_s'):.2f}×, CPU/upload "
                  f"{ratio('upload', 'cpu_ms'):.2f}×; PUT/s {ratio('put', 'per_s'):.2f}×, CPU/PUT {ratio('put', 'cpu_ms'):.2f}×.",
                  f"Scope of {big['manifests']} manifests in {big['repositories']} repositories (filled in "
                  f"{big['fill_s']:.0f} s; {big['used_bytes']} bytes kept): `GET /admin/v1/quotas/big` p50 "
                  f"{big['read_p50_ms']:.2f} ms, p99 {big['read_p99_ms']:.2f} ms, max {big['read_max_ms']:.2f} ms.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    bench.main_on_each_deployment("shorter loads, 10,000 manifests", run_deployment, table)
