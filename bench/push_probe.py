#!/usr/bin/env python3
"""Repeated blob pushes against one Berth binary, for push-path work: each run prints MB/s,
server CPU-s/GB and the server's context switches, then the median. Not part of the table;
bench/run is the side-by-side benchmark.

    bench/push_probe.py target/release/berth [--size-mib 1024] [--runs 5] [--chunk-mib 0]
                                             [--config 'TOML text'] [--scale-out-env FILE]

With --scale-out-env (the env file of bench/run), the server is the scale-out deployment
(request bodies unsigned unless --signed) and --config is appended to its [storage.s3] section.
"""

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

MiB = bench.MiB


def switches(pid):
    """Voluntary and involuntary context switches of all the process's threads."""
    total = [0, 0]
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        total[0] += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches:"):
                        total[1] += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def main():
    p = argparse.ArgumentParser()
    p.add_argument("binary")
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--chunk-mib", type=int, default=0, help="PATCH in chunks of this size (0: monolithic)")
    p.add_argument("--config", default=None, help="Berth configuration (TOML text) for the server")
    p.add_argument("--scale-out-env", default=None, help="env file naming PostgreSQL and S3 (as for bench/run)")
    p.add_argument("--signed", action="store_true", help="scale-out: sign request bodies")
    p.add_argument("--work", default=None, help="directory for data (default: a temporary one under /work or /tmp)")
    args = p.parse_args()

    work = tempfile.mkdtemp(prefix="berth-probe-", dir=args.work)
    src = os.path.join(work, "blob")
    digest = bench.make_file(src, args.size_mib * MiB)
    chunks = []
    if args.chunk_mib:
        with open(src, "rb") as f:
            i = 0
            while data := f.read(args.chunk_mib * MiB):
                path = os.path.join(work, f"chunk{i}")
                with open(path, "wb") as out:
                    out.write(data)
                chunks.append(path)
                i += 1
    config = args.config
    if args.scale_out_env:
        config = bench.scale_out_toml(args.scale_out_env, args.signed) + (args.config or "") + "\n"
    server = bench.start_berth(os.path.abspath(args.binary), work, "berth", config=config)
    speeds, costs = [], []
    try:
        for run in range(args.runs):
            repo = f"probe/r{run}"
            bench.reset_peak_rss(server.pid)
            s0 = switches(server.pid)
            if chunks:
                wall, cpu = bench.measured(server, lambda: bench.push_chunked(server, repo, chunks, digest))
            else:
                wall, cpu = bench.measured(server, lambda: bench.push_monolithic(server, repo, src, digest))
            s1 = switches(server.pid)
            gb = args.size_mib * MiB / 1e9
            speeds.append(gb * 1000 / wall)
            costs.append(cpu / gb)
            print(f"run {run}: {speeds[-1]:7.0f} MB/s  {costs[-1]:.2f} CPU-s/GB  "
                  f"switches {s1[0] - s0[0]} voluntary, {s1[1] - s0[1]} involuntary, "
                  f"peak RSS {bench.peak_rss_mib(server.pid):.1f} MiB", flush=True)
            # Keep the disk from filling with identical copies.
            for root, _, files in os.walk(os.path.join(work, "berth", "blobs")):
                for name in files:
                    os.unlink(os.path.join(root, name))
    finally:
        server.stop()
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    print(f"median: {statistics.median(speeds):.0f} MB/s, {statistics.median(costs):.2f} CPU-s/GB")


if __name__ == "__main__":
    main()
