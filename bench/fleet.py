#!/usr/bin/env python3
"""bench/fleet's simulation: many hosts running the real hail binary, as their
timers would start it, against a Hydra stand-in that costs what real Hydra
costs, directly and through examples/hydra-cache.

  fleet.py hydra --dir DIR --workers W --latest-cost S --build-cost S --build-json FILE
  fleet.py run --hail BIN --repo DIR --work DIR --paths A B --out FILE.json [options]
  fleet.py report --results FILE.json --meta META --out FILE.md

`hydra` is the stand-in: W pre-forked worker processes (as starman runs
Hydra) on one socket on 127.0.0.1, answering `JOB/latest` (a 302 built from
the Host, with Hydra's Vary, session cookie and "Moved" page) and `/build/ID`
(the build object, shaped like tests/data/hydra/build.json) after burning the
CPU time real Hydra spends on them. DIR/control.json says which build is the
latest and whether to burn; each worker logs every request to DIR (start, end,
method, path, status, bytes sent, CPU seconds).

`run` simulates, in each mode (`direct`, `front`), HOSTS hosts in time scaled
down by SCALE: a pass's timer fires PERIOD/SCALE after the previous pass ended
plus up to JITTER/SCALE at random (OnUnitInactiveSec= and RandomizedDelaySec=
of systemd/hail@.timer), the front's lifetime is LIFETIME/SCALE. Every host
first deploys build 1 (unmeasured, nothing burnt); then one no-change pass
alone is measured; then the timers run for STEADY periods, build 2 becomes
the latest, and they run until every host has deployed it (bounded by a
deadline). Results: JSON, in simulated seconds.

`report` turns them into real time (divides rates by SCALE) and extrapolates
to fleets of 1,000 and 10,000 hosts; see the report's "Method".
"""

import heapq
import json
import math
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import time

KEEPALIVE_TIMEOUT = 1.0  # starman's default --keepalive-timeout
SESSION = "hydra_session=7bef16bc5eec5bfe867b15519e8b078f01570907; path=/; expires=Wed, 02-Dec-2026 21:30:43 GMT; HttpOnly; SameSite=Lax"
MOVED = (
    '<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Strict//EN" '
    '"http://www.w3.org/TR/xhtml1/DTD/xhtml1-strict.dtd">\n'
    '    <html xmlns="http://www.w3.org/1999/xhtml">\n    <head>\n    <title>Moved</title>\n'
    '    </head>\n    <body>\n   <p>This item has moved <a href="{0}">here</a>.</p>\n'
    "</body>\n</html>\n"
)
JOB_PATH = "/job/bench/main/agent"
PASS_TIMEOUT = 60  # seconds a pass may take before it is killed and counted failed
WARMUP_CONCURRENCY = 4


def die(msg):
    print(f"fleet.py: {msg}", file=sys.stderr)
    sys.exit(1)


def options(args, defaults):
    """--name value pairs over `defaults` (whose types they take); --paths takes two."""
    opts = dict(defaults)
    i = 0
    while i < len(args):
        name = args[i]
        if not name.startswith("--") or name[2:] not in defaults:
            die(f"unknown argument {name}")
        key = name[2:]
        if key == "paths":
            opts[key] = args[i + 1 : i + 3]
            i += 3
            continue
        if i + 1 >= len(args):
            die(f"{name} needs a value")
        default = defaults[key]
        opts[key] = type(default)(args[i + 1]) if default is not None else args[i + 1]
        i += 2
    missing = [k for k, v in opts.items() if v is None]
    if missing:
        die("missing " + ", ".join("--" + k for k in missing))
    return opts


def write_json_atomically(path, value):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)


# ---------------------------------------------------------------- the Hydra stand-in


