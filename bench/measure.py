#!/usr/bin/env python3
"""bench/run's helper: runs commands and measures them, then writes the report.

  measure.py run --out FILE.json --spawn SPAWN [--warmup W] [--reps R] [--batch N]
                 [--log ACCESS_LOG] [--list NAME=FILE ...] CASE CMD [CASE CMD ...]

Runs every CASE's CMD (split like a shell would, but run without one) W times
unmeasured, then R times measured; the cases take turns within each
repetition (in alternating order), so that they see the same machine.
Placeholders in CMD: {item} (1..N within a batch) and {NAME} (line number
`run index` of the file given with --list NAME=FILE, counting warm-ups).
With --batch N one sample is N sequential runs: times and requests summed,
RSS the largest.

Each run goes through SPAWN (bench/spawn.c, compiled), which starts it with
posix_spawn and reaps it with wait4: its wall time (spawn to reap), its CPU
time (user + system, of it and every child it waited for) and its peak RSS
(ru_maxrss, what `/usr/bin/time -v` reports as "Maximum resident set size"),
to the microsecond and the KiB. HTTP requests, connections and bytes come
from the nginx access log lines the run added.

  measure.py report --meta META --results DIR --out FILE.md

Writes the markdown report from the JSON files `run` wrote.
"""

import json
import os
import shlex
import statistics
import subprocess
import sys
import time


def die(msg):
    print(f"measure.py: {msg}", file=sys.stderr)
    sys.exit(1)


# ---------------------------------------------------------------- running


class AccessLog:
    """Reads the lines nginx appends: `connection status request_length bytes_sent uri`."""

    def __init__(self, path):
        self.path = path
        self.offset = os.path.getsize(path) if path else 0

    def new_lines(self):
        if not self.path:
            return []
        # nginx writes a request's line once the response is sent, which is
        # about when the client reads it: wait until the log is quiet.
        size = os.path.getsize(self.path)
        while True:
            time.sleep(0.002)
            again = os.path.getsize(self.path)
            if again == size:
                break
            size = again
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(size - self.offset)
        self.offset = size
        return [line.split() for line in data.decode().splitlines() if line]


def spawn_measured(spawn, argv, stderr_path):
    """Runs argv under bench/spawn.c, which measures it (see there why)."""
    done = subprocess.run(
        [spawn, stderr_path, *argv], stdout=subprocess.PIPE, check=True, text=True
    )
    code, wall_ns, user_us, sys_us, rss = (int(x) for x in done.stdout.split())
    return code, wall_ns / 1e9, (user_us + sys_us) / 1e6, rss


def substitute(word, item, subst):
    word = word.replace("{item}", str(item))
    for name, value in subst.items():
        word = word.replace("{" + name + "}", value)
    return word


def run_once(spawn, argv, log, stderr_path):
    code, wall, cpu, rss = spawn_measured(spawn, argv, stderr_path)
    if code != 0:
        with open(stderr_path, errors="replace") as f:
            err = f.read()
        die(f"{shlex.join(argv)} exited {code}:\n{err}")
    lines = log.new_lines()
    return {
        "wall": wall,
        "cpu": cpu,
        "rss": rss,
        "requests": len(lines),
        "connections": len({line[0] for line in lines}),
        "statuses": [line[1] for line in lines],
        "sent": sum(int(line[2]) for line in lines),
        "received": sum(int(line[3]) for line in lines),
    }


def cmd_run(args):
    out, spawn, warmup, reps, batch, log_path, lists, cases = (None, None, 3, 30, None, None, {}, [])
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--out":
            out = args[i + 1]
        elif a == "--spawn":
            spawn = args[i + 1]
        elif a == "--warmup":
            warmup = int(args[i + 1])
        elif a == "--reps":
            reps = int(args[i + 1])
        elif a == "--batch":
            batch = int(args[i + 1])
        elif a == "--log":
            log_path = args[i + 1]
        elif a == "--list":
            name, path = args[i + 1].split("=", 1)
            with open(path) as f:
                lists[name] = f.read().splitlines()
        else:
            cases = args[i:]
            break
        i += 2
    if not out or not spawn or not cases or len(cases) % 2:
        die("usage: measure.py run --out FILE --spawn BIN [options] CASE CMD [CASE CMD ...]")
    cases = [(cases[j], shlex.split(cases[j + 1])) for j in range(0, len(cases), 2)]
    for name, values in lists.items():
        if len(values) < warmup + reps:
            die(f"--list {name}: {len(values)} lines, need {warmup + reps}")

    log = AccessLog(log_path)
    stderr_path = out + ".stderr"
    samples = {name: [] for name, _ in cases}
    for run in range(warmup + reps):
        order = cases if run % 2 == 0 else cases[::-1]
        for name, template in order:
            subst = {k: v[run] for k, v in lists.items()}
            items = range(1, batch + 1) if batch else [None]
            runs = []
            for item in items:
                argv = [substitute(w, item, subst) for w in template]
                runs.append(run_once(spawn, argv, log, stderr_path))
            if run < warmup:
                continue
            sample = {
                key: sum(r[key] for r in runs)
                for key in ("wall", "cpu", "requests", "connections", "sent", "received")
            }
            sample["rss"] = max(r["rss"] for r in runs)
            sample["statuses"] = runs[0]["statuses"]
            samples[name].append(sample)
    result = {
        "warmup": warmup,
        "reps": reps,
        "batch": batch,
        "cases": [
            {"name": name, "command": shlex.join(argv), "samples": samples[name]}
            for name, argv in cases
        ],
    }
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    os.unlink(stderr_path)


