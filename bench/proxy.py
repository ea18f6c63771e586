#!/usr/bin/env python3
"""Benchmark of the pull-through cache (issue 26), side by side with the reference registry's
proxy mode on the same upstream.

The upstream is the reference registry (Debian's docker-registry, distribution 2.8) on its
filesystem, holding a large blob (1 GiB, 256 MiB with --quick), a second one for the concurrent
cold pulls, and a small tagged image. Measured, interleaved:

* the large blob pulled straight from the upstream (the ceiling a cache can reach);
* a cold pull of it through each cache (Berth embedded, Berth scale-out, the reference proxy):
  MB/s, the cache's CPU per GiB and its peak RSS during the pull (no buffering: bounded);
* a warm pull of it through each cache (a read from storage, the page cache dropped first when
  run as root), and Berth's own pull of another blob of that size pushed normally — WARM_ROUNDS
  rounds, the two alternating who goes first, medians reported (a virtual disk's speed drifts
  between reads: single reads minutes apart compare the disk, not the files);
* manifest GET by tag within tag_ttl (wrk, 10 s) through each cache;
* N concurrent cold pulls of the second blob: what the upstream served (bytes its process read,
  /proc/PID/io rchar) over the blob's size — 1.0 means one upstream fetch;
* the same cold pull with the upstream behind nginx at THROTTLE MB/s (a network-bound upstream,
  as a real one is): unthrottled on two shared cores, upstream, cache and client compete for the
  CPU, which bounds any cache below the upstream's own speed.

Run through `bench/run proxy [--quick]`. Standard library only (plus curl and wrk).
"""

import concurrent.futures
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

MiB = bench.MiB
MEDIA = "application/vnd.oci.image.manifest.v1+json"
CONCURRENT = 8
THROTTLE = 200  # MB/s
WARM_ROUNDS = 5


def throttled(work, upstream):
    """nginx in front of `upstream`, sending each response at THROTTLE MB/s; (process, base URL)."""
    nginx = bench.shutil.which("nginx") or "/usr/sbin/nginx"
    port = bench.free_port()
    root = os.path.join(work, "throttle")
    os.makedirs(os.path.join(root, "logs"), exist_ok=True)
    conf = os.path.join(root, "nginx.conf")
    host = upstream.base.split("://", 1)[1]
    with open(conf, "w") as f:
        f.write(f"""worker_processes 1; daemon off; pid {root}/nginx.pid; error_log {root}/logs/error.log;
events {{}}
http {{ access_log off; proxy_max_temp_file_size 0; proxy_http_version 1.1;
  server {{ listen 127.0.0.1:{port}; limit_rate {THROTTLE * 1000 * 1000};
    location / {{ proxy_pass http://{host}; proxy_set_header Host $http_host; }} }} }}
""")
    proc = subprocess.Popen([nginx, "-c", conf, "-p", root], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    bench.wait_http(base + "/v2/")
    return proc, base


def rchar(pid):
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    return 0


def upload_to_reference(server, repo, path, digest):
    """The reference registry takes a blob as POST, then PUT with the digest."""
    headers = bench.curl_headers("-X", "POST", f"{server.base}/v2/{repo}/blobs/uploads/")
    loc = bench.location(server, headers)
    code, _ = bench.curl("-X", "PUT", "-H", "Content-Type: application/octet-stream", "-T", path,
                         bench.with_query(loc, f"digest={digest}"))
    assert code == 201, f"upload to {repo}: {code}"


def small_image(server, work):
    """A tagged image of a small config and layer in the upstream; returns nothing."""
    parts = []
    for name, data in [("cfg", json.dumps({"architecture": "amd64", "os": "linux"}).encode()),
                       ("layer", os.urandom(4096))]:
        path = os.path.join(work, f"small-{name}")
        with open(path, "wb") as f:
            f.write(data)
        import hashlib
        d = "sha256:" + hashlib.sha256(data).hexdigest()
        upload_to_reference(server, "bench/img", path, d)
        parts.append((d, len(data)))
    body = json.dumps({
        "schemaVersion": 2, "mediaType": MEDIA,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": parts[0][0], "size": parts[0][1]},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": parts[1][0], "size": parts[1][1]}],
    }).encode()
    bench.put_manifest(server, "bench/img", "v1", body, MEDIA)


