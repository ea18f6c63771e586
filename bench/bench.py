#!/usr/bin/env python3
"""Berth benchmarks, side by side with the reference registry (CNCF distribution 2.8.2).

Starts every server on loopback with storage on the same disk and measures them interleaved in
one run: blob push (monolithic and chunked), blob pull (cold and warm page cache, and nginx
sendfile on the same file), single-core SHA-256, manifest GET/HEAD at 64 connections, tags/list
of 10,000 tags, and peak RSS. Next to every throughput and request rate it reports the server's
CPU cost, which is far steadier than speed on a shared 2-core machine.

Run through bench/run, which installs the tools and builds Berth. Only the standard library.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

MiB = 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- processes

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    """User + system CPU of a process and its threads, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def reset_peak_rss(pid):
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def wait_http(url, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except Exception:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


class Server:
    """A registry under test: a name, a base URL and the process whose CPU and RSS count."""

    def __init__(self, name, proc, base, blob_dir=None):
        self.name, self.proc, self.base, self.blob_dir = name, proc, base, blob_dir

    @property
    def pid(self):
        return self.proc.pid

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_berth(binary, work, name, env_extra=None, config=None):
    port = free_port()
    data = os.path.join(work, name)
    os.makedirs(data, exist_ok=True)
    args = [binary, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", data, "--log-level", "warn"]
    if config:
        path = os.path.join(work, f"{name}.toml")
        with open(path, "w") as f:
            f.write(config)
        args += ["--config", path]
    env = dict(os.environ, **(env_extra or {}))
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, f"{name}.log"), "w"))
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/v2/")
    return Server(name, proc, base, os.path.join(data, "blobs"))


def scale_out_toml(env_path, sign_payload=False):
    """The [metadata] and [storage] sections for the scale-out deployment the env file names
    (BERTH_TEST_PG_URL, BERTH_TEST_S3_*): a fresh database, and a fresh prefix in the bucket.
    Request bodies go unsigned unless asked, as over https by default (Garage here speaks
    plain http, where Berth's default is to sign them)."""
    import uuid
    env = dict(line.strip().split("=", 1) for line in open(env_path) if "=" in line)
    db = "bench_" + uuid.uuid4().hex[:12]
    subprocess.run(["psql", env["BERTH_TEST_PG_URL"], "-qc", f"CREATE DATABASE {db}"], check=True)
    pg = env["BERTH_TEST_PG_URL"].rsplit("/", 1)[0] + "/" + db
    return f"""
[metadata]
url = "{pg}"
[storage]
kind = "s3"
[storage.s3]
endpoint = "{env['BERTH_TEST_S3_ENDPOINT']}"
region = "garage"
bucket = "{env['BERTH_TEST_S3_BUCKET']}"
prefix = "bench-{db}"
access_key_id = "{env['BERTH_TEST_S3_KEY_ID']}"
secret_access_key = "{env['BERTH_TEST_S3_SECRET']}"
sign_payload = {"true" if sign_payload else "false"}
"""


def start_reference(work, env_extra=None, storage=None, name="reference", proxy=None):
    """The reference registry on its filesystem driver under `work`, or on the driver the YAML
    lines `storage` configure (indented under `storage:`); with `proxy`, a pull-through cache of
    that upstream URL."""
    port = free_port()
    root = None
    if storage is None:
        root = os.path.join(work, name)
        os.makedirs(root, exist_ok=True)
        storage = f"  filesystem:\n    rootdirectory: {root}\n"
    cfg = os.path.join(work, f"{name}.yml")
    with open(cfg, "w") as f:
        f.write(f"""version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
{storage}  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
""" + (f"proxy:\n  remoteurl: {proxy}\n" if proxy else ""))
    binary = shutil.which("docker-registry") or "/usr/bin/docker-registry"
    env = {k: v for k, v in dict(os.environ, **(env_extra or {})).items() if v is not None}
    proc = subprocess.Popen([binary, "serve", cfg], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, f"{name}.log"), "w"))
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/v2/")
    return Server(name, proc, base, root)


