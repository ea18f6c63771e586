#!/usr/bin/env python3
"""The object store's own ceiling against Berth's scale-out push (issue 15): the same 1 GiB file
sent to the same bucket (1) as a direct multipart upload — curl with SigV4, 8 MiB parts, three in
flight (Berth's writer keeps two streamed parts or three gathered ones in flight, of 5 MiB by
default) — and (2) through Berth
(PostgreSQL + Garage), monolithic and in 16 MiB chunks. The chunks go one after the other on one
connection, each once the one before was answered, as registry clients send them (Berth's
upload location stays the same from chunk to chunk, so one curl sends them all). Target: Berth
at ≥ 80 % of the direct upload.

Run through `bench/run s3 [--quick]`. Standard library and curl only.
"""

import concurrent.futures
import json
import os
import re
import subprocess
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

PART = 8 * bench.MiB
IN_FLIGHT = 3


def s3_env(path):
    return dict(line.strip().split("=", 1) for line in open(path) if "=" in line)


def s3_curl(env, *args):
    # Garage wants the payload hash header; the parts are sent unsigned, as object_store can.
    out = subprocess.run(["curl", "-sS", "--fail-with-body", "--aws-sigv4", "aws:amz:garage:s3",
                          "-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD",
                          "--user", f"{env['BERTH_TEST_S3_KEY_ID']}:{env['BERTH_TEST_S3_SECRET']}", *args],
                         check=True, capture_output=True)
    return out.stdout.decode(errors="replace"), out.stderr.decode(errors="replace")


def direct_multipart(env, path, parts_dir):
    """Uploads `path` as one multipart upload; returns the wall seconds."""
    base = f"{env['BERTH_TEST_S3_ENDPOINT']}/{env['BERTH_TEST_S3_BUCKET']}/ceiling-{uuid.uuid4().hex}"
    size = os.path.getsize(path)
    parts = []
    with open(path, "rb") as f:
        for n in range(1, (size + PART - 1) // PART + 1):
            p = os.path.join(parts_dir, f"part{n}")
            with open(p, "wb") as out:
                out.write(f.read(PART))
            parts.append((n, p))
    t0 = time.perf_counter()
    body, _ = s3_curl(env, "-X", "POST", f"{base}?uploads=")
    upload_id = re.search(r"<UploadId>([^<]+)</UploadId>", body).group(1)

    def put(part):
        n, p = part
        _, _ = s3_curl(env, "-X", "PUT", "-T", p, "-D", p + ".headers",
                       f"{base}?partNumber={n}&uploadId={upload_id}")
        with open(p + ".headers") as h:
            etag = re.search(r"(?im)^etag:\s*(\S+)", h.read()).group(1)
        return n, etag

    with concurrent.futures.ThreadPoolExecutor(IN_FLIGHT) as pool:
        etags = list(pool.map(put, parts))
    complete = "<CompleteMultipartUpload>" + "".join(
        f"<Part><PartNumber>{n}</PartNumber><ETag>{e}</ETag></Part>" for n, e in etags) + "</CompleteMultipartUpload>"
    s3_curl(env, "-X", "POST", "-H", "Content-Type: application/xml", "--data-binary", complete,
            f"{base}?uploadId={upload_id}")
    wall = time.perf_counter() - t0
    s3_curl(env, "-X", "DELETE", base)
    return wall


def push_chunked_one_connection(server, repo, chunks, digest):
    """A chunked push on one kept-alive connection (curl --next), checking every answer."""
    loc = bench.start_session(server, repo)
    args, offset = [], 0
    for chunk in chunks:
        size = os.path.getsize(chunk)
        args += ["-o", "/dev/null", "-w", "%{http_code}\n", "-X", "PATCH",
                 "-H", "Content-Type: application/octet-stream",
                 "-H", f"Content-Range: {offset}-{offset + size - 1}", "-T", chunk, loc, "--next"]
        offset += size
    args += ["-o", "/dev/null", "-w", "%{http_code}\n", "-X", "PUT", bench.with_query(loc, f"digest={digest}")]
    codes = subprocess.run(["curl", "-sS", *args], check=True, capture_output=True, text=True).stdout.split()
    assert codes == ["202"] * len(chunks) + ["201"], f"{server.name} chunked push: {codes}"


def main():
    args, size, path, digest = bench.blob_args(__doc__, "--scale-out-env")
    chunks = []
    with open(path, "rb") as f:
        for i in range(size // (16 * bench.MiB)):
            c = os.path.join(args.work, f"chunk{i}")
            with open(c, "wb") as out:
                out.write(f.read(16 * bench.MiB))
            chunks.append(c)
    parts_dir = os.path.join(args.work, "parts")
    os.makedirs(parts_dir, exist_ok=True)
    env = s3_env(args.scale_out_env)
    # Request bodies signed (the default over http, as Garage is here: parts are buffered) and
    # not (the default over https: parts of announced writes stream to the store).
    server = bench.start_berth(args.berth, args.work, "berth-s3",
                               config=bench.scale_out_toml(args.scale_out_env, sign_payload=True))
    unsigned = bench.start_berth(args.berth, args.work, "berth-s3-unsigned",
                                 config=bench.scale_out_toml(args.scale_out_env))
    mb = size / 1e6
    pushes = [("Berth monolithic", server, lambda i: bench.push_monolithic(server, f"bench/mono{i}", path, digest)),
              ("Berth chunked (16 MiB)", server,
               lambda i: push_chunked_one_connection(server, f"bench/chunk{i}", chunks, digest)),
              ("Berth monolithic, unsigned payload", unsigned,
               lambda i: bench.push_monolithic(unsigned, f"bench/unsigned{i}", path, digest)),
              ("Berth chunked (16 MiB), unsigned payload", unsigned,
               lambda i: push_chunked_one_connection(unsigned, f"bench/unsigned-chunk{i}", chunks, digest))]
    rows = {"direct multipart": [], **{name: [] for name, _, _ in pushes}}
    cpu = {name: [] for name, _, _ in pushes}
    try:
        # Interleaved, so the store's and the machine's drift hits every row alike.
        for i in range(3):
            rows["direct multipart"].append(mb / direct_multipart(env, path, parts_dir))
            for name, target, push in pushes:
                wall, used = bench.measured(target, lambda: push(i))
                rows[name].append(mb / wall)
                cpu[name].append(used / (size / 1e9))
        rss = {"signed": bench.peak_rss_mib(server.pid), "unsigned": bench.peak_rss_mib(unsigned.pid)}
    finally:
        server.stop()
        unsigned.stop()
    best = {k: max(v) for k, v in rows.items()}
    results = {**bench.machine_facts(args.berth), "bytes": size, "MBps": rows, "cpu_s_per_GB": cpu,
               "berth_peak_rss_mib": rss}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    ceiling = best["direct multipart"]
    lines = [f"Machine: {results['machine']}; {bench.hash_line(results)}; {size // bench.MiB} MiB to Garage, "
             "best of 3 interleaved", "",
             "| upload | MB/s (each run) | best | ÷ direct | Berth CPU-s/GB (median) |", "|---|---|---|---|---|"]
    for k, v in rows.items():
        used = f"{sorted(cpu[k])[1]:.2f}" if k in cpu else ""
        lines.append(f"| {k} | {', '.join(f'{x:.0f}' for x in v)} | {best[k]:.0f} | {best[k] / ceiling:.2f} | {used} |")
    lines += ["", f"Berth's peak RSS over the run: {rss['signed']:.0f} MiB signed, {rss['unsigned']:.0f} MiB unsigned"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
