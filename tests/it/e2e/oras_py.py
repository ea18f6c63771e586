"""A thin command line over the ORAS Python SDK (PyPI `oras`), for Berth's end-to-end tests.

    oras_py.py push REGISTRY/REPO:TAG FILE...   prints the manifest digest
    oras_py.py tags REGISTRY/REPO                prints the tags, one per line
    oras_py.py delete-tag REGISTRY/REPO TAG      the SDK's delete: HEAD the tag, DELETE the digest
"""

import sys

import oras.client


def main(argv):
    command, target, *rest = argv
    client = oras.client.OrasClient(hostname=target.split("/", 1)[0], insecure=True)
    if command == "push":
        response = client.push(target=target, files=rest, disable_path_validation=True, quiet=True)
        print(response.headers.get("Docker-Content-Digest", ""))
    elif command == "tags":
        for tag in client.get_tags(target):
            print(tag)
    elif command == "delete-tag":
        if not client.delete_tag(target, rest[0]):
            sys.exit(f"no tag {rest[0]} in {target}")
    else:
        sys.exit(f"unknown command {command}")


if __name__ == "__main__":
    main(sys.argv[1:])
