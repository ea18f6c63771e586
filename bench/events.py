#!/usr/bin/env python3
"""Benchmarks of events (issue 27), on the embedded deployment and (with --scale-out-env) the
scale-out one:

* manifest push, delete by digest and manifest GET with none, one and three webhook endpoints
  configured — three Berths side by side, the rounds interleaved, and with BENCH_BASELINE set to
  the `berth` built before events, that one beside them (target: within noise: the event row is
  one more insert in a transaction that already writes);
* delivery lag (the sink's receive time minus the event's time) at about 1,000 events/s;
* a retention run removing 50,000 tags (5,000 with --quick): from the run's answer to the last
  event at the sink, and in how many requests.

The sinks are threads of this script answering 200 to everything. Run through `bench/run events`.
"""

import concurrent.futures
import http.client
import json
import os
import statistics
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402
import deletes  # noqa: E402

MEDIA = "application/vnd.oci.image.manifest.v1+json"

# A push with 1,000 `?tag=` parameters is answered with an `OCI-Tag` header per tag.
http.client._MAXHEADERS = 100_000


class Sink:
    """A webhook receiver: counts events, and with `keep` records (receive time, event)."""

    def __init__(self, keep=False):
        self.keep = keep
        self.lock = threading.Lock()
        self.count = 0
        self.requests = 0
        self.received = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                now = time.time()
                events = json.loads(body)
                events = events if isinstance(events, list) else [events]
                with sink.lock:
                    sink.count += len(events)
                    sink.requests += 1
                    if sink.keep:
                        sink.received.extend((now, e) for e in events)
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_count(self, n, timeout=300):
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self.lock:
                if self.count >= n:
                    return time.time()
            time.sleep(0.005)
        raise SystemExit(f"sink got {self.count} of {n} events")


def endpoints(sinks, extra=""):
    return "".join(f'[[events.endpoints]]\nname = "e{i}"\nurl = "{s.url}"\n{extra}\n' for i, s in enumerate(sinks))


# The delete benchmarks' helpers: distinct tiny manifests over the same blobs, and requests.
request, manifest_bytes, digest_of, mount = deletes.request, deletes.manifest_bytes, deletes.digest_of, deletes.mount_blobs


def timed(server, fn, items, workers=8):
    """Runs `fn` over `items` on `workers` threads; (ops/s, server CPU-ms per op)."""
    c0 = bench.cpu_seconds(server.pid)
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(fn, items))
    elapsed = time.perf_counter() - t0
    return len(items) / elapsed, (bench.cpu_seconds(server.pid) - c0) * 1000 / len(items)


def push_and_delete(server, repo, base, first, count):
    """Pushes manifests `first`..`first + count` by tag (50 tags, each moved on by the next push)
    and deletes by digest all but the last 50, untagged by then; the (ops/s, CPU-ms/op) of each."""
    def one_push(i):
        body = manifest_bytes(base, i)
        assert request("PUT", f"{server.base}/v2/{repo}/manifests/t{i % 50}", body, {"Content-Type": MEDIA}) == 201

    def one_delete(i):
        assert request("DELETE", f"{server.base}/v2/{repo}/manifests/{digest_of(manifest_bytes(base, i))}") == 202

    items = list(range(first, first + count))
    return timed(server, one_push, items), timed(server, one_delete, items[:-50])


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))]


def write_cost(args, name, fresh, base_rounds=6):
    """The build before events (BENCH_BASELINE) against this one with no endpoint, alone on the
    machine, rounds alternating which goes first: what writing the event rows costs a push and a
    delete."""
    servers = {"before": bench.start_berth(os.environ["BENCH_BASELINE"], args.work, f"{name}-before", config=fresh()),
               "events": bench.start_berth(args.berth, args.work, f"{name}-events", config=fresh())}
    per_round = 300 if args.quick else 2000
    runs = {k: {"push": [], "delete": []} for k in servers}
    try:
        base, _ = bench.tiny_image_manifest(list(servers.values()))
        for s in servers.values():
            mount(s, "bench/ab", base)
        print(f"==> {name}: the cost of the event rows, {base_rounds} alternating rounds", file=sys.stderr)
        for r in range(base_rounds):
            order = ["before", "events"] if r % 2 == 0 else ["events", "before"]
            for k in order:
                s = servers[k]
                first = r * per_round

                pushed, deleted = push_and_delete(s, "bench/ab", base, first, per_round)
                runs[k]["push"].append(pushed)
                runs[k]["delete"].append(deleted)
    finally:
        for s in servers.values():
            s.stop()
    return {k: {op: {"per_s": statistics.median(p for p, _ in v[op]), "cpu_ms": statistics.median(c for _, c in v[op]),
                     "cpu_ms_each": [round(c, 3) for _, c in v[op]]}
                for op in ("push", "delete")} for k, v in runs.items()}