def burn(seconds):
    """Spends `seconds` of this thread's CPU time."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


class Control:
    """DIR/control.json, re-read whenever it was replaced."""

    def __init__(self, path):
        self.path = path
        self.stamp = None
        self.value = None

    def get(self):
        st = os.stat(self.path)
        stamp = (st.st_ino, st.st_mtime_ns)
        if stamp != self.stamp:
            with open(self.path) as f:
                self.value = json.load(f)
            self.stamp = stamp
        return self.value


def http_date():
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())


def encode(status, reason, headers, body, head):
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines += [f"{k}: {v}" for k, v in headers]
    lines += [
        "Vary: Accept",
        f"Set-Cookie: {SESSION}",
        f"Content-Length: {len(body)}",
        f"Date: {http_date()}",
        "Connection: keep-alive",
    ]
    data = ("\r\n".join(lines) + "\r\n\r\n").encode()
    return data if head else data + body


def answer(method, path, headers, control, build_template, costs):
    """(status, response bytes) as real Hydra would answer."""
    state = control.get()
    head = method == "HEAD"
    accept = headers.get("accept", "")
    json_wanted = accept.split(",")[0].split(";")[0].strip() == "application/json"
    if path == JOB_PATH + "/latest":
        if state["costs"]:
            burn(costs["latest"])
        location = f"http://{headers.get('host', 'localhost')}/build/{state['latest']}"
        body = MOVED.format(location).encode()
        return 302, encode(
            302,
            "Found",
            [("Location", location), ("Content-Type", "text/html; charset=utf-8")],
            body,
            head,
        )
    m = re.fullmatch(r"/build/([0-9]+)", path)
    if m:
        if state["costs"]:
            burn(costs["build"])
        out = state["builds"].get(m.group(1))
        if out is None:
            body = json.dumps({"error": f"Build with ID {m.group(1)} doesn't exist."}).encode()
            return 404, encode(404, "Not Found", [("Content-Type", "application/json")], body, head)
        if not json_wanted:
            body = b"<!DOCTYPE html>\n<html><head><title>Build</title></head></html>\n"
            return 200, encode(200, "OK", [("Content-Type", "text/html; charset=utf-8")], body, head)
        build = json.loads(build_template)
        name = out.split("-", 1)[1]
        build["id"] = int(m.group(1))
        build["buildoutputs"]["out"]["path"] = out
        build["buildproducts"]["1"]["path"] = out
        build["buildproducts"]["1"]["name"] = name
        build["nixname"] = name
        body = json.dumps(build, separators=(",", ":")).encode()
        return 200, encode(200, "OK", [("Content-Type", "application/json")], body, head)
    body = json.dumps({"error": "Page not found."}).encode()
    return 404, encode(404, "Not Found", [("Content-Type", "application/json")], body, head)


def serve_connection(conn, log, control, build_template, costs):
    buf = b""
    while True:
        while b"\r\n\r\n" not in buf:
            try:
                chunk = conn.recv(65536)
            except (socket.timeout, ConnectionError):
                return
            if not chunk:
                return
            buf += chunk
        raw, buf = buf.split(b"\r\n\r\n", 1)
        start, cpu = time.monotonic(), time.process_time()
        lines = raw.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3:
            return
        method, path, version = parts
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        status, data = answer(method, path, headers, control, build_template, costs)
        try:
            conn.sendall(data)
        except ConnectionError:
            return
        os.write(
            log,
            f"{start:.6f} {time.monotonic():.6f} {method} {path} {status} {len(data)} "
            f"{time.process_time() - cpu:.6f}\n".encode(),
        )
        if version == "HTTP/1.0" or headers.get("connection", "").lower() == "close":
            return


def worker(sock, n, opts):
    control = Control(os.path.join(opts["dir"], "control.json"))
    log = os.open(
        os.path.join(opts["dir"], f"hydra-{n}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644
    )
    with open(opts["build-json"]) as f:
        build_template = f.read()
    costs = {"latest": opts["latest-cost"], "build": opts["build-cost"]}
    while True:
        conn, _ = sock.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(KEEPALIVE_TIMEOUT)
        try:
            serve_connection(conn, log, control, build_template, costs)
        finally:
            conn.close()


def cmd_hydra(args):
    opts = options(
        args,
        {"dir": None, "workers": 2, "latest-cost": 0.020, "build-cost": 0.060, "build-json": None},
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    children = []
    for n in range(opts["workers"]):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            try:
                worker(sock, n, opts)
            finally:
                os._exit(1)
        children.append(pid)

    def stop(*_):
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    write_json_atomically(
        os.path.join(opts["dir"], "hydra.json"),
        {"port": sock.getsockname()[1], "workers": children},
    )
    pid, status = os.wait()
    die(f"stand-in worker {pid} ended (status {status})")


# ---------------------------------------------------------------- the fleet


class Service:
    """A process of ours (the stand-in, nginx), ended by its process group."""

    def __init__(self, argv, what):
        self.what = what
        self.proc = subprocess.Popen(
            argv, start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        )

    def alive(self):
        return self.proc.poll() is None

    def cpu(self):
        """CPU seconds (user + system) of the group's processes so far."""
        total = 0
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
            except FileNotFoundError:
                pass
        return total / os.sysconf("SC_CLK_TCK")

    def pids(self):
        pids = [self.proc.pid]
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except FileNotFoundError:
                    continue
                if int(fields[3]) == self.proc.pid and int(entry) != self.proc.pid:
                    pids.append(int(entry))
        return pids

    def stop(self):
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def wait_for(check, what, limit=10.0):
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            die(f"waited {limit:.0f} s for {what}")
        time.sleep(0.02)


