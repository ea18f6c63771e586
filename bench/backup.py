#!/usr/bin/env python3
"""Benchmarks of backups (issue 29), on the embedded deployment and (with --scale-out-env) the
scale-out one:

* a full backup of a registry of 1 GiB in 4 MiB blobs (256 MiB with --quick) against a plain copy
  of the same bytes — embedded: `cp -r` of the blob tree then `sync` (the backup flushes every
  file); scale-out: every object read and written back to the bucket with curl (SigV4), eight at
  a time — target ≥ 0.8× the copy's throughput;
* an incremental backup of the same registry unchanged (nothing to copy), and of a registry of
  100,000 small blobs (10,000 with --quick; 20,000 / 2,000 on scale-out, whose uploads are slow
  to make) — target: seconds;
* manifest GETs (wrk) and blob uploads while a full backup runs against the same without —
  target within 10 %.

Run through `bench/run backup [--quick]`.
"""

import concurrent.futures
import hashlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402
import deletes  # noqa: E402
import s3_ceiling  # noqa: E402

request = deletes.request
MiB = bench.MiB


def upload(server, repo, body):
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    assert request("POST", f"{server.base}/v2/{repo}/blobs/uploads/?digest={digest}", body) == 201


def fill(server, count, size, seed):
    def one(i):
        upload(server, "bench/backup", hashlib.sha256(f"{seed}-{i}".encode()).digest() * (size // 32))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(count)))


def berth_cmd(args, deployment, *extra):
    return [args.berth, "backup", *extra, *deployment]


def timed(cmd, env=None):
    """Runs `cmd`; (wall seconds, CPU seconds of the child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def s3_copy_ceiling(env, prefix, keys, dest):
    """Reads each object with curl and writes it back under `dest`, eight at a time."""
    base = f"{env['BERTH_TEST_S3_ENDPOINT']}/{env['BERTH_TEST_S3_BUCKET']}"
    tmp = "/dev/shm" if os.path.isdir("/dev/shm") else None

    def one(key):
        with tempfile.NamedTemporaryFile(dir=tmp) as f:
            s3_ceiling.s3_curl(env, "-o", f.name, f"{base}/{prefix}/{key}")
            s3_ceiling.s3_curl(env, "-T", f.name, f"{base}/{dest}/{key}")
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(one, keys))
    return time.perf_counter() - t0


def db_url(config):
    return [line.split('"')[1] for line in config.splitlines() if line.startswith("url")][0]


def run_deployment(args, name, storage):
    scale_out = "scale-out" in name
    quick = args.quick
    out = {"name": name}
    config = bench.scale_out_toml(args.scale_out_env) if scale_out else storage
    server = bench.start_berth(args.berth, args.work, f"{name}-full", config=config)
    deployment = ["--config", os.path.join(args.work, f"{name}-full.toml"), "--data-dir", os.path.join(args.work, f"{name}-full")]
    env = None
    if scale_out:
        s3 = s3_ceiling.s3_env(args.scale_out_env)
        bucket = s3["BERTH_TEST_S3_BUCKET"]
        prefix = [line.split('"')[1] for line in config.splitlines() if line.startswith("prefix")][0]

        def location(tag):
            return f"s3://{bucket}/bench-{tag}-{uuid.uuid4().hex[:8]}"
    else:
        def location(tag):
            return os.path.join(args.work, f"{name}-backup-{tag}-{uuid.uuid4().hex[:8]}")
    try:
        count = 64 if quick else 256
        print(f"==> {name}: {count} blobs of 4 MiB", file=sys.stderr)
        fill(server, count, 4 * MiB, 1)
        total = count * 4 * MiB
        # The copy ceiling, then the backup, alternating, two rounds each.
        copies, backups, cpus = [], [], []
        for r in range(2):
            if scale_out:
                keys = [line.strip() for line in subprocess.run(
                    ["psql", "-At", db_url(config), "-c", "SELECT storage_key FROM blobs"],
                    check=True, capture_output=True, text=True).stdout.splitlines() if line.strip()]
                copies.append(s3_copy_ceiling(s3, prefix, keys, f"bench-ceiling-{r}-{uuid.uuid4().hex[:6]}"))
            else:
                dest = os.path.join(args.work, f"{name}-cp-{r}")
                t0 = time.perf_counter()
                subprocess.run(["cp", "-r", os.path.join(args.work, f"{name}-full", "blobs"), dest], check=True)
                subprocess.run(["sync"], check=True)
                copies.append(time.perf_counter() - t0)
                shutil.rmtree(dest)
            to = location(f"full{r}")
            wall, cpu = timed(berth_cmd(args, deployment, "--to", to), env)
            backups.append(wall)
            cpus.append(cpu)
        unchanged, _ = timed(berth_cmd(args, deployment, "--to", to), env)
        out["full"] = {"bytes": total, "blobs": count, "copy_s": copies, "backup_s": backups, "backup_cpu_s": cpus,
                       "copy_mb_s": total / MiB / statistics.median(copies),
                       "backup_mb_s": total / MiB / statistics.median(backups),
                       "unchanged_s": unchanged}

        # Impact on GETs and uploads while a full backup runs.
        manifest, media = bench.tiny_image_manifest([server])
        bench.put_manifest(server, "bench/manifests", "v1", manifest, media)
        get_url = f"{server.base}/v2/bench/manifests/manifests/v1"
        accept = (f"Accept: {media}",)
        modes = ("alone", "backup", "paced")
        impact = {k: {m: [] for m in modes} for k in ("get_rps", "upload_per_s")}
        seconds = 3 if quick else 5
        for r in range(2):
            for mode in (modes if r % 2 == 0 else modes[::-1]):
                proc = None
                if mode != "alone":
                    paced = ["--max-rate", "20MB"] if mode == "paced" else []
                    proc = subprocess.Popen(berth_cmd(args, deployment, "--to", location(f"impact{r}"), *paced),
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
                    time.sleep(0.3)
                impact["get_rps"][mode].append(bench.wrk(get_url, "GET", seconds, connections=16, headers=accept)["rps"])
                t0 = time.perf_counter()
                n = 400 if quick else 1000
                base = 10_000_000 * (r + 1) + 100_000 * modes.index(mode)
                with concurrent.futures.ThreadPoolExecutor(8) as pool:
                    list(pool.map(lambda i: upload(server, "bench/impact", hashlib.sha256(str(base + i).encode()).digest() * 32),
                                  range(n)))
                impact["upload_per_s"][mode].append(n / (time.perf_counter() - t0))
                if proc:
                    if mode == "paced":
                        proc.kill()
                    proc.wait()
        out["impact"] = impact
    finally:
        server.stop()

    small = (2_000 if quick else 20_000) if scale_out else (10_000 if quick else 100_000)
    print(f"==> {name}: an unchanged registry of {small} blobs", file=sys.stderr)
    server = bench.start_berth(args.berth, args.work, f"{name}-small", config=config)
    deployment = ["--config", os.path.join(args.work, f"{name}-small.toml"), "--data-dir", os.path.join(args.work, f"{name}-small")]
    try:
        t0 = time.perf_counter()
        fill(server, small, 1024, 2)
        fill_s = time.perf_counter() - t0
        to = location("small")
        first, _ = timed(berth_cmd(args, deployment, "--to", to), env)
        again, again_cpu = timed(berth_cmd(args, deployment, "--to", to), env)
        out["small"] = {"blobs": small, "fill_s": fill_s, "first_s": first, "unchanged_s": again, "unchanged_cpu_s": again_cpu}
    finally:
        server.stop()
    return out


def table(r):
    lines = [f"Machine: {r['machine']}; {bench.hash_line(r)}.", ""]
    for d in r["runs"]:
        f, i, s = d["full"], d["impact"], d["small"]
        ratio = f["backup_mb_s"] / f["copy_mb_s"]
        med = statistics.median
        lines += [f"### {d['name']}", "",
                  "| | MB/s | runs (s) |", "|---|---|---|",
                  f"| plain copy ({f['blobs']} × 4 MiB) | {f['copy_mb_s']:.0f} | {', '.join(f'{x:.2f}' for x in f['copy_s'])} |",
                  f"| `berth backup` (full) | {f['backup_mb_s']:.0f} | {', '.join(f'{x:.2f}' for x in f['backup_s'])} "
                  f"(CPU {', '.join(f'{x:.2f}' for x in f['backup_cpu_s'])} s) |", "",
                  f"Backup / copy throughput: **{ratio:.2f}×**. Unchanged, again: {f['unchanged_s']:.2f} s.",
                  f"Unchanged registry of {s['blobs']} blobs: first backup {s['first_s']:.1f} s, "
                  f"**the next {s['unchanged_s']:.2f} s** (CPU {s['unchanged_cpu_s']:.2f} s).",
                  f"During a full backup: manifest GET/s {med(i['get_rps']['backup']):.0f} vs "
                  f"{med(i['get_rps']['alone']):.0f} alone ({med(i['get_rps']['backup']) / med(i['get_rps']['alone']):.2f}×); "
                  f"uploads/s {med(i['upload_per_s']['backup']):.0f} vs {med(i['upload_per_s']['alone']):.0f} "
                  f"({med(i['upload_per_s']['backup']) / med(i['upload_per_s']['alone']):.2f}×). "
                  f"Paced (`--max-rate 20MB`): GET/s {med(i['get_rps']['paced']):.0f} "
                  f"({med(i['get_rps']['paced']) / med(i['get_rps']['alone']):.2f}×), uploads/s "
                  f"{med(i['upload_per_s']['paced']):.0f} ({med(i['upload_per_s']['paced']) / med(i['upload_per_s']['alone']):.2f}×).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    bench.main_on_each_deployment("256 MiB, 10,000 small blobs, shorter loads", run_deployment, table)