def pull(base, path, extra=()):
    """GET base+path to /dev/null; returns (MB/s, bytes)."""
    out = subprocess.run(["curl", "-sS", "-f", "-o", "/dev/null", "-w", "%{size_download} %{time_total}", *extra,
                          base + path], check=True, capture_output=True, text=True).stdout.split()
    size, seconds = int(out[0]), float(out[1])
    return size / MiB / seconds, size


def measured_pull(server, path, cold_read=False):
    """A pull through `server`, with its CPU and peak RSS during the pull. Dirty pages are
    flushed first, so a pull does not pay for the writeback of what came before; with `cold_read`
    (and root) the page cache is dropped too, so the bytes come from the disk."""
    subprocess.run(["sync"], check=True)
    if cold_read and os.access("/proc/sys/vm/drop_caches", os.W_OK):
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
    bench.reset_peak_rss(server.pid)
    c0 = bench.cpu_seconds(server.pid)
    rate, size = pull(server.base, path)
    cpu = bench.cpu_seconds(server.pid) - c0
    return {"mb_s": rate, "cpu_s_per_gib": cpu / (size / (1024 * MiB)), "peak_rss_mib": bench.peak_rss_mib(server.pid)}


def concurrent_cold(server, path, upstream, size):
    """CONCURRENT pulls at once of a blob no cache has yet; the upstream's bytes read over its size."""
    r0 = rchar(upstream.pid)
    with concurrent.futures.ThreadPoolExecutor(CONCURRENT) as pool:
        sizes = list(pool.map(lambda _: pull(server.base, path)[1], range(CONCURRENT)))
    assert all(s == size for s in sizes), sizes
    return (rchar(upstream.pid) - r0) / size


