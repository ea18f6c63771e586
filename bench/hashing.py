#!/usr/bin/env python3
"""Push at the CPU's hashing speed (issue 15): a 1 GiB monolithic push to the embedded deployment,
with the CPU's SHA-NI in use and with it masked from AWS-LC (`OPENSSL_ia32cap`), which is what a
CPU without SHA-NI gives Berth (AVX2 or AVX code paths). For each: the one-core SHA-256 speed of
Berth's implementation, the push's wall time and server CPU per GB, and how much CPU the push
spends beyond hashing (target: at most 0.5 CPU-s/GB). The reference registry runs beside them for
the throughput ratio: Debian's distribution 2.8.2 is built with Go 1.19, whose SHA-256 has no SHA-NI
code at all (not one `sha256rnds2` in the binary) — it runs its AVX2 path here, as it would on a CPU
without SHA-NI, so the masked row against it is the comparison a CPU without SHA-NI gives.

Run through `bench/run hashing [--quick]`. Standard library only.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

MASKS = {"SHA-NI": None, "SHA-NI masked": ":~0x20000000"}


def push(server, path, digest, runs):
    results = []
    for i in range(runs):
        wall, cpu = bench.measured(server, lambda: bench.push_monolithic(server, f"bench/hash{i}", path, digest))
        results.append((wall, cpu))
    return min(results)


def main():
    args, size, path, digest = bench.blob_args(__doc__)
    gb = size / 1e9
    results = {**bench.machine_facts(args.berth), "bytes": size, "rows": []}
    for name, mask in MASKS.items():
        env = {"OPENSSL_ia32cap": mask} if mask else {}
        speed = json.loads(bench.subprocess.run([args.berth, "hash-speed"], env=dict(os.environ, **env),
                                                check=True, capture_output=True, text=True).stdout)
        server = bench.start_berth(args.berth, args.work, f"berth-{len(results['rows'])}", env_extra=env)
        try:
            wall, cpu = push(server, path, digest, 3)
        finally:
            server.stop()
        hash_cost = 1000 / speed["berth_sha256_MBps"]  # CPU-s per GB
        results["rows"].append({"name": name, "hash_MBps": speed["berth_sha256_MBps"], "MBps": size / 1e6 / wall,
                                "cpu_s_per_GB": cpu / gb, "hash_cpu_s_per_GB": hash_cost,
                                "beyond_hashing": cpu / gb - hash_cost})
    # The reference hashes the same way on every x86-64 CPU with AVX2 (its Go has no SHA-NI code).
    reference = bench.start_reference(args.work)
    try:
        wall, cpu = push(reference, path, digest, 3)
        results["reference"] = {"MBps": size / 1e6 / wall, "cpu_s_per_GB": cpu / gb}
    finally:
        reference.stop()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    ref = results["reference"]
    lines = [f"Machine: {results['machine']}; OpenSSL SHA-256 {results['sha256_MBps']:.0f} MB/s on one core; "
             f"{size // bench.MiB} MiB monolithic push, best of 3", "",
             "| SHA-256 | Berth's hash speed | push | push CPU | of which hashing | beyond hashing | push ÷ reference |",
             "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['name']} | {r['hash_MBps']:.0f} MB/s | {r['MBps']:.0f} MB/s | {r['cpu_s_per_GB']:.2f} CPU-s/GB | "
                     f"{r['hash_cpu_s_per_GB']:.2f} | {r['beyond_hashing']:.2f} | {r['MBps'] / ref['MBps']:.2f}× |")
    lines.append(f"| reference (Go 1.19, AVX2, no SHA-NI code) | | {ref['MBps']:.0f} MB/s | "
                 f"{ref['cpu_s_per_GB']:.2f} CPU-s/GB | | | |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