def start_hydra(cfg, d):
    info = os.path.join(d, "hydra.json")
    hydra = Service(
        [
            sys.executable,
            os.path.abspath(__file__),
            "hydra",
            "--dir",
            d,
            "--workers",
            str(cfg["workers"]),
            "--latest-cost",
            str(cfg["latest-cost"]),
            "--build-cost",
            str(cfg["build-cost"]),
            "--build-json",
            os.path.join(cfg["repo"], "tests/data/hydra/build.json"),
        ],
        "the Hydra stand-in",
    )
    wait_for(lambda: os.path.exists(info) or not hydra.alive(), "the stand-in")
    if not hydra.alive():
        die("the Hydra stand-in did not start")
    with open(info) as f:
        hydra.port = json.load(f)["port"]
    return hydra


def nginx_temp_paths(d):
    """The temp path directives this nginx's modules take, all in `d`."""
    built = subprocess.run(["nginx", "-V"], capture_output=True, text=True).stderr
    return "".join(
        f"  {m}_temp_path {d}/{m};\n"
        for m in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        if m == "client_body" or f"--without-http_{m}_module" not in built
    )


def start_front(cfg, d, upstream_port):
    """nginx with examples/hydra-cache, filled in as its README says."""
    example = os.path.join(cfg["repo"], "examples/hydra-cache")
    params = {
        "@UPSTREAM@": f"127.0.0.1:{upstream_port}",
        "@LIFETIME@": f"{cfg['lifetime-sim']}s",
        "@ERROR_LIFETIME@": "1s",
        "@CACHE_DIR@": os.path.join(d, "cache"),
        "@AUTH_CHECKED@": "0",
    }
    for part in ("http", "server"):
        with open(os.path.join(example, f"{part}.conf.in")) as f:
            text = f.read()
        for name, value in params.items():
            text = text.replace(name, value)
        with open(os.path.join(d, f"{part}.conf"), "w") as f:
            f.write(text)
    for attempt in range(5):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with open(os.path.join(d, "front.conf"), "w") as f:
            f.write(
                f"daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n"
                "events { worker_connections 4096; }\n"
                "http {\n"
                "  log_format fleet '$msec $request_time $request_method $request_uri $status "
                "$bytes_sent $upstream_cache_status';\n"
                f"  access_log {d}/front.log fleet;\n"
                f"{nginx_temp_paths(d)}"
                f"  server {{\n    listen 127.0.0.1:{port};\n    include {d}/server.conf;\n  }}\n"
                f"  include {d}/http.conf;\n"
                "}\n"
            )
        front = Service(
            ["nginx", "-p", d, "-c", f"{d}/front.conf", "-e", f"{d}/error.log"], "nginx"
        )
        front.port = port

        def up():
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return not front.alive()

        wait_for(up, "nginx")
        if front.alive():
            return front
    with open(os.path.join(d, "error.log")) as f:
        die(f"nginx did not start:\n{f.read()}")


def read_hydra_log(d):
    requests = []
    for name in sorted(os.listdir(d)):
        if name.startswith("hydra-") and name.endswith(".log"):
            with open(os.path.join(d, name)) as f:
                for line in f:
                    start, end, method, path, status, size, cpu = line.split()
                    requests.append(
                        {
                            "start": float(start),
                            "end": float(end),
                            "method": method,
                            "path": path,
                            "status": int(status),
                            "bytes": int(size),
                            "cpu": float(cpu),
                        }
                    )
    requests.sort(key=lambda r: r["start"])
    return requests


def read_front_log(d, clock_offset):
    """nginx's lines, with $msec (wall clock) moved to the monotonic clock."""
    path = os.path.join(d, "front.log")
    if not os.path.exists(path):
        return []
    lines = []
    with open(path) as f:
        for line in f:
            msec, rtime, method, uri, status, size, cache = line.split()
            lines.append(
                {
                    "end": float(msec) - clock_offset,
                    "method": method,
                    "path": uri,
                    "status": int(status),
                    "bytes": int(size),
                    "cache": cache,
                }
            )
    return lines