# ---------------------------------------------------------------- reporting


def stats(values):
    return statistics.median(values), min(values), max(values)


def ms(seconds):
    return f"{seconds * 1000:.1f}"


def fmt_ms(values):
    med, lo, hi = stats(values)
    return f"**{ms(med)}** ({ms(lo)}–{ms(hi)})"


def fmt_s(values):
    med, lo, hi = stats(values)
    return f"**{med:.3f}** ({lo:.3f}–{hi:.3f})"


def fmt_mib(kib_values):
    med, lo, hi = stats(kib_values)
    return f"**{med / 1024:.1f}** ({lo / 1024:.1f}–{hi / 1024:.1f})"


def fmt_count(values):
    med, lo, hi = stats(values)
    if lo == hi:
        return f"{med:g}"
    return f"{med:g} ({lo:g}–{hi:g})"


def verdict(ok):
    return "met" if ok else "**missed**"


def case(result, name):
    for c in result["cases"]:
        if c["name"] == name:
            return c
    die(f"no case {name}")


def col(c, key):
    return [s[key] for s in c["samples"]]


def med(c, key):
    return statistics.median(col(c, key))


def table(result, names, labels, per="pass", http=True):
    head = f"| per {per} | wall ms | CPU ms | peak RSS MiB |"
    rule = "|---|---:|---:|---:|"
    if http:
        head += " HTTP requests | connections | bytes received | bytes sent |"
        rule += "---:|---:|---:|---:|"
    rows = [head, rule]
    for name, label in zip(names, labels):
        c = case(result, name)
        row = (
            f"| {label} | {fmt_ms(col(c, 'wall'))} | {fmt_ms(col(c, 'cpu'))} | "
            f"{fmt_mib(col(c, 'rss'))} |"
        )
        if http:
            row += (
                f" {fmt_count(col(c, 'requests'))} | {fmt_count(col(c, 'connections'))} | "
                f"{fmt_count(col(c, 'received'))} | {fmt_count(col(c, 'sent'))} |"
            )
        rows.append(row)
    return rows


def commands(result, names, labels, note=None):
    rows = ["", "Commands (as run, without a shell unless they say `sh -c`):", ""]
    for name, label in zip(names, labels):
        rows.append(f"- {label}: `{case(result, name)['command']}`")
    if note:
        rows += ["", note]
    return rows


def paired(a, b, key):
    """Median over repetitions of a[i] - b[i] (the cases ran back to back)."""
    return statistics.median(x[key] - y[key] for x, y in zip(a["samples"], b["samples"]))


