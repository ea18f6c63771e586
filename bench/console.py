#!/usr/bin/env python3
"""Benchmark of the web console (issue 14): its pages on a registry of 10,000 repositories and
100,000 tags.

The registry is filled through the API (ten tagged images in each repository, sharing one
config and layer per repository), then each page is fetched repeatedly and its median time
taken: the first page of repositories, a search, a page deep in the list, a repository, a
manifest, a tag's history, and the trash. Both deployments.

Run through `bench/run console [--quick]`. Standard library only.
"""

import json
import os
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402
from collector import Client  # noqa: E402
from retention import fill  # noqa: E402


def median_ms(url, n=9):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        with urllib.request.urlopen(url) as r:
            r.read()
            assert r.status == 200, url
        times.append(time.perf_counter() - t0)
    times.sort()
    return round(times[len(times) // 2] * 1000, 1)


def deployment(binary, work, name, storage, repos, tags):
    server = bench.start_berth(binary, work, name, config=storage + "\n[gc]\nenabled = false\n")
    try:
        client = Client(server.base)
        t0 = time.perf_counter()
        fill(client, repos, tags)
        fill_s = time.perf_counter() - t0
        tag = json.loads(bench.fetch(server.base + "/v2/bench/r0500/tags/list"))["tags"][0]
        req = urllib.request.Request(server.base + f"/v2/bench/r0500/manifests/{tag}", method="HEAD",
                                     headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
        with urllib.request.urlopen(req) as r:
            manifest = r.headers["Docker-Content-Digest"]
        b = server.base + "/ui"
        pages = {
            "repositories, first page": f"{b}/",
            "repositories, search": f"{b}/?q=r09",
            "repositories, deep page": f"{b}/?last=bench/r{repos - 60:04d}",
            "a repository": f"{b}/repo?name=bench/r0500",
            "a manifest": f"{b}/manifest?repo=bench/r0500&digest={manifest}",
            "a tag's history": f"{b}/history?repo=bench/r0500&tag={tag}",
            "the trash": f"{b}/trash?repo=bench/r0500",
        }
        return {"name": name, "repositories": repos, "tags": repos * tags, "fill_s": round(fill_s, 1),
                "pages_ms": {page: median_ms(url) for page, url in pages.items()}}
    finally:
        server.stop()


def main():
    args = bench.deployment_args("1,000 repositories instead of 10,000")
    repos, tags = (1000, 10) if args.quick else (10000, 10)
    results = bench.run_recorded(
        args, lambda name, storage: deployment(args.berth, args.work, name, storage, repos, tags))
    print(f"# Console pages — {results['runs'][0]['repositories']:,} repositories, "
          f"{results['runs'][0]['tags']:,} tags\n\nMachine: {results['machine']}; {bench.hash_line(results)}\n")
    names = list(results["runs"][0]["pages_ms"])
    print("| page | " + " | ".join(r["name"] for r in results["runs"]) + " |")
    print("|---|" + "---|" * len(results["runs"]))
    for page in names:
        print(f"| {page} | " + " | ".join(f"{r['pages_ms'][page]} ms" for r in results["runs"]) + " |")
    print("\nFill: " + ", ".join(f"{r['name']} {r['fill_s']} s" for r in results["runs"]))


if __name__ == "__main__":
    main()