def kind(path):
    if path.endswith("/latest"):
        return "latest"
    if path.startswith("/build/"):
        return "build"
    return "other"


class Fleet:
    def __init__(self, cfg, d, job):
        self.cfg = cfg
        self.d = d
        self.job = job
        self.hosts = [f"h{i}" for i in range(cfg["hosts"])]
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("HAIL_")
            and k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM", "INVOCATION_ID", "STATE_DIRECTORY")
        }
        # Both builds are in /nix/store already: nothing to substitute.
        self.env["NIX_CONFIG"] = "substituters =\nbuild-users-group =\n"
        # A generator per host: each host's timer draws the same delays in
        # both modes, whatever order the passes end in.
        self.rng = {h: random.Random(f"{cfg['seed']}-{h}") for h in self.hosts}
        self.passes = []
        self.failures = []

    def argv(self, host):
        return [
            self.cfg["hail"],
            "--oneshot",
            "--profile",
            host,
            "--job-uri",
            self.job,
            "--profiles-dir",
            os.path.join(self.d, "profiles"),
            "--state-dir",
            os.path.join(self.d, "state"),
        ]

    def target(self, host):
        return os.path.realpath(os.path.join(self.d, "profiles", host))

    def start(self, host):
        return subprocess.Popen(
            self.argv(host),
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def finish(self, host, proc, started):
        """Records a pass that has exited; returns its record."""
        err = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
        record = {
            "host": host,
            "start": started,
            "end": time.monotonic(),
            "code": proc.returncode,
            "target": self.target(host),
        }
        self.passes.append(record)
        if proc.returncode != 0:
            self.failures.append(f"{host}: exit {proc.returncode}: {err.strip()[-500:]}")
        return record

    def run_one(self, host):
        started = time.monotonic()
        proc = self.start(host)
        try:
            proc.wait(timeout=PASS_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return self.finish(host, proc, started)

    def warm_up(self, path):
        """Every host's first pass, a few at a time: all at build 1."""
        pending = list(self.hosts)
        running = []
        while pending or running:
            while pending and len(running) < WARMUP_CONCURRENCY:
                host = pending.pop()
                running.append((host, self.start(host), time.monotonic()))
            time.sleep(0.005)
            for entry in list(running):
                host, proc, started = entry
                if proc.poll() is None and time.monotonic() - started > PASS_TIMEOUT:
                    proc.kill()
                    proc.wait()
                if proc.poll() is not None:
                    running.remove(entry)
                    self.finish(host, proc, started)
        wrong = [h for h in self.hosts if self.target(h) != path]
        if wrong:
            die(f"after the first passes {len(wrong)} hosts are not at {path}: {self.failures[:3]}")
        self.passes.clear()

    def timers(self, t0, t_build, set_latest, path_new, deadline):
        """Runs the hosts' timers from t0; at t_build calls set_latest(), which
        makes `path_new`'s build the latest. Returns when every host has
        deployed it, or at `deadline`: {host: the pass that deployed it}."""
        period = self.cfg["period"] / self.cfg["scale"]
        jitter = self.cfg["jitter"] / self.cfg["scale"]
        # A fleet that has run for a while: each host somewhere in its cycle.
        due = [
            (t0 + self.rng[h].uniform(0, period + self.rng[h].uniform(0, jitter)), h)
            for h in self.hosts
        ]
        heapq.heapify(due)
        running = {}
        deployed = {}
        built = False
        while True:
            now = time.monotonic()
            if not built and now >= t_build:
                set_latest()
                built = True
            for host, (proc, started) in list(running.items()):
                if proc.poll() is None and time.monotonic() - started < PASS_TIMEOUT:
                    continue
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                del running[host]
                record = self.finish(host, proc, started)
                if built and host not in deployed and record["target"] == path_new:
                    deployed[host] = record
                delay = period + self.rng[host].uniform(0, jitter)
                heapq.heappush(due, (record["end"] + delay, host))
            if (built and len(deployed) == len(self.hosts)) or now >= deadline:
                break
            while due and due[0][0] <= now:
                _, host = heapq.heappop(due)
                running[host] = (self.start(host), time.monotonic())
            time.sleep(0.002)
        for host, (proc, started) in running.items():
            try:
                proc.wait(timeout=PASS_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self.finish(host, proc, started)
        return deployed


def run_mode(cfg, mode, path_old, path_new):
    d = os.path.join(cfg["work"], mode)
    for sub in ("profiles", "state"):
        os.makedirs(os.path.join(d, sub))
    control = os.path.join(d, "control.json")
    builds = {"1": path_old, "2": path_new}
    write_json_atomically(control, {"latest": 1, "builds": builds, "costs": False})
    hydra = start_hydra(cfg, d)
    front = start_front(cfg, d, hydra.port) if mode == "front" else None
    services = [s for s in (hydra, front) if s]
    port = front.port if front else hydra.port
    # nginx logs wall-clock times; the rest of this uses the monotonic clock.
    clock_offset = time.time() - time.monotonic()
    try:
        fleet = Fleet(cfg, d, f"http://127.0.0.1:{port}{JOB_PATH}")
        print(f"fleet: {mode}: first passes of {len(fleet.hosts)} hosts", file=sys.stderr)
        fleet.warm_up(path_old)
        write_json_atomically(control, {"latest": 1, "builds": builds, "costs": True})

        # One no-change pass alone (after one that fills the front's cache).
        fleet.run_one(fleet.hosts[0])
        probe_start = time.monotonic()
        front_lines = len(read_front_log(d, clock_offset))
        probe = fleet.run_one(fleet.hosts[0])
        probe_end = time.monotonic()
        time.sleep(0.05)  # nginx logs a request as it finishes it
        probe_front = read_front_log(d, clock_offset)[front_lines:]
        if probe["code"] != 0:
            die(f"the no-change pass failed: {fleet.failures[-1]}")
        fleet.passes.clear()

        period = cfg["period"] / cfg["scale"]
        jitter = cfg["jitter"] / cfg["scale"]
        lifetime = cfg["lifetime-sim"] if front else 0
        t0 = time.monotonic() + 0.5
        t_build = t0 + cfg["steady"] * (period + jitter / 2)
        # Every host has deployed after a period, its jitter and the lifetime;
        # twice that and the passes' own time bound the wait.
        deadline = t_build + 2 * (period + jitter + lifetime) + 10
        cpu_marks = {}

        def set_latest():
            cpu_marks["build"] = [s.cpu() for s in services]
            write_json_atomically(control, {"latest": 2, "builds": builds, "costs": True})

        print(
            f"fleet: {mode}: timers for {t_build - t0:.0f} s, then a new build",
            file=sys.stderr,
        )
        time.sleep(max(0.0, t0 - time.monotonic()))
        cpu_marks["start"] = [s.cpu() for s in services]
        deployed = fleet.timers(t0, t_build, set_latest, path_new, deadline)
        t_end = max((r["end"] for r in deployed.values()), default=time.monotonic())
        cpu_marks["end"] = [s.cpu() for s in services]
        for s in services:
            if not s.alive():
                die(f"{s.what} died during the run")
    finally:
        for s in services:
            s.stop()

    hydra_log = read_hydra_log(d)
    front_log = read_front_log(d, clock_offset)

    def window(log, lo, hi, key="start"):
        return [r for r in log if lo <= r.get(key, r.get("end")) < hi]

    def summary(lo, hi):
        reqs = window(hydra_log, lo, hi)
        by_kind = {}
        for r in reqs:
            k = by_kind.setdefault(kind(r["path"]), {"requests": 0, "cpu": 0.0})
            k["requests"] += 1
            k["cpu"] += r["cpu"]
        passes = [p for p in fleet.passes if lo <= p["start"] < hi]
        return {
            "seconds": hi - lo,
            "hydra": by_kind,
            "hydra_requests": len(reqs),
            "hydra_cpu": sum(r["cpu"] for r in reqs),
            "front_requests": len(window(front_log, lo, hi, "end")),
            "passes": len(passes),
        }

    def service_cpu(a, b):
        return [round(y - x, 3) for x, y in zip(cpu_marks[a], cpu_marks[b])]

    per_request = {}
    for k in ("latest", "build"):
        cpus = [r["cpu"] for r in hydra_log if kind(r["path"]) == k and r["start"] >= t0]
        walls = [r["end"] - r["start"] for r in hydra_log if kind(r["path"]) == k and r["start"] >= t0]
        if cpus:
            per_request[k] = {
                "cpu_median": statistics.median(cpus),
                "wall_median": statistics.median(walls),
                "wall_max": max(walls),
            }
    # A deploy's latency in real time: the timer's wait scales, the pass does not.
    latencies = sorted(
        (r["start"] - t_build) * cfg["scale"] + (r["end"] - r["start"]) for r in deployed.values()
    )
    no_change = [
        p["end"] - p["start"]
        for p in fleet.passes
        if p["start"] < t_build and p["code"] == 0
    ]
    intervals = []
    by_host = {}
    for p in sorted(fleet.passes, key=lambda p: p["start"]):
        if p["host"] in by_host:
            intervals.append(p["start"] - by_host[p["host"]])
        by_host[p["host"]] = p["start"]
    probe_hydra = window(hydra_log, probe_start, probe_end)
    received = probe_front if front else probe_hydra
    return {
        "mode": mode,
        "probe": {
            "requests": len(received),
            "answers": [f"{r['method']} {r['status']}" for r in received],
            "cache": [r.get("cache", "") for r in probe_front],
            "bytes_received": sum(r["bytes"] for r in received),
            "hydra_requests": len(probe_hydra),
            "seconds": probe_end - probe_start,
        },
        "steady": summary(t0, t_build) | {"service_cpu": service_cpu("start", "build")},
        "rollout": summary(t_build, t_end) | {"service_cpu": service_cpu("build", "end")},
        "services": [s.what for s in services],
        "per_request": per_request,
        "hosts": len(fleet.hosts),
        "deployed": len(deployed),
        "latencies": latencies,
        "no_change_pass_median": statistics.median(no_change) if no_change else None,
        "interval_mean": statistics.mean(intervals) if intervals else None,
        "passes": len(fleet.passes),
        "failures": fleet.failures[:5],
        "failed_passes": len(fleet.failures),
    }


def cmd_run(args):
    cfg = options(
        args,
        {
            "hail": None,
            "repo": None,
            "work": None,
            "paths": None,
            "out": None,
            "hosts": 200,
            "scale": 10,
            "period": 300.0,
            "jitter": 60.0,
            "lifetime": 10,
            "steady": 1.0,
            "workers": 2,
            "latest-cost": 0.020,
            "build-cost": 0.060,
            "modes": "direct,front",
            "seed": 1,
        },
    )
    if cfg["lifetime"] % cfg["scale"]:
        die(
            f"--lifetime {cfg['lifetime']} / --scale {cfg['scale']} is not a whole number of "
            "seconds, which nginx needs"
        )
    cfg["lifetime-sim"] = cfg["lifetime"] // cfg["scale"]
    old, new = cfg["paths"]
    results = {"config": {k: v for k, v in cfg.items() if k != "paths"}, "modes": []}
    for mode in cfg["modes"].split(","):
        if mode not in ("direct", "front"):
            die(f"unknown mode {mode}")
        results["modes"].append(run_mode(cfg, mode, old, new))
    with open(cfg["out"], "w") as f:
        json.dump(results, f, indent=1)


# ---------------------------------------------------------------- report


def pct(values, p):
    """The p-th percentile (nearest rank)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def cmd_report(args):
    opts = options(args, {"results": None, "meta": None, "out": None})
    with open(opts["results"]) as f:
        results = json.load(f)
    meta = {}
    with open(opts["meta"]) as f:
        for line in f:
            key, _, value = line.rstrip("\n").partition("=")
            meta[key] = value
    text = report(results, meta)
    with open(opts["out"], "w") as f:
        f.write(text)
    sys.stdout.write(text)


def report(results, meta):
    cfg = results["config"]
    k = cfg["scale"]
    P, J, L = cfg["period"], cfg["jitter"], cfg["lifetime"]
    M = cfg["hosts"]
    modes = {m["mode"]: m for m in results["modes"]}
    out = []
    w = out.append
    w(f"Run {meta['date']} on {meta['machine']}.")
    w("")
    w(f"Command: `{meta['command']}`")
    w("")
    w(f"hail: `{meta['hail']}` ({meta['hail_kind']}), {meta['hail_version']}; {meta['nginx']}.")
    w(f"Load average before / after: {meta['load_before']} / {meta['load_after']}.")
    w("")
    if meta.get("quick") == "1":
        w(
            "**Quick mode: a handful of hosts and a short period. These numbers only show "
            "that the script works; they are not a measurement.**"
        )
        w("")
    w(
        f"{M} hosts, each running the real hail binary as `hail@.timer` would: "
        f"a pass {P:g} s after the previous one ended plus up to {J:g} s at random, "
        f"in time scaled down {k}× (so {P / k:g} s + up to {J / k:g} s; the front's "
        f"lifetime of {L} s became {L // k} s, which nginx, counting whole seconds, "
        f"keeps {L // k}–{L // k + 1} s: {L}–{L + k} s in real time, against "
        f"{L}–{L + 1} s for a real front). The Hydra stand-in burns "
        f"{cfg['latest-cost'] * 1000:g} ms of CPU per `JOB/latest` and "
        f"{cfg['build-cost'] * 1000:g} ms per `/build/ID` in {cfg['workers']} worker "
        f"processes. The fleet ran for {cfg['steady']:g} period(s) with nothing "
        "new, then build 2 became the latest and the run went on until every host "
        "had deployed it. Rates below are in real time: measured ones divided by "
        f"{k}; latencies multiplied by {k} (the passes' own duration is not scaled)."
    )
    w("")

    # No-change pass.
    w("### No-change pass")
    w("")
    w("| | requests hail sent | answers | bytes hail received | requests Hydra received |")
    w("|---|---:|---|---:|---:|")
    for name, m in modes.items():
        p = m["probe"]
        answers = ", ".join(
            a + (f" ({c})" if c and c != "-" else "")
            for a, c in zip(p["answers"], p["cache"] or [""] * len(p["answers"]))
        )
        w(
            f"| {label(name)} | {p['requests']} | {answers} | {p['bytes_received']} | "
            f"{p['hydra_requests']} |"
        )
    w("")

    # Measured.
    w(f"### Measured: {M} hosts")
    w("")
    w(
        "| | phase | real seconds | passes | Hydra requests (latest + build) | "
        "Hydra requests/s | Hydra CPU-s/s | requests hail sent |"
    )
    w("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, m in modes.items():
        for phase in ("steady", "rollout"):
            s = m[phase]
            real = s["seconds"] * k
            lat = s["hydra"].get("latest", {}).get("requests", 0)
            bld = s["hydra"].get("build", {}).get("requests", 0)
            w(
                f"| {label(name)} | {phase_label(phase)} | {real:.0f} | {s['passes']} | "
                f"{s['hydra_requests']} ({lat} + {bld}) | "
                f"{s['hydra_requests'] / real:.3f} | {s['hydra_cpu'] / real:.4f} | "
                f"{s['front_requests'] if name == 'front' else s['hydra_requests']} |"
            )
    w("")
    w("| | deployed | p50 s | p99 s | max s | target (period + jitter + lifetime) | |")
    w("|---|---:|---:|---:|---:|---:|---|")
    for name, m in modes.items():
        lats = m["latencies"]
        bound = P + J + (L if name == "front" else 0)
        ok = m["deployed"] == m["hosts"] and lats and max(lats) <= bound
        w(
            f"| {label(name)} | {m['deployed']}/{m['hosts']} | {pct(lats, 50):.0f} | "
            f"{pct(lats, 99):.0f} | {max(lats, default=float('nan')):.0f} | ≤ {bound:g} | "
            f"{'met' if ok else '**missed**'} |"
        )
    w("")
    cost = {}
    for name, m in modes.items():
        for kname, v in m["per_request"].items():
            cost.setdefault(kname, []).append(v["cpu_median"])
    cpu_latest = statistics.median(cost.get("latest", [cfg["latest-cost"]]))
    cpu_build = statistics.median(cost.get("build", [cfg["build-cost"]]))
    direct = modes.get("direct")
    front = modes.get("front")
    lines = []
    for name, m in modes.items():
        if m["failed_passes"]:
            lines.append(f"{label(name)}: {m['failed_passes']} failed passes, e.g. {m['failures'][0]}")
    med = {n: m["no_change_pass_median"] for n, m in modes.items()}
    w(
        "Measured per request at the stand-in (median CPU): "
        f"`latest` {cpu_latest * 1000:.1f} ms, `/build/ID` {cpu_build * 1000:.1f} ms. "
        "A no-change pass took (median wall) "
        + ", ".join(f"{ms(v)} ms {label(n).lower()}" for n, v in med.items() if v is not None)
        + "."
    )
    if front:
        nginx = [
            front[phase]["service_cpu"][1] / (front[phase]["seconds"] * k)
            for phase in ("steady", "rollout")
        ]
        w(
            f"nginx itself (the front) used {nginx[0]:.4f} CPU-s/s while nothing was new and "
            f"{nginx[1]:.4f} CPU-s/s during the rollout (real time, from /proc)."
        )
    w("")
    if lines:
        w("**Failures**: " + "; ".join(lines))
        w("")

    # Extrapolated.
    interval = P + J / 2
    w("### Extrapolated: 1,000 and 10,000 hosts")
    w("")
    w(
        "| hosts | | Hydra requests/s, nothing new | Hydra CPU, nothing new | "
        "Hydra requests per new build | Hydra CPU-s per new build | "
        "Hydra CPU while it rolls out | build-to-fleet p50 / p99 |"
    )
    w("|---:|---|---:|---:|---:|---:|---:|---:|")
    for n in (1000, 10000):
        lam = n / interval  # no-change passes per second, fleet-wide
        for name, m in modes.items():
            if name == "direct":
                rate, builds, bound, rollout = lam, f"{n:,}", "", P + J
                build_cpu = n * cpu_build
            else:
                rate, rollout = 1 / (L + 0.5 + 1 / lam), P + J + L
                fetches = rollout / L + 1
                builds, bound, build_cpu = f"{fetches:.0f}", "≤ ", fetches * cpu_build
            steady_cores = rate * cpu_latest
            w(
                f"| {n:,} | {label(name)} | {rate:.3g} | {steady_cores:.3g} cores | "
                f"{bound}{builds} `/build` | {bound}{build_cpu:,.1f} | "
                f"{bound}{steady_cores + build_cpu / rollout:.3g} cores | "
                f"{pct(m['latencies'], 50):.0f} / {pct(m['latencies'], 99):.0f} s |"
            )
    w("")
    w("How, and checked against the sample:")
    w("")
    if direct:
        s = direct["steady"]
        measured = s["hydra"].get("latest", {}).get("requests", 0) / (s["seconds"] * k)
        w(
            f"- **Direct**, nothing new: every pass is one request, so the fleet sends "
            f"N / (period + jitter/2) = N / {interval:g} s. For the sample's {M} hosts that "
            f"predicts {M / interval:.3f}/s; measured {measured:.3f}/s. Each new build "
            f"costs one `/build/ID` per host (measured: "
            f"{direct['rollout']['hydra'].get('build', {}).get('requests', 0)} for {M} hosts)."
        )
    if front:
        s = front["steady"]
        measured = s["hydra"].get("latest", {}).get("requests", 0) / (s["seconds"] * k)
        lam = front["steady"]["front_requests"] / (s["seconds"] * k)
        sim_life = (L // k + 0.5) * k
        w(
            f"- **Front**, nothing new: nginx asks Hydra again when its entry has "
            f"expired and a host asks, i.e. every lifetime plus the wait for the next "
            f"question: 1 / (L' + 1/λ), λ = N / {interval:g} s the fleet's rate, L' the "
            f"lifetime as nginx keeps it, on average L + 0.5 s = {L + 0.5:g} s "
            f"({sim_life:g} s in the scaled run). The sample's λ = {lam:.3f}/s predicts "
            f"{1 / (sim_life + 1 / lam) if lam else 0:.3f}/s; measured {measured:.3f}/s. "
            f"It stays under 1/L = {1 / L:.2f}/s whatever N. "
            f"A new build's object is fetched at most once per lifetime while the fleet "
            f"rolls it out (period + jitter + lifetime = {P + J + L:g} s): ≤ "
            f"{(P + J + L) / L + 1:.0f}; measured "
            f"{front['rollout']['hydra'].get('build', {}).get('requests', 0)} for {M} hosts."
        )
    w(
        "- CPU = requests × the measured CPU per request; while a build rolls out, the "
        "`/build` CPU is spread over the rollout (period + jitter, plus the lifetime "
        "behind the front). Build-to-fleet latency does "
        "not depend on N (each host waits for its own timer), as long as Hydra keeps up; "
        "the sample's percentiles stand for any N (behind the front, pessimistically: "
        f"the scaled run's entries lived up to {k - 1} s longer)."
    )
    w("")
    return "\n".join(out) + "\n"


def label(mode):
    return {"direct": "Direct", "front": "Behind the front"}[mode]


def phase_label(phase):
    return {"steady": "nothing new", "rollout": "new build, until all deployed"}[phase]


def ms(seconds):
    return f"{seconds * 1000:.1f}"


def main():
    if len(sys.argv) < 2:
        die("usage: fleet.py hydra|run|report ...")
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "hydra":
        cmd_hydra(args)
    elif mode == "run":
        cmd_run(args)
    elif mode == "report":
        cmd_report(args)
    else:
        die(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