def main():
    args = bench.deployment_args("256 MiB instead of 1 GiB, 3 s loads")
    size = (256 if args.quick else 1024) * MiB
    seconds = 3 if args.quick else 10
    work = args.work
    big = os.path.join(work, "big.bin")
    big_digest = bench.make_file(big, size)
    second = os.path.join(work, "second.bin")
    second_digest = bench.make_file(second, 256 * MiB)
    own = os.path.join(work, "own.bin")
    own_digest = bench.make_file(own, size)

    upstream = bench.start_reference(work, name="upstream")
    try:
        upload_to_reference(upstream, "bench/big", big, big_digest)
        upload_to_reference(upstream, "bench/big", second, second_digest)
        small_image(upstream, work)
        blob = f"/v2/bench/big/blobs/{big_digest}"
        results = {**bench.machine_facts(args.berth), "size_mib": size // MiB, "concurrent": CONCURRENT, "caches": []}
        direct = [pull(upstream.base, blob)[0]]

        def caches(upstream_url, tag):
            proxy = f'[[proxy]]\nprefix = "up"\nupstream = "{upstream_url}"\ntag_ttl = "1h"\n'
            found = [("reference proxy", lambda: bench.start_reference(
                work, name=f"reference-proxy{tag}", proxy=upstream_url), "")]
            found.append(("berth embedded", lambda: bench.start_berth(
                args.berth, work, f"berth-embedded{tag}", config="[storage]\nfsync = false\n" + proxy), "/up"))
            if args.scale_out_env:
                found.append(("berth scale-out", lambda: bench.start_berth(
                    args.berth, work, f"berth-scale-out{tag}",
                    config=bench.scale_out_toml(args.scale_out_env) + proxy), "/up"))
            return found

        for name, start, prefix in caches(upstream.base, ""):
            server = start()
            try:
                row = {"cache": name}
                path = f"/v2{prefix}/bench/big/blobs/{big_digest}"
                row["cold"] = measured_pull(server, path)
                direct.append(pull(upstream.base, blob)[0])
                manifest = f"{server.base}/v2{prefix}/bench/img/manifests/v1"
                subprocess.run(["curl", "-sSf", "-o", "/dev/null", "-H", f"Accept: {MEDIA}", manifest], check=True)
                row["manifest_by_tag"] = bench.wrk(manifest, "GET", seconds, headers=[f"Accept: {MEDIA}"])
                row["concurrent_upstream_fetches"] = concurrent_cold(
                    server, f"/v2{prefix}/bench/big/blobs/{second_digest}", upstream, 256 * MiB)
                # Reads from storage: the cached blob, and (Berth) one of that size pushed normally,
                # alternating which goes first.
                reads = [("warm", path)]
                if name.startswith("berth"):
                    bench.push_monolithic(server, "local/big", own, own_digest)
                    reads.append(("own_pull", f"/v2/local/big/blobs/{own_digest}"))
                runs = {k: [] for k, _ in reads}
                for i in range(WARM_ROUNDS):
                    for key, p in (reads if i % 2 == 0 else reads[::-1]):
                        runs[key].append(measured_pull(server, p, cold_read=True))
                for key, measured in runs.items():
                    row[key] = sorted(measured, key=lambda m: m["mb_s"])[len(measured) // 2]
                    row[f"{key}_runs"] = [round(m["mb_s"]) for m in measured]
                results["caches"].append(row)
            finally:
                server.stop()
        # A network-bound upstream: the same cold pull at THROTTLE MB/s.
        nginx, slow = throttled(work, upstream)
        try:
            results["throttled"] = {"mb_s": THROTTLE, "direct": [], "caches": []}
            results["throttled"]["direct"].append(pull(slow, blob)[0])
            for name, start, prefix in caches(slow, "-throttled"):
                server = start()
                try:
                    cold = measured_pull(server, f"/v2{prefix}/bench/big/blobs/{big_digest}")
                    results["throttled"]["caches"].append({"cache": name, "cold": cold})
                finally:
                    server.stop()
                results["throttled"]["direct"].append(pull(slow, blob)[0])
        finally:
            nginx.terminate()
            nginx.wait()
        results["direct_mb_s"] = sorted(direct)[len(direct) // 2]
        results["direct_runs"] = direct
        results["upstream_manifest_by_tag"] = bench.wrk(
            f"{upstream.base}/v2/bench/img/manifests/v1", "GET", seconds, headers=[f"Accept: {MEDIA}"])
    finally:
        upstream.stop()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print(table(results))


def table(r):
    lines = [f"Pull-through cache, {r['size_mib']} MiB blob; {r['machine']}", "",
             f"Straight from the upstream: {r['direct_mb_s']:.0f} MB/s (median of {len(r['direct_runs'])}); "
             f"its manifest GET by tag: {r['upstream_manifest_by_tag']['rps']:.0f}/s", "",
             f"Warm and own pulls: medians of {WARM_ROUNDS} reads from the disk, interleaved.", "",
             "| cache | cold MB/s | cold vs upstream | cold CPU s/GiB | cold peak RSS MiB | warm MB/s | "
             "own pull MB/s | manifest GET by tag /s | upstream fetches for "
             f"{r['concurrent']} concurrent cold pulls |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in r["caches"]:
        own = c.get("own_pull", {}).get("mb_s")
        lines.append(
            f"| {c['cache']} | {c['cold']['mb_s']:.0f} | {c['cold']['mb_s'] / r['direct_mb_s']:.2f}× | "
            f"{c['cold']['cpu_s_per_gib']:.2f} | {c['cold']['peak_rss_mib']:.0f} | {c['warm']['mb_s']:.0f} | "
            f"{'-' if own is None else f'{own:.0f}'} | {c['manifest_by_tag']['rps']:.0f} | "
            f"{c['concurrent_upstream_fetches']:.2f} |")
    for c in r["caches"]:
        runs = ", ".join(f"{k} {c[k + '_runs']}" for k in ("warm", "own_pull") if k + "_runs" in c)
        lines.append(f"\n{c['cache']}, each read (MB/s): {runs}")
    t = r["throttled"]
    direct = sorted(t["direct"])[len(t["direct"]) // 2]
    lines += ["", f"Upstream behind nginx at {t['mb_s']} MB/s: straight {direct:.0f} MB/s (median of {len(t['direct'])})", "",
              "| cache | cold MB/s | cold vs upstream | cold CPU s/GiB | cold peak RSS MiB |", "|---|---|---|---|---|"]
    for c in t["caches"]:
        lines.append(f"| {c['cache']} | {c['cold']['mb_s']:.0f} | {c['cold']['mb_s'] / direct:.2f}× | "
                     f"{c['cold']['cpu_s_per_gib']:.2f} | {c['cold']['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