# ----------------------------------------------------------------------------- HTTP helpers

def curl(*args):
    out = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{time_total}", *args],
                         check=True, capture_output=True, text=True).stdout.split()
    return int(out[0]), float(out[1])


def curl_headers(*args):
    return subprocess.run(["curl", "-sS", "-D", "-", "-o", "/dev/null", *args],
                          check=True, capture_output=True, text=True).stdout


def header(headers, name):
    m = re.search(rf"^{name}:\s*(.+?)\r?$", headers, re.I | re.M)
    return m.group(1) if m else None


def location(server, headers):
    loc = header(headers, "location")
    return loc if loc.startswith("http") else server.base + loc


def start_session(server, repo):
    return location(server, curl_headers("-X", "POST", f"{server.base}/v2/{repo}/blobs/uploads/"))


def with_query(url, query):
    return url + ("&" if "?" in url else "?") + query


def push_monolithic(server, repo, path, digest):
    loc = start_session(server, repo)
    code, _ = curl("-X", "PUT", "-H", "Content-Type: application/octet-stream", "-T", path,
                   with_query(loc, f"digest={digest}"))
    assert code == 201, f"{server.name} monolithic push: {code}"


def push_chunked(server, repo, chunks, digest):
    loc = start_session(server, repo)
    offset = 0
    for chunk in chunks:
        size = os.path.getsize(chunk)
        headers = curl_headers("-X", "PATCH", "-H", "Content-Type: application/octet-stream",
                               "-H", f"Content-Range: {offset}-{offset + size - 1}", "-T", chunk, loc)
        loc = location(server, headers)
        offset += size
    code, _ = curl("-X", "PUT", with_query(loc, f"digest={digest}"))
    assert code == 201, f"{server.name} chunked push: {code}"


def put_manifest(server, repo, ref, body, media_type):
    req = urllib.request.Request(f"{server.base}/v2/{repo}/manifests/{ref}", data=body, method="PUT",
                                 headers={"Content-Type": media_type})
    with urllib.request.urlopen(req) as r:
        assert r.status == 201


# ----------------------------------------------------------------------------- measurements

def measured(server, fn):
    """Runs fn(); returns (wall seconds, server CPU seconds). Dirty pages are flushed first, so a
    measurement does not pay for the writeback of the one before."""
    subprocess.run(["sync"], check=True)
    c0, t0 = cpu_seconds(server.pid), time.perf_counter()
    fn()
    return time.perf_counter() - t0, cpu_seconds(server.pid) - c0


def drop_caches():
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def deployment_args(quick_help):
    """The arguments of the benchmarks that run on both deployments; makes the work directory."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--berth", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--scale-out-env")
    ap.add_argument("--out")
    ap.add_argument("--quick", action="store_true", help=quick_help)
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    return args


def run_recorded(args, run):
    """`run(name, storage_config)` on each deployment (see `on_each_deployment`), with the
    machine's facts; saved to `args.out` as JSON when given. Returns the results."""
    results = {**machine_facts(args.berth), "runs": on_each_deployment(args, run)}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


def main_on_each_deployment(quick_help, run_deployment, table):
    """The `main` of a benchmark run on both deployments: `run_deployment(args, name, storage)`
    on each, recorded, then `table(results)` printed."""
    args = deployment_args(quick_help)
    results = run_recorded(args, lambda name, storage: run_deployment(args, name, storage))
    print(table(results))


def on_each_deployment(args, run):
    """`run(name, storage_config)` on the embedded deployment and, when its services are given,
    on the scale-out one; the list of their results."""
    runs = [run("berth-embedded", "[storage]\nfsync = false\n")]
    if args.scale_out_env:
        runs.append(run("berth-scale-out", scale_out_toml(args.scale_out_env)))
    return runs