def cmd_report(args):
    opts = dict(zip(args[::2], args[1::2]))
    meta = {}
    with open(opts["--meta"]) as f:
        for line in f:
            key, _, value = line.rstrip("\n").partition("=")
            meta[key] = value
    d = opts["--results"]

    def load(name):
        with open(os.path.join(d, name + ".json")) as f:
            return json.load(f)

    nochange, deploy, many, startup = (
        load("nochange"),
        load("deploy"),
        load("many"),
        load("startup"),
    )
    out = []
    w = out.append
    reps = nochange["reps"]
    w(f"Run {meta['date']} on {meta['machine']}.")
    w("")
    w(f"Command: `{meta['command']}`")
    w("")
    w(
        f"hail: `{meta['hail']}` ({meta['hail_kind']}), {meta['hail_version']}; "
        f"{meta['nix']}; {meta['nginx']}; {meta['curl']}; {meta['jq']}."
    )
    w(f"Load average before / after: {meta['load_before']} / {meta['load_after']}.")
    w("")
    if meta.get("quick") == "1":
        w(
            "**Quick mode: one repetition, no warm-up. These numbers only show that "
            "the script works; they are not a measurement.**"
        )
    else:
        w(
            f"Each figure is the **median** (min–max) of {reps} repetitions after "
            f"{nochange['warmup']} warm-ups; the cases of a section take turns within "
            "each repetition. Wall time from spawn to reap; CPU = user + system of "
            "the process and every child it waited for; peak RSS = the largest "
            "`ru_maxrss` (what `/usr/bin/time -v` calls \"Maximum resident set size\"); "
            "requests, connections and bytes from the stand-in's access log "
            "(bytes as nginx counts them: `$request_length` sent, `$bytes_sent` received)."
        )
    w("")

    # 1. No-change pass.
    h = case(nochange, "hail")
    floor = case(nochange, "curl")
    base = case(nochange, "baseline")
    w("## 1. No-change pass")
    w("")
    w(
        "The profile is already at Hydra's latest build; one pass asks Hydra and "
        "finds nothing to do."
    )
    w("")
    labels = [
        "hail --oneshot (no change)",
        "floor: one curl of JOB/latest",
        "baseline: curl + jq + readlink",
    ]
    out += table(nochange, ["hail", "curl", "baseline"], labels)
    out += commands(nochange, ["hail", "curl", "baseline"], labels)
    w("")
    r_floor = med(h, "wall") / med(floor, "wall")
    r_base = med(h, "wall") / med(base, "wall")
    rss_mib = med(h, "rss") / 1024
    max_rss_mib = max(col(h, "rss")) / 1024
    reqs = set(col(h, "requests"))
    conns = set(col(h, "connections"))
    statuses = {tuple(s) for s in col(h, "statuses")}
    rx = max(col(h, "received"))
    w("| target | hail | |")
    w("|---|---|---|")
    w(
        f"| wall ≤ 1× one curl | {r_floor:.2f}× ({ms(med(h, 'wall'))} / {ms(med(floor, 'wall'))} ms); "
        f"CPU {med(h, 'cpu') / med(floor, 'cpu'):.2f}× | {verdict(r_floor <= 1)} |"
    )
    w(
        f"| wall ≤ 0.3× curl + jq baseline | {r_base:.2f}× ({ms(med(h, 'wall'))} / {ms(med(base, 'wall'))} ms); "
        f"CPU {med(h, 'cpu') / med(base, 'cpu'):.2f}× | {verdict(r_base <= 0.3)} |"
    )
    w(
        f"| peak RSS ≤ 8 MiB | {rss_mib:.1f} MiB median, {max_rss_mib:.1f} max | "
        f"{verdict(max_rss_mib <= 8)} |"
    )
    w(
        f"| one request (HEAD JOB/latest, 302) | {'/'.join(map(str, sorted(reqs)))} requests "
        f"({', '.join('+'.join(s) for s in sorted(statuses))}) on "
        f"{'/'.join(map(str, sorted(conns)))} connection(s) | "
        f"{verdict(reqs == {1} and statuses == {('302',)})} |"
    )
    w(f"| under 512 bytes received | {rx} bytes | {verdict(rx < 512)} |")
    w(
        f"| no TLS set-up on an http URL | {meta['tls_check']} | "
        f"{verdict(meta['tls_ok'] == '1')} |"
    )
    w("")
    w(
        f"`/usr/bin/time -v` on one more no-change pass: Maximum resident set size "
        f"{meta['time_v_rss']} kbytes."
    )
    w("")

    # 2. Deploy pass.
    h = case(deploy, "hail")
    hand = case(deploy, "hand")
    w("## 2. Deploy pass")
    w("")
    w(
        "A new build is Hydra's latest, signed in the binary cache at the same "
        "origin and not yet in `/nix/store`: hail asks Hydra, substitutes it with "
        "`nix-env --set`, runs `bin/activate` (`#!/bin/sh` + `true`). By hand: the "
        "same `nix-env` and activate on an equally fresh path, without asking Hydra. "
        "The operator's script asks Hydra with curl + jq first, as a cron job would. "
        "Every repetition deploys a path of its own to each."
    )
    w("")
    script = case(deploy, "script")
    labels = [
        "hail --oneshot (deploy)",
        "by hand: nix-env --set + activate",
        "operator's script: curl + jq, then nix-env + activate",
    ]
    out += table(deploy, ["hail", "hand", "script"], labels)
    out += commands(
        deploy,
        ["hail", "hand", "script"],
        labels,
        "`{job}` is `ORIGIN/job/bench/deploy/dN`, a job of its own per repetition "
        "whose latest is build N (`{script_job}` likewise, with `/latest`); `{path}` "
        "a fresh store path in the cache.",
    )
    w("")
    ratio = med(h, "wall") / med(hand, "wall")
    diff = paired(h, hand, "wall")
    cpu_diff = paired(h, hand, "cpu")
    w("| target | hail | |")
    w("|---|---|---|")
    w(
        f"| overhead ≤ 5 % over nix-env + activate | wall {ratio:.3f}× ({(ratio - 1) * 100:+.1f} %); "
        f"median paired difference {ms(diff)} ms wall, {ms(cpu_diff)} ms CPU | "
        f"{verdict(ratio <= 1.05)} |"
    )
    w("")
    w(
        f"Against the operator's script, which asks Hydra as hail does: "
        f"{med(h, 'wall') / med(script, 'wall'):.3f}× the wall time "
        f"(median paired difference {ms(paired(h, script, 'wall'))} ms), "
        f"{med(h, 'cpu') / med(script, 'cpu'):.3f}× the CPU time."
    )
    w("")

    # 3. Many instances.
    h = case(many, "hail")
    base = case(many, "baseline")
    n = many["batch"]
    w(f"## 3. Many instances: {n} profiles on one host")
    w("")
    w(
        f"{n} profiles at the same build, one no-change pass each, one after the "
        f"other; a sample is the whole round of {n} passes ({many['reps']} "
        f"rounds after {many['warmup']} warm-up)."
    )
    w("")
    w(f"| {n} passes | total wall s | total CPU s | per pass ms (wall / CPU) | peak RSS MiB | HTTP requests |")
    w("|---|---:|---:|---:|---:|---:|")
    for c, label in ((h, "hail --oneshot"), (base, "curl + jq + readlink")):
        w(
            f"| {label} | {fmt_s(col(c, 'wall'))} | {fmt_s(col(c, 'cpu'))} | "
            f"{ms(med(c, 'wall') / n)} / {ms(med(c, 'cpu') / n)} | {fmt_mib(col(c, 'rss'))} | "
            f"{fmt_count(col(c, 'requests'))} |"
        )
    out += commands(
        many,
        ["hail", "baseline"],
        ["hail --oneshot", "curl + jq + readlink"],
        f"`{{item}}` runs from 1 to {n}.",
    )
    w("")
    cpu_total = med(h, "cpu")
    w("| target | hail | |")
    w("|---|---|---|")
    w(
        f"| {n} instances under 1 CPU-second | {cpu_total:.3f} CPU-s "
        f"({cpu_total / med(base, 'cpu'):.2f}× the baseline's) | {verdict(cpu_total < 1)} |"
    )
    w("")
    h1 = case(nochange, "hail")
    per_pass_req = med(h1, "requests")
    per_pass_bytes = med(h1, "received") + med(h1, "sent")
    w(
        f"What a fleet sends Hydra at a 5-minute period (12 passes an hour), from "
        f"the measured {per_pass_req:g} requests and {per_pass_bytes:g} bytes "
        "(received + sent) per no-change pass:"
    )
    w("")
    w("| hosts | requests / hour | requests / second | traffic / hour |")
    w("|---:|---:|---:|---:|")
    for hosts in (1, 100, 1000, 10000):
        per_hour = per_pass_req * 12 * hosts
        w(
            f"| {hosts} | {per_hour:,.0f} | {per_hour / 3600:.2f} | "
            f"{per_pass_bytes * 12 * hosts / 2**20:.2f} MiB |"
        )
    w("")

    # 4. Size and start-up.
    w("## 4. Binary size and start-up")
    w("")
    w(
        f"`{meta['hail']}`: **{int(meta['size']):,} bytes** ({int(meta['size']) / 2**20:.2f} MiB, "
        f"{meta['hail_kind']}); {meta['file']}."
    )
    w("")
    labels = ["hail --version", "curl --version"]
    out += table(startup, ["hail", "curl"], labels, per="run", http=False)
    w("")
    return "\n".join(out) + "\n"


def main():
    if len(sys.argv) < 2:
        die("usage: measure.py run|report ...")
    if sys.argv[1] == "run":
        cmd_run(sys.argv[2:])
    elif sys.argv[1] == "report":
        opts = sys.argv[2:]
        text = cmd_report(opts)
        with open(dict(zip(opts[::2], opts[1::2]))["--out"], "w") as f:
            f.write(text)
        sys.stdout.write(text)
    else:
        die(f"unknown mode {sys.argv[1]}")


if __name__ == "__main__":
    main()
