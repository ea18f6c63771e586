#!/usr/bin/env python3
"""Benchmark of `berth import` (issue 13): adopting a store the reference registry wrote.

The reference registry (Debian's docker-registry, distribution 2.8) is filled through its API
with `--images` images in repositories of ten tags, each image its own config and small layer
over one shared base layer, plus `--big` images with a `--big-mib` layer each, so the store
holds far more bytes than metadata. Then, on each deployment:

* a dry run, the pre-import, a catch-up with nothing changed and a catch-up after ten tags
  moved, each timed (wall and the import process's CPU) — images per second for the pre-import;
* embedded: the store is imported from its own directory (hard links);
* scale-out: the store's files are copied into the bucket key for key (distribution 2.8's S3
  driver cannot complete uploads against Garage), and imported from there in place.

Run through `bench/run import [--quick]`. Standard library only.
"""

import argparse
import concurrent.futures
import json
import os
import resource
import subprocess
import sys
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402
from collector import MEDIA, Client, parallel  # noqa: E402
from s3_ceiling import s3_curl, s3_env  # noqa: E402

TAGS_PER_REPO = 10


class RefClient(Client):
    """The reference registry takes a blob in two requests (POST, then PUT with the digest)."""

    def upload(self, repo, data):
        import hashlib
        import http.client
        d = "sha256:" + hashlib.sha256(data).hexdigest()
        conn = http.client.HTTPConnection(self.netloc, timeout=120)
        conn.request("POST", f"/v2/{repo}/blobs/uploads/")
        r = conn.getresponse()
        r.read()
        assert r.status == 202, f"start upload to {repo}: {r.status}"
        loc = urllib.parse.urlsplit(r.getheader("Location"))
        sep = "&" if loc.query else ""
        conn.request("PUT", f"{loc.path}?{loc.query}{sep}digest={d}", body=data,
                     headers={"Content-Type": "application/octet-stream"})
        r = conn.getresponse()
        r.read()
        conn.close()
        assert r.status == 201, f"upload to {repo}: {r.status}"
        return d


def fill(server, images, big, big_mib):
    client = RefClient(server.base)
    base = os.urandom(64 * 1024)
    repos = max(1, images // TAGS_PER_REPO)

    def image(i, layer):
        repo = f"bench/r{i % repos:04d}"
        cfg = json.dumps({"architecture": "amd64", "os": "linux", "n": i}).encode()
        body = json.dumps({
            "schemaVersion": 2, "mediaType": MEDIA,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": client.upload(repo, cfg), "size": len(cfg)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": client.upload(repo, base),
                        "size": len(base)},
                       {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": client.upload(repo, layer),
                        "size": len(layer)}],
        }).encode()
        status = client.request("PUT", f"/v2/{repo}/manifests/t{i // repos}", body, {"Content-Type": MEDIA})
        assert status == 201, f"{repo}: {status}"

    parallel(lambda i: image(i, os.urandom(4096)), range(images), workers=8)
    for b in range(big):
        image(images + b, os.urandom(big_mib * bench.MiB))


def move_tags(server, n):
    """Moves `n` tags to new images."""
    client = RefClient(server.base)
    cfg = b'{"moved":true}'
    layer = os.urandom(4096)
    for i in range(n):
        repo = f"bench/r{i:04d}"
        body = json.dumps({
            "schemaVersion": 2, "mediaType": MEDIA,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": client.upload(repo, cfg), "size": len(cfg)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": client.upload(repo, layer), "size": len(layer)}],
        }).encode()
        assert client.request("PUT", f"/v2/{repo}/manifests/t0", body, {"Content-Type": MEDIA}) == 201


def files_under(root):
    for dirpath, _, names in os.walk(root):
        for name in names:
            full = os.path.join(dirpath, name)
            yield os.path.relpath(full, root), full


def mirror(env, root, prefix, seen):
    """Copies new and rewritten files of `root` into the bucket under `prefix`."""
    todo = [(rel, full) for rel, full in files_under(root)
            if seen.get(rel) != os.stat(full).st_mtime_ns]
    endpoint, bucket = env["BERTH_TEST_S3_ENDPOINT"], env["BERTH_TEST_S3_BUCKET"]

    def put(item):
        rel, full = item
        s3_curl(env, "-X", "PUT", "-T", full, f"{endpoint}/{bucket}/{prefix}/{rel}")
        seen[rel] = os.stat(full).st_mtime_ns

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(put, todo))
    return len(todo)