def blob_args(doc, *extra):
    """The arguments every single-file push benchmark takes, parsed; makes `push.bin` (1 GiB,
    or 256 MiB with --quick) in the work directory. Returns (args, size, path, digest)."""
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--berth", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--out")
    ap.add_argument("--quick", action="store_true", help="256 MiB instead of 1 GiB")
    for flag in extra:
        ap.add_argument(flag, required=True)
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    size = (256 if args.quick else 1024) * MiB
    path = os.path.join(args.work, "push.bin")
    return args, size, path, make_file(path, size)


def make_file(path, size):
    with open(path, "wb") as f:
        left = size
        block = os.urandom(4 * MiB)
        while left > 0:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(8 * MiB):
            h.update(b)
    return "sha256:" + h.hexdigest()


def sha256_speed():
    buf = os.urandom(256 * MiB)
    t0 = time.perf_counter()
    hashlib.sha256(buf).hexdigest()
    return 256 / (time.perf_counter() - t0)


def wrk(url, method, seconds, connections=64, headers=()):
    script = None
    args = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency"]
    for h in headers:
        args += ["-H", h]
    if method != "GET":
        script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
        script.write(f'wrk.method = "{method}"\n')
        script.close()
        args += ["-s", script.name]
    out = subprocess.run(args + [url], check=True, capture_output=True, text=True).stdout
    if script:
        os.unlink(script.name)
    reqs = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)

    def pct(p):
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)", out, re.M)
        v, unit = float(m.group(1)), m.group(2)
        return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v
    return {"rps": reqs, "total": total, "p50": pct(50), "p99": pct(99), "errors": int(non2xx.group(1)) if non2xx else 0}


def ab_head(url, seconds, connections=64, headers=()):
    """HEAD load with ApacheBench (wrk cannot do HEAD: it waits for a body that never comes).
    ab is one C event loop: on two shared cores it leaves the server about as much CPU as wrk
    does (hey, used before, took a third of the machine). It speaks HTTP/1.0 with keep-alive."""
    with tempfile.NamedTemporaryFile(suffix=".csv") as csv:
        args = ["ab", "-q", "-k", "-i", "-c", str(connections), "-t", str(seconds), "-n", "100000000",
                "-e", csv.name]
        for h in headers:
            args += ["-H", h]
        out = subprocess.run(args + [url], check=True, capture_output=True, text=True).stdout
        percent = dict(line.split(",") for line in open(csv.name).read().splitlines()[1:])

    def count(label):
        m = re.search(rf"{label}:\s+(\d+)", out)
        return int(m.group(1)) if m else 0
    total = count("Complete requests")
    return {"rps": float(re.search(r"Requests per second:\s+([\d.]+)", out).group(1)), "total": total,
            "p50": float(percent["50"]), "p99": float(percent["99"]),
            "errors": count("Failed requests") + count("Non-2xx responses")}


def median_ms(fn, n=15):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def fetch(url):
    with urllib.request.urlopen(url) as r:
        return r.read()


