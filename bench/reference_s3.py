#!/usr/bin/env python3
"""Peak memory under push of the two scale-out deployments, side by side: Berth (PostgreSQL +
S3) and the reference registry with its S3 driver, pushing to the same S3 server. The reference's
S3 driver cannot complete uploads against Garage (docs/testing.md), so both push to moto's S3
server here (a Python implementation of the S3 API, installed into a cache by this script). moto
is slow: the MB/s columns measure it more than the registries; peak RSS and CPU per GB are the
registries' own. Berth runs twice: request bodies unsigned (the default over https: parts are
streamed) and signed (the default over plain http: parts are gathered first).

Run through `bench/run reference-s3 [--quick]`.
"""

import argparse
import json
import os
import subprocess
import sys
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

MOTO = "moto[server]==5.2.5"
TOOLS = os.path.expanduser("~/.cache/berth-tools/moto")


def moto_python():
    """The Python of a virtualenv with moto's server (and boto3), created once."""
    python = os.path.join(TOOLS, "bin", "python")
    if not os.path.exists(os.path.join(TOOLS, "bin", "moto_server")):
        subprocess.run([sys.executable, "-m", "venv", TOOLS], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", MOTO], check=True)
    return python


def start_moto(work, python):
    port = bench.free_port()
    proc = subprocess.Popen([os.path.join(TOOLS, "bin", "moto_server"), "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "moto.log"), "w"))
    endpoint = f"http://127.0.0.1:{port}"
    bench.wait_http(endpoint + "/")
    make = ("import boto3, sys\n"
            "s3 = boto3.client('s3', endpoint_url=sys.argv[1], aws_access_key_id='bench',\n"
            "                  aws_secret_access_key='bench', region_name='us-east-1')\n"
            "for b in sys.argv[2:]: s3.create_bucket(Bucket=b)\n")
    subprocess.run([python, "-c", make, endpoint, "reference", "berth"], check=True)
    return proc, endpoint


def start_reference_s3(work, endpoint):
    storage = f"""  s3:
    accesskey: bench
    secretkey: bench
    region: us-east-1
    regionendpoint: {endpoint}
    bucket: reference
    secure: false
    v4auth: true
"""
    # The AWS SDK in the reference refuses a custom CA bundle with its own HTTP transport.
    server = bench.start_reference(work, env_extra={"AWS_CA_BUNDLE": None}, storage=storage, name="reference-s3")
    server.name = "reference (S3 driver)"
    return server


def berth_config(pg_server, endpoint, signed):
    db = "bench_" + uuid.uuid4().hex[:12]
    subprocess.run(["psql", pg_server, "-qc", f"CREATE DATABASE {db}"], check=True)
    return f"""
[metadata]
url = "{pg_server.rsplit('/', 1)[0]}/{db}"
[storage]
kind = "s3"
[storage.s3]
endpoint = "{endpoint}"
region = "us-east-1"
bucket = "berth"
prefix = "{db}"
access_key_id = "bench"
secret_access_key = "bench"
sign_payload = {"true" if signed else "false"}
"""


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--berth", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--scale-out-env", required=True, help="env file naming BERTH_TEST_PG_URL")
    p.add_argument("--out")
    p.add_argument("--quick", action="store_true", help="256 MiB instead of 1 GiB, one round")
    args = p.parse_args()
    size = (256 if args.quick else 1024) * bench.MiB
    rounds = 1 if args.quick else 2
    os.makedirs(args.work, exist_ok=True)
    facts = bench.machine_facts(args.berth)
    env = dict(line.strip().split("=", 1) for line in open(args.scale_out_env) if "=" in line)
    path = os.path.join(args.work, "blob")
    digest = bench.make_file(path, size)
    chunk_dir = os.path.join(args.work, "chunks")
    os.makedirs(chunk_dir, exist_ok=True)
    subprocess.run(["split", "-b", str(16 * bench.MiB), "-d", "-a", "4", path, os.path.join(chunk_dir, "c")], check=True)
    chunks = sorted(os.path.join(chunk_dir, c) for c in os.listdir(chunk_dir))

    moto, endpoint = start_moto(args.work, moto_python())
    servers = []
    try:
        servers.append(start_reference_s3(args.work, endpoint))
        for signed in [False, True]:
            name = f"berth, {'signed' if signed else 'unsigned'}"
            config = berth_config(env["BERTH_TEST_PG_URL"], endpoint, signed)
            servers.append(bench.start_berth(args.berth, args.work, name.replace(", ", "-"), config=config))
            servers[-1].name = name
        rows = {s.name: {"monolithic": [], "chunked": []} for s in servers}
        # Interleaved: each server in turn, so moto's and the machine's drift hits all alike.
        for r in range(rounds):
            for s in servers:
                for kind, push in [("monolithic", lambda: bench.push_monolithic(s, f"bench/m{r}", path, digest)),
                                   ("chunked", lambda: bench.push_chunked(s, f"bench/c{r}", chunks, digest))]:
                    bench.reset_peak_rss(s.pid)
                    wall, cpu = bench.measured(s, push)
                    rows[s.name][kind].append({"MBps": size / 1e6 / wall, "cpu_s_per_GB": cpu / (size / 1e9),
                                               "peak_rss_MiB": bench.peak_rss_mib(s.pid)})
    finally:
        for s in servers:
            s.stop()
        moto.terminate()

    results = {**facts, "bytes": size, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    lines = [f"Machine: {bench.machine()}; {bench.hash_line(facts)}; {size // bench.MiB} MiB pushed to moto's "
             f"S3 server, {rounds} round(s) interleaved", "",
             "| registry | push | peak RSS (MiB, each round) | CPU-s/GB (each round) | MB/s (moto-bound) |",
             "|---|---|---|---|---|"]
    for name, kinds in rows.items():
        for kind, runs in kinds.items():
            rss = ", ".join(f"{r['peak_rss_MiB']:.1f}" for r in runs)
            cpu = ", ".join(f"{r['cpu_s_per_GB']:.2f}" for r in runs)
            mbps = ", ".join(f"{r['MBps']:.0f}" for r in runs)
            lines.append(f"| {name} | {kind} | {rss} | {cpu} | {mbps} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
