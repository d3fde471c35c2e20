#!/usr/bin/env python3
"""How fast `keygate import` moves keys into a running keygate: the figure behind the README's
"Moving your keys to keygate". Not a test: it prints numbers, it asserts nothing.

    python3 bench/import.py --binary target/release/keygate --backend sqlite
    python3 bench/import.py --binary target/release/keygate --backend postgres \
        --postgres postgres://postgres@127.0.0.1:5432/postgres
    python3 bench/import.py ... --form secret     # plaintext keys instead of SHA-256 hashes

It writes N keys (100 000 by default) of trackagoat's shape, `tga_` + 64 hex, as JSON Lines
(`secret_sha256` + `display_prefix`, or `secret`), starts `keygate serve` on a new database
(a SQLite file in a temporary directory, or a new PostgreSQL database that it drops after),
creates a tenant with grpcurl, times `keygate import --tenant bench FILE` from start to exit,
and prints keys per second. Needs grpcurl on PATH; PostgreSQL also psql.
"""

import argparse
import hashlib
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse

TOKEN = "bench-admin-token-0123456789abcdef"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_keys(path, count, form):
    with open(path, "w") as out:
        for number in range(count):
            key = "tga_" + secrets.token_hex(32)
            line = {"name": f"key {number}", "scopes": ["events:read", "stats:read"]}
            if form == "secret":
                line["secret"] = key
            else:
                line["secret_sha256"] = hashlib.sha256(key.encode()).hexdigest()
                line["display_prefix"] = key[:12]
            out.write(json.dumps(line) + "\n")


def wait_serving(address, deadline=30):
    end = time.time() + deadline
    while time.time() < end:
        probe = subprocess.run(
            ["grpcurl", "-plaintext", address, "grpc.health.v1.Health/Check"],
            capture_output=True, text=True)
        if '"SERVING"' in probe.stdout:
            return
        time.sleep(0.2)
    sys.exit(f"keygate did not become SERVING on {address}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", default="target/release/keygate")
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--postgres", default="postgres://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--form", choices=["sha256", "secret"], default="sha256")
    parser.add_argument("--batch-size", type=int, default=1000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        keys = os.path.join(scratch, "keys.jsonl")
        write_keys(keys, args.keys, args.form)
        database, drop = None, None
        if args.backend == "sqlite":
            database = f"sqlite://{scratch}/keygate.db?mode=rwc"
        else:
            name = f"keygate_bench_import_{os.getpid()}"
            subprocess.run(["psql", args.postgres, "-qc", f"CREATE DATABASE {name}"], check=True)
            drop = ["psql", args.postgres, "-qc", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"]
            parts = urllib.parse.urlsplit(args.postgres)
            database = urllib.parse.urlunsplit(parts._replace(path="/" + name))
        address = f"127.0.0.1:{free_port()}"
        environment = dict(
            os.environ,
            KEYGATE_LISTEN=address,
            KEYGATE_DATABASE_URL=database,
            KEYGATE_ADMIN_TOKENS=f"bench={TOKEN}",
            KEYGATE_IMPORTED_KEY_FORMATS="tga_{hex:64}",
            KEYGATE_METRICS_LISTEN="off",
            RUST_LOG="warn",
        )
        server = subprocess.Popen([args.binary, "serve"], env=environment)
        try:
            wait_serving(address)
            subprocess.run(
                ["grpcurl", "-plaintext", "-H", f"authorization: Bearer {TOKEN}",
                 "-d", '{"tenant_id": "bench", "max_keys": 1}',
                 address, "keygate.v1.KeyAdmin/PutTenant"],
                check=True, capture_output=True)
            client = dict(os.environ, KEYGATE_ADDR=f"http://{address}", KEYGATE_ADMIN_TOKEN=TOKEN)
            started = time.perf_counter()
            result = subprocess.run(
                [args.binary, "import", "--tenant", "bench", "--batch-size", str(args.batch_size), keys],
                env=client, capture_output=True, text=True)
            elapsed = time.perf_counter() - started
        finally:
            server.terminate()
            server.wait()
            if drop:
                subprocess.run(drop, check=False)
    print(result.stdout.strip())
    if result.returncode != 0:
        print(result.stderr.strip())
        sys.exit(f"keygate import exited {result.returncode}")
    print(f"{args.backend}, {args.form}: {args.keys} keys in {elapsed:.1f} s = "
          f"{args.keys / elapsed:,.0f} keys/s (batches of {args.batch_size})")


if __name__ == "__main__":
    main()