# ----------------------------------------------------------------------------- the run

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--berth", required=True, help="path to the berth binary (release)")
    ap.add_argument("--work", required=True, help="scratch directory on the disk under test")
    ap.add_argument("--scale-out-env", help="file of KEY=VALUE lines: BERTH_TEST_PG_URL and BERTH_TEST_S3_*")
    ap.add_argument("--quick", action="store_true", help="smaller sizes and shorter loads (smoke run)")
    ap.add_argument("--out", help="write the results as JSON here")
    a = ap.parse_args()

    big = 256 * MiB if a.quick else 1024 * MiB
    small = 64 * MiB if a.quick else 256 * MiB
    load_secs = 3 if a.quick else 10
    ntags = 1000 if a.quick else 10000
    os.makedirs(a.work, exist_ok=True)
    files = os.path.join(a.work, "files")
    os.makedirs(files, exist_ok=True)

    servers = [start_berth(a.berth, a.work, "berth-embedded", config="[storage]\nfsync = false\n"),
               start_reference(a.work)]
    if a.scale_out_env:
        servers.insert(1, start_berth(a.berth, a.work, "berth-scale-out", config=scale_out_toml(a.scale_out_env)))
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(), "servers": {}}
    try:
        results["sha256_MBps"] = sha256_speed()
        results["berth_hash"] = berth_hash_speed(a.berth)
        print(hash_line(results), flush=True)
        big_path = os.path.join(files, "big.bin")
        small_path = os.path.join(files, "small.bin")
        big_digest = make_file(big_path, big)
        small_digest = make_file(small_path, small)
        chunk_dir = os.path.join(files, "chunks")
        os.makedirs(chunk_dir, exist_ok=True)
        subprocess.run(["split", "-b", str(16 * MiB), "-d", "-a", "4", big_path, os.path.join(chunk_dir, "c")], check=True)
        chunks = sorted(os.path.join(chunk_dir, c) for c in os.listdir(chunk_dir))
        for s in servers:
            results["servers"][s.name] = {}

        def record(server, key, value):
            results["servers"][server.name][key] = value
            print(f"  {server.name:16} {key:28} {fmt(value)}", flush=True)

        # Push, interleaved per size: each server in turn, repositories fresh each time.
        for label, path, digest, size in [("push_256MiB", small_path, small_digest, small),
                                          ("push_1GiB", big_path, big_digest, big)]:
            print(f"{label} ({size // MiB} MiB, monolithic PUT)", flush=True)
            for s in servers:
                reset_peak_rss(s.pid)
                wall, cpu = measured(s, lambda: push_monolithic(s, f"bench/{label.lower()}", path, digest))
                record(s, label, {"MBps": size / MiB / wall, "cpu_s_per_GB": cpu / (size / 1e9),
                                  "peak_rss_MiB": peak_rss_mib(s.pid)})
        print(f"push_chunked ({big // MiB} MiB in 16 MiB chunks)", flush=True)
        for s in servers:
            reset_peak_rss(s.pid)
            wall, cpu = measured(s, lambda: push_chunked(s, "bench/chunked", chunks, big_digest))
            record(s, "push_chunked", {"MBps": big / MiB / wall, "cpu_s_per_GB": cpu / (big / 1e9),
                                       "peak_rss_MiB": peak_rss_mib(s.pid)})

        # Pull the big blob: cold (page cache dropped, where allowed) and warm.
        for phase in ["cold", "warm"]:
            print(f"pull {big // MiB} MiB ({phase})", flush=True)
            for s in servers:
                if phase == "cold" and not drop_caches():
                    continue
                url = f"{s.base}/v2/bench/push_1gib/blobs/{big_digest}"
                if phase == "warm":
                    curl("-L", url)  # other servers' cold runs dropped the page cache since
                reset_peak_rss(s.pid)
                wall, cpu = measured(s, lambda: curl("-L", url))
                record(s, f"pull_{phase}", {"MBps": big / MiB / wall, "cpu_s_per_GB": cpu / (big / 1e9),
                                            "peak_rss_MiB": peak_rss_mib(s.pid)})
        results["nginx_sendfile"] = nginx_pull(a.work, big_path, big)
        print(f"  nginx sendfile {fmt(results['nginx_sendfile'])}", flush=True)

        # Manifests: one small image per server, then 64-connection load by tag and by digest.
        manifest, media_type = tiny_image_manifest(servers)
        mdigest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        for s in servers:
            put_manifest(s, "bench/manifests", "latest", manifest, media_type)
        accept = f"Accept: {media_type}"
        for method in ["GET", "HEAD"]:
            for ref_kind, ref in [("tag", "latest"), ("digest", mdigest)]:
                key = f"manifest_{method}_{ref_kind}"
                print(f"{key} (64 connections, {load_secs}s)", flush=True)
                for s in servers:
                    reset_peak_rss(s.pid)
                    c0 = cpu_seconds(s.pid)
                    url = f"{s.base}/v2/bench/manifests/manifests/{ref}"
                    if method == "GET":
                        r = wrk(url, "GET", load_secs, headers=[accept])
                    else:
                        r = ab_head(url, load_secs, headers=[accept])
                    r["cpu_ms_per_req"] = (cpu_seconds(s.pid) - c0) * 1000 / max(r["total"], 1)
                    r["peak_rss_MiB"] = peak_rss_mib(s.pid)
                    record(s, key, r)

        # tags/list with many tags.
        print(f"tags/list of {ntags} tags", flush=True)
        for s in servers:
            tag_many(s, "bench/tags", manifest, media_type, ntags)
            whole = median_ms(lambda: fetch(f"{s.base}/v2/bench/tags/tags/list"))
            page = median_ms(lambda: fetch(f"{s.base}/v2/bench/tags/tags/list?n=100&last=t05000"))
            record(s, "tags_list", {"whole_ms": whole, "page_of_100_ms": page})
    finally:
        for s in servers:
            s.stop()
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=2)
    print(table(results))