def run_deployment(args, name, storage):
    """`storage` is the embedded deployment's section; the scale-out one gets a fresh database
    and prefix per server (each Berth its own registry)."""
    if "scale-out" in name:
        def fresh():
            return bench.scale_out_toml(args.scale_out_env)
    else:
        def fresh():
            return storage
    out = {"name": name}
    if os.environ.get("BENCH_BASELINE"):
        out["write_cost"] = write_cost(args, name, fresh)
        if os.environ.get("BENCH_WRITE_COST_ONLY"):
            return out
    quick = args.quick
    per_round = 300 if quick else 2000
    rounds = 3
    sinks = {n: [Sink() for _ in range(n)] for n in (0, 1, 3)}
    servers = {n: bench.start_berth(args.berth, args.work, f"{name}-{n}", config=fresh() + endpoints(sinks[n]))
               for n in (0, 1, 3)}
    try:
        base, _ = bench.tiny_image_manifest(list(servers.values()))
        for s in servers.values():
            mount(s, "bench/ev", base)
        push = {n: [] for n in servers}
        delete = {n: [] for n in servers}
        get = {n: [] for n in servers}
        seconds = 3 if quick else 5
        print(f"==> {name}: {rounds} interleaved rounds of {per_round} pushes and deletes", file=sys.stderr)
        for r in range(rounds):
            for n, s in servers.items():
                first = r * per_round

                pushed, deleted = push_and_delete(s, "bench/ev", base, first, per_round)
                push[n].append(pushed)
                delete[n].append(deleted)
                url = f"{s.base}/v2/bench/ev/manifests/t{(first + per_round - 1) % 50}"
                g = bench.wrk(url, "GET", seconds, headers=[f"Accept: {MEDIA}"])
                get[n].append(g["rps"])
        for n in servers:
            out[f"endpoints_{n}"] = {
                "push_per_s": statistics.median(p for p, _ in push[n]),
                "push_cpu_ms": statistics.median(c for _, c in push[n]),
                "delete_per_s": statistics.median(p for p, _ in delete[n]),
                "delete_cpu_ms": statistics.median(c for _, c in delete[n]),
                "get_per_s": statistics.median(get[n]),
            }
        # Every event reached every sink.
        # Each push writes manifest.pushed and tag.set (the tag moves); each delete one
        # manifest.deleted. Every sink gets every event.
        written = rounds * (2 * per_round + (per_round - 50))
        for n in (1, 3):
            for sink in sinks[n]:
                sink.wait_count(written)
    finally:
        for s in servers.values():
            s.stop()

    print(f"==> {name}: delivery lag at ~1,000 events/s", file=sys.stderr)
    sink = Sink(keep=True)
    server = bench.start_berth(args.berth, args.work, f"{name}-lag", config=fresh() + endpoints([sink]))
    try:
        base, _ = bench.tiny_image_manifest([server])
        mount(server, "bench/lag", base)
        duration = 3 if quick else 10
        rate = 500  # pushes/s; each is two events (manifest.pushed, tag.set)
        total = duration * rate
        start = time.perf_counter()

        def paced(i):
            due = start + i / rate
            pause = due - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            body = manifest_bytes(base, 10_000_000 + i)
            assert request("PUT", f"{server.base}/v2/bench/lag/manifests/t{i % 100}", body, {"Content-Type": MEDIA}) == 201

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(paced, range(total)))
        achieved = total * 2 / (time.perf_counter() - start)
        sink.wait_count(total * 2)
        lags = []
        for received, e in sink.received:
            t = e["time"]  # 2026-12-07T18:46:41.290Z
            at = time.mktime(time.strptime(t[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone + int(t[20:23]) / 1000
            lags.append((received - at) * 1000)
        out["lag"] = {"events_per_s": achieved, "p50_ms": percentile(lags, 50), "p99_ms": percentile(lags, 99),
                      "max_ms": max(lags), "requests": sink.requests, "events": len(lags)}
    finally:
        server.stop()

    tags = 5_000 if quick else 50_000
    print(f"==> {name}: a retention run removing {tags} tags", file=sys.stderr)
    sink = Sink()
    rules = ('[retention]\ninterval = "0s"\n[[retention.rules]]\nname = "bench"\nrepositories = "bench/ret"\n'
             'tags = "t.*"\nkeep_last = 1\n')
    server = bench.start_berth(args.berth, args.work, f"{name}-ret",
                               config=fresh() + rules + endpoints([sink], 'kinds = ["tag.deleted"]'))
    try:
        base, _ = bench.tiny_image_manifest([server])
        mount(server, "bench/ret", base)
        per_push = 1000

        def tag_batch(b):
            body = manifest_bytes(base, 20_000_000 + b)
            query = "&".join(f"tag=t{b:03d}-{t:04d}" for t in range(per_push))
            assert request("PUT", f"{server.base}/v2/bench/ret/manifests/{digest_of(body)}?{query}", body,
                           {"Content-Type": MEDIA}) == 201

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(tag_batch, range(tags // per_push)))
        t0 = time.time()
        run = json.loads(urllib.request.urlopen(urllib.request.Request(
            f"{server.base}/admin/v1/retention/run", method="POST")).read())
        answered = time.time()
        removed = sum(1 for t in run["tags"] if t.get("outcome") == "removed")
        last = sink.wait_count(removed)
        out["retention"] = {"tags": tags, "removed": removed, "run_s": answered - t0,
                            "delivered_after_run_s": last - answered, "requests": sink.requests}
    finally:
        server.stop()
    return out


def table(r):
    lines = [f"Machine: {r['machine']}; {bench.hash_line(r)}.", ""]
    for d in r["runs"]:
        lines += [f"### {d['name']}", ""]
        if "write_cost" in d:
            w = d["write_cost"]
            lines += ["The build before events against this one with no endpoint (alternating rounds, medians):", "",
                      "| build | push/s | CPU-ms/push | delete/s | CPU-ms/delete |", "|---|---|---|---|---|"]
            for k in ("before", "events"):
                e = w[k]
                lines.append(f"| {k} | {e['push']['per_s']:.0f} | {e['push']['cpu_ms']:.3f} | "
                             f"{e['delete']['per_s']:.0f} | {e['delete']['cpu_ms']:.3f} |")
            lines.append("")
        if "endpoints_0" not in d:
            continue
        lines += [

                  "Ratios against 0 endpoints (events written, none delivered).", "",
                  "| endpoints | push/s | CPU-ms/push | delete/s | CPU-ms/delete | manifest GET/s |",
                  "|---|---|---|---|---|---|"]
        none = d["endpoints_0"]
        for label, key in [(str(n), f"endpoints_{n}") for n in (0, 1, 3)]:
            e = d[key]
            lines.append(f"| {label} | {e['push_per_s']:.0f} ({e['push_per_s'] / none['push_per_s']:.2f}×) | "
                         f"{e['push_cpu_ms']:.2f} | {e['delete_per_s']:.0f} ({e['delete_per_s'] / none['delete_per_s']:.2f}×) | "
                         f"{e['delete_cpu_ms']:.2f} | {e['get_per_s']:.0f} ({e['get_per_s'] / none['get_per_s']:.2f}×) |")
        lag = d["lag"]
        ret = d["retention"]
        lines += ["", f"Delivery lag at {lag['events_per_s']:.0f} events/s ({lag['events']} events, "
                  f"{lag['requests']} requests): p50 {lag['p50_ms']:.0f} ms, p99 {lag['p99_ms']:.0f} ms, "
                  f"max {lag['max_ms']:.0f} ms.",
                  f"Retention run removing {ret['removed']} of {ret['tags']} tags: the run answered in "
                  f"{ret['run_s']:.1f} s; its last event reached the sink {ret['delivered_after_run_s']:.1f} s later, "
                  f"in {ret['requests']} requests.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    bench.main_on_each_deployment("shorter loads, 5,000 tags", run_deployment, table)
