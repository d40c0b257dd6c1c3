#!/usr/bin/env python3
"""Checks that Cargo.toml's `rust-version` is what the code needs.

The declared MSRV must equal the highest `rust-version` among the crates each configuration
resolves (our own code cannot build on an older toolchain than its dependencies, and a higher
declaration would be a claim nothing checks). Uses of the standard library newer than the
declared version are caught by clippy's `incompatible_msrv` lint, which CI runs with
`-D warnings` in both configurations.
"""
import json
import subprocess
import sys

CONFIGS = [[], ["--no-default-features", "--features", "ndarray"]]


def version(text):
    return tuple(int(part) for part in text.split("."))


def metadata(flags):
    out = subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--locked", *flags],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out)


def main():
    declared = None
    failures = []
    for flags in CONFIGS:
        meta = metadata(flags)
        root = meta["resolve"]["root"]
        used = {node["id"] for node in meta["resolve"]["nodes"]}
        packages = {p["id"]: p for p in meta["packages"]}
        declared = packages[root]["rust_version"]
        needed = max(
            (
                (version(p["rust_version"]), p["name"])
                for pid, p in packages.items()
                if pid in used and pid != root and p.get("rust_version")
            ),
            default=((0,), "none"),
        )
        label = " ".join(flags) or "default features"
        print(
            f"{label}: rust-version {declared}; highest among dependencies "
            f"{'.'.join(map(str, needed[0]))} ({needed[1]})"
        )
        if version(declared)[:2] != needed[0][:2]:
            failures.append(
                f"{label}: rust-version is {declared}, but the dependencies need "
                f"{'.'.join(map(str, needed[0]))} ({needed[1]})"
            )
    if failures:
        print("\n".join(failures), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