def timed_import(binary, deployment_args, source, *extra):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    out = subprocess.run([binary, "import", *deployment_args, "--from", source, "--json", *extra],
                         check=True, capture_output=True, text=True)
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    report = json.loads(out.stdout)
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "manifests": report["manifests_imported"],
            "blobs_adopted": report["blobs_adopted"], "bytes_adopted": report["bytes_adopted"],
            "tags_new": len(report["tags_new"]), "tags_moved": len(report["tags_moved"]),
            "links_read": report["links_read"], "skipped": len(report["skipped"])}


def steps(binary, reference, deployment_args, source, before_catch_up):
    r = {"dry_run": timed_import(binary, deployment_args, source, "--dry-run")}
    # A run reads again what was written within a minute before the previous run started (object
    # stores keep times to the second): a store last written a minute before the pre-import, as
    # in an operator's pre-import of a registry in use, shows what a catch-up then reads.
    time.sleep(61)
    r["pre_import"] = timed_import(binary, deployment_args, source)
    r["pre_import"]["images_per_s"] = round(r["pre_import"]["manifests"] / r["pre_import"]["wall_s"])
    before_catch_up()
    r["catch_up_unchanged"] = timed_import(binary, deployment_args, source)
    move_tags(reference, 10)
    before_catch_up()
    r["catch_up_10_moved"] = timed_import(binary, deployment_args, source, "--final")
    return r


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--berth", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--scale-out-env", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--big", type=int, default=4)
    p.add_argument("--big-mib", type=int, default=256)
    a = p.parse_args()
    if a.quick:
        a.images, a.big, a.big_mib = 200, 2, 64
    os.makedirs(a.work, exist_ok=True)
    results = {**bench.machine_facts(a.berth), "images": a.images + a.big, "big": [a.big, a.big_mib]}
    reference = bench.start_reference(a.work)
    try:
        t = time.monotonic()
        fill(reference, a.images, a.big, a.big_mib)
        results["fill_s"] = round(time.monotonic() - t, 1)
        root = reference.blob_dir
        results["store_bytes"] = sum(os.stat(f).st_size for _, f in files_under(root))

        data = os.path.join(a.work, "embedded")
        results["embedded"] = steps(a.berth, reference, ["--data-dir", data], root, lambda: None)

        env = s3_env(a.scale_out_env)
        config = os.path.join(a.work, "scale-out.toml")
        with open(config, "w") as f:
            f.write(bench.scale_out_toml(a.scale_out_env) + "\n[gc]\nenabled = false\n")
        prefix = [line.split("=", 1)[1].strip().strip('"') for line in open(config) if line.startswith("prefix")][0]
        seen = {}
        t = time.monotonic()
        results["mirrored_objects"] = mirror(env, root, f"{prefix}/dist", seen)
        results["mirror_s"] = round(time.monotonic() - t, 1)
        source = f"s3://{env['BERTH_TEST_S3_BUCKET']}/{prefix}/dist"
        results["scale_out"] = steps(a.berth, reference, ["--config", config], source,
                                     lambda: mirror(env, root, f"{prefix}/dist", seen))
    finally:
        reference.stop()
    with open(a.out, "w") as f:
        json.dump(results, f, indent=2)
    print(table(results))


def table(r):
    lines = [f"# berth import — {r['images']} images ({r['big'][0]} with a {r['big'][1]} MiB layer), "
             f"{r['store_bytes'] / bench.MiB:.0f} MiB stored", "", f"Machine: {r['machine']}; {bench.hash_line(r)}", "",
             "| deployment | step | wall s | CPU s | manifests | blobs adopted | MiB adopted | links read | images/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for dep in ("embedded", "scale_out"):
        for step, s in r.get(dep, {}).items():
            lines.append(f"| {dep} | {step} | {s['wall_s']} | {s['cpu_s']} | {s['manifests']} | {s['blobs_adopted']} "
                         f"| {s['bytes_adopted'] / bench.MiB:.0f} | {s['links_read']} | {s.get('images_per_s', '')} |")
    lines.append("")
    lines.append(f"Fill through the reference registry's API: {r['fill_s']} s; copy into the bucket: "
                 f"{r.get('mirror_s')} s ({r.get('mirrored_objects')} objects).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