def tiny_image_manifest(servers):
    config = b'{"architecture":"amd64","os":"linux"}'
    layer = os.urandom(1024)
    media = "application/vnd.oci.image.manifest.v1+json"
    for s in servers:
        for blob in [config, layer]:
            d = "sha256:" + hashlib.sha256(blob).hexdigest()
            url = with_query(start_session(s, "bench/manifests"), f"digest={d}")
            headers = {"Content-Type": "application/octet-stream"}
            urllib.request.urlopen(urllib.request.Request(url, data=blob, method="PUT", headers=headers)).read()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": media,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": "sha256:" + hashlib.sha256(config).hexdigest(), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": "sha256:" + hashlib.sha256(layer).hexdigest(), "size": len(layer)}],
    }).encode()
    return manifest, media


def tag_many(server, repo, manifest, media_type, n):
    # The manifest's blobs live in bench/manifests; mount them into this repository first.
    body = json.loads(manifest)
    for d in [body["config"]["digest"]] + [l["digest"] for l in body["layers"]]:
        curl("-X", "POST", f"{server.base}/v2/{repo}/blobs/uploads/?mount={d}&from=bench/manifests")
    for i in range(n):
        put_manifest(server, repo, f"t{i:05d}", manifest, media_type)


def nginx_pull(work, path, size):
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(nginx):
        return None
    port = free_port()
    root = os.path.join(work, "nginx")
    os.makedirs(os.path.join(root, "logs"), exist_ok=True)
    conf = os.path.join(root, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""worker_processes 1; daemon off; pid {root}/nginx.pid; error_log {root}/logs/error.log;
events {{}}
http {{ access_log off; sendfile on; tcp_nopush on;
  server {{ listen 127.0.0.1:{port}; root {os.path.dirname(path)}; }} }}
""")
    proc = subprocess.Popen([nginx, "-c", conf, "-p", root], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/{os.path.basename(path)}"
        wait_http(url)
        curl(url)  # warm
        worker = int(subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()[0])
        c0, t0 = cpu_seconds(worker), time.perf_counter()
        curl(url)
        wall = time.perf_counter() - t0
        return {"MBps": size / MiB / wall, "cpu_s_per_GB": (cpu_seconds(worker) - c0) / (size / 1e9)}
    finally:
        proc.terminate()
        proc.wait()


def machine():
    cpu, sha_ni = "?", False
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and cpu == "?":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                sha_ni = sha_ni or " sha_ni" in line
    return f"{os.cpu_count()} cores, {cpu}, {'with' if sha_ni else 'without'} SHA-NI"


def berth_hash_speed(binary):
    """One core's SHA-256 MB/s of the implementation Berth hashes with, and of the sha2 crate."""
    out = subprocess.run([binary, "hash-speed"], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def machine_facts(binary):
    """What every results file records of the machine: CPU model and SHA-NI, and one core's
    SHA-256 speed of OpenSSL and of the implementation Berth hashes with."""
    return {"machine": machine(), "sha256_MBps": sha256_speed(), "berth_hash": berth_hash_speed(binary)}


def hash_line(results):
    """The hashing speeds a results dict recorded, as one line."""
    b = results.get("berth_hash", {})
    return (f"SHA-256 on one core: OpenSSL {results.get('sha256_MBps', 0):.0f} MB/s, "
            f"Berth {b.get('berth_sha256_MBps', 0):.0f} MB/s (sha2 crate {b.get('sha2_crate_MBps', 0):.0f} MB/s)")


def fmt(v):
    if isinstance(v, dict):
        return ", ".join(f"{k}={fmt(x)}" for k, x in v.items())
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


ROWS = [
    ("push 256 MiB, monolithic", "push_256MiB", "MBps", "MB/s", True),
    ("  server CPU", "push_256MiB", "cpu_s_per_GB", "CPU-s/GB", False),
    ("push 1 GiB, monolithic", "push_1GiB", "MBps", "MB/s", True),
    ("  server CPU", "push_1GiB", "cpu_s_per_GB", "CPU-s/GB", False),
    ("  peak RSS during push", "push_1GiB", "peak_rss_MiB", "MiB", False),
    ("push 1 GiB, 16 MiB chunks", "push_chunked", "MBps", "MB/s", True),
    ("  server CPU", "push_chunked", "cpu_s_per_GB", "CPU-s/GB", False),
    ("  peak RSS during push", "push_chunked", "peak_rss_MiB", "MiB", False),
    ("pull 1 GiB, cold cache", "pull_cold", "MBps", "MB/s", True),
    ("  server CPU", "pull_cold", "cpu_s_per_GB", "CPU-s/GB", False),
    ("pull 1 GiB, warm cache", "pull_warm", "MBps", "MB/s", True),
    ("  server CPU", "pull_warm", "cpu_s_per_GB", "CPU-s/GB", False),
    ("  peak RSS during pull", "pull_warm", "peak_rss_MiB", "MiB", False),
]
for _m in ["GET", "HEAD"]:
    for _r in ["tag", "digest"]:
        _k = f"manifest_{_m}_{_r}"
        ROWS += [(f"manifest {_m} by {_r}, 64 conns", _k, "rps", "req/s", True),
                 ("  p50 / p99", _k, ("p50", "p99"), "ms", False),
                 ("  server CPU", _k, "cpu_ms_per_req", "CPU-ms/req", False),
                 ("  peak RSS", _k, "peak_rss_MiB", "MiB", False)]
ROWS += [("tags/list, whole", "tags_list", "whole_ms", "ms", False),
         ("tags/list, page of 100", "tags_list", "page_of_100_ms", "ms", False)]


def table(results):
    names = list(results["servers"])
    out = [f"Run {results['date']} on {results['machine']}; {hash_line(results)}", ""]
    out.append("| measure | unit | " + " | ".join(names) + " | berth / reference |")
    out.append("|---|---|" + "---|" * len(names) + "---|")
    for label, key, field, unit, _ in ROWS:
        cells = []
        vals = {}
        for n in names:
            r = results["servers"][n].get(key)
            if r is None:
                cells.append("–")
                continue
            if isinstance(field, tuple):
                cells.append(" / ".join(fmt(r[f]) for f in field))
            else:
                vals[n] = r[field]
                cells.append(fmt(r[field]))
        ratio = "–"
        if "berth-embedded" in vals and vals.get("reference"):
            ratio = f"{vals['berth-embedded'] / vals['reference']:.2f}×"
        out.append(f"| {label} | {unit} | " + " | ".join(cells) + f" | {ratio} |")
    if results.get("nginx_sendfile"):
        n = results["nginx_sendfile"]
        out.append(f"\nnginx sendfile, same 1 GiB file, warm: {n['MBps']:.0f} MB/s at {n['cpu_s_per_GB']:.2f} CPU-s/GB")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
