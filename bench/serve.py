"""Load on `factedit serve`: concurrent clients generate while edits stream in; then kill -9,
restart, and count the acknowledged edits the ledger lost (must be 0).

    python bench/serve.py --baseline 30 --duration 60 --clients 8 --edit-interval 20

Loopback only, bounded: the load runs `--duration` seconds (at most 600), edits still queued
then get `--drain` seconds (at most 900) to finish, and the whole run stops by itself. It
starts its own server on a free port with a fresh state folder (deleted at the end unless
--keep), prints the figures and writes them to bench/results/serve.json.

Figures: completion latency p50/p95/p99 (seconds, from the clients), throughput (completed
requests and generated tokens per second), refused requests (429/503), edit latency (POST
to committed answer), edits acknowledged, and edits lost after the restart.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import DATA, corpus_in  # noqa: E402

from factedit.data import builtin_facts  # noqa: E402

TOKEN = "bench-serve-token-" + os.urandom(8).hex()
MODEL = "smollm2-135m"
OUT = Path(__file__).resolve().parent / "results" / "serve.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


class Server:
    def __init__(self, args: argparse.Namespace, state: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        sets = [a for item in args.set for a in ("--set", item)]
        env = {**os.environ, "FACTEDIT_API_TOKEN": TOKEN}
        self.log = open(log, "ab")  # noqa: SIM115 - closed in kill()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "factedit.cli", "serve", "--model", MODEL,
             "--method", args.method, *sets, "--state", str(state), "--port", str(self.port),
             "--generation-workers", str(args.generation_workers)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT)
        started = time.monotonic()
        while time.monotonic() - started < 900:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}; see {log}")
            try:
                health = httpx.get(self.url + "/health", timeout=2).json()
                if not health["warming_up"]:  # covariance and null space ready
                    self.start_seconds = time.monotonic() - started
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.kill()
        raise TimeoutError("server did not start and warm up in 900 s")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(60)
        if not self.log.closed:
            self.log.close()


def run(args: argparse.Namespace) -> dict:
    state_root = Path(tempfile.mkdtemp(prefix="factedit-serve-bench-"))
    servers: list[Server] = []
    try:
        return measure(args, state_root, servers)
    finally:
        for server in servers:
            server.kill()
        if not args.keep:
            shutil.rmtree(state_root, ignore_errors=True)


def measure(args: argparse.Namespace, state_root: Path, servers: list[Server]) -> dict:
    facts = builtin_facts()
    log = state_root / "server.log"
    server = Server(args, state_root / "state", log)
    servers.append(server)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    prompts = [f.rewrite_prompt for f in facts]
    latencies: list[float] = []  # during the edit phase
    baseline: list[float] = []  # before it: the same clients, no edits
    tokens = [0]
    in_baseline = threading.Event()
    refused: dict[int, int] = {}
    errors: list[str] = []
    edits: list[dict] = []
    stop = threading.Event()
    lock = threading.Lock()

    def client(index: int) -> None:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            i = index
            while not stop.is_set():
                body = {"model": MODEL, "prompt": prompts[i % len(prompts)],
                        "max_tokens": args.max_tokens, "temperature": 0}
                t0 = time.perf_counter()
                was_baseline = in_baseline.is_set()
                try:
                    r = http.post("/v1/completions", json=body)
                except httpx.HTTPError as err:
                    with lock:
                        errors.append(repr(err))
                    continue
                took = time.perf_counter() - t0
                with lock:
                    if r.status_code == 200 and was_baseline:
                        baseline.append(took)
                    elif r.status_code == 200 and in_baseline.is_set():
                        pass  # started in the baseline, finished after it: neither
                    elif r.status_code == 200:
                        latencies.append(took)
                        tokens[0] += r.json()["usage"]["completion_tokens"]
                    else:
                        refused[r.status_code] = refused.get(r.status_code, 0) + 1
                i += args.clients

    def edit(fact_index: int) -> None:
        fact = facts[fact_index % len(facts)]
        t0 = time.perf_counter()
        try:
            r = httpx.post(server.url + "/v1/edits", headers=headers, timeout=args.drain + 60,
                           json={"requests": [fact.to_dict()]})
        except httpx.HTTPError as err:
            with lock:
                errors.append(f"edit: {err!r}")
            return
        row = {"fact": fact.case_id, "status": r.status_code,
               "seconds": time.perf_counter() - t0}
        if r.status_code == 200:
            (done,) = r.json()["edits"]
            row.update(id=done["id"], efficacy=done["scores"].get("efficacy"),
                       timings=done["timings"])
        with lock:
            edits.append(row)

    clients = [threading.Thread(target=client, args=(i,), daemon=True)
               for i in range(args.clients)]
    editors: list[threading.Thread] = []
    in_baseline.set()
    for t in clients:
        t.start()
    time.sleep(args.baseline)
    in_baseline.clear()
    with lock:
        tokens[0] = 0
    started = time.monotonic()
    next_edit = started + args.edit_interval / 2
    while time.monotonic() - started < args.duration:
        if time.monotonic() >= next_edit:
            t = threading.Thread(target=edit, args=(len(editors),), daemon=True)
            t.start()
            editors.append(t)
            next_edit += args.edit_interval
        time.sleep(0.1)
    stop.set()
    load_seconds = time.monotonic() - started
    for t in clients:
        t.join(130)
    drain_start = time.monotonic()
    for t in editors:
        t.join(max(0.0, args.drain - (time.monotonic() - drain_start)))
    acknowledged = [e for e in edits if e["status"] == 200]
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    server.kill()  # kill -9: no graceful shutdown
    restarted = Server(args, state_root / "state", log)
    servers.append(restarted)
    ledger = httpx.get(restarted.url + "/v1/edits", timeout=30).json()["data"]
    live = {row["id"] for row in ledger if row["status"] == "live"}
    lost = [e["id"] for e in acknowledged if e["id"] not in live]
    answers_hold = 0
    for e in acknowledged:
        fact = next(f for f in facts if f.case_id == e["fact"])
        out = httpx.post(restarted.url + "/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": fact.rewrite_prompt, "max_tokens": 4,
            "temperature": 0}).json()["choices"][0]["text"]
        answers_hold += out.strip().startswith(fact.target_new)
    restarted.kill()
    edit_seconds = [e["seconds"] for e in acknowledged]
    return {
        "date": time.strftime("%Y-%m-%d"),
        "command": "python bench/serve.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "load_average_at_end": os.getloadavg(),
                    "platform": platform.platform(), "torch_threads": os.environ.get(
                        "OMP_NUM_THREADS", "default")},
        "config": {"method": args.method, "set": args.set, "clients": args.clients,
                   "duration_s": args.duration, "baseline_s": args.baseline,
                   "edit_interval_s": args.edit_interval, "max_tokens": args.max_tokens,
                   "generation_workers": args.generation_workers},
        "server_start_s": round(server.start_seconds, 1),
        "restart_s": round(restarted.start_seconds, 1),
        "baseline_without_edits": {
            "seconds": args.baseline, "completions": len(baseline),
            "latency_s": {"p50": percentile(baseline, 50), "p95": percentile(baseline, 95),
                          "p99": percentile(baseline, 99)},
            "requests_per_s": len(baseline) / args.baseline if args.baseline else None},
        "completions": len(latencies),
        "latency_s": {"p50": percentile(latencies, 50), "p95": percentile(latencies, 95),
                      "p99": percentile(latencies, 99),
                      "mean": statistics.fmean(latencies) if latencies else None},
        "throughput": {"requests_per_s": len(latencies) / load_seconds,
                       "tokens_per_s": tokens[0] / load_seconds},
        "refused": refused, "client_errors": len(errors), "first_errors": errors[:3],
        "edits_sent": len(editors), "edits_acknowledged": len(acknowledged),
        "edit_latency_s": {"p50": percentile(edit_seconds, 50),
                           "max": max(edit_seconds) if edit_seconds else None},
        "edits": edits,
        "edits_lost_after_kill_9_restart": len(lost), "lost_ids": lost,
        "acknowledged_answers_after_restart": f"{answers_hold}/{len(acknowledged)}",
        "server_edit_metrics": [line for line in metrics.splitlines()
                                if line.startswith(("factedit_edits_total",
                                                    "factedit_edit_failures_total"))],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=60, help="seconds of load (max 600)")
    p.add_argument("--clients", type=int, default=8, help="concurrent generating clients "
                   "(1-16)")
    p.add_argument("--baseline", type=float, default=30, help="seconds the clients generate "
                   "before the first edit, measured apart (max 300)")
    p.add_argument("--edit-interval", type=float, default=15, help="seconds between edits")
    p.add_argument("--drain", type=float, default=600, help="seconds queued edits may take "
                   "after the load (max 900)")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--generation-workers", type=int, default=4)
    p.add_argument("--method", default="d4s-alphaedit")
    p.add_argument("--set", action="append", default=None, metavar="FIELD=VALUE",
                   help="server method settings (default: the wikitext corpus, 20k tokens)")
    p.add_argument("--keep", action="store_true", help="keep the state folder and log")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    if not (0 < args.duration <= 600 and 0 <= args.baseline <= 300 and 1 <= args.clients <= 16 and 0 < args.drain <= 900
            and args.edit_interval > 0):
        p.error("--duration in (0, 600], --baseline in [0, 300], --clients in [1, 16], --drain in (0, 900], "
                "--edit-interval > 0")
    if args.set is None:
        args.set = [f"covariance_corpus={corpus_in(DATA)}", "covariance_tokens=20000"]
    result = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    lat, thr = result["latency_s"], result["throughput"]

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"
    print(f"{result['completions']} completions by {args.clients} clients in {args.duration:.0f} s: "
          f"p50 {fmt(lat['p50'])} s, p95 {fmt(lat['p95'])} s, p99 {fmt(lat['p99'])} s; "
          f"{thr['requests_per_s']:.2f} req/s, {thr['tokens_per_s']:.1f} tokens/s; "
          f"refused {result['refused']}, client errors {result['client_errors']}")
    base = result["baseline_without_edits"]
    print(f"before the edits ({args.baseline:.0f} s, same clients): {base['completions']} "
          f"completions, p50 {fmt(base['latency_s']['p50'])} s, p95 "
          f"{fmt(base['latency_s']['p95'])} s")
    el = result["edit_latency_s"]
    print(f"edits: {result['edits_acknowledged']}/{result['edits_sent']} acknowledged, "
          f"latency p50 {fmt(el['p50'])} s, max {fmt(el['max'])} s; after kill -9 and restart: "
          f"{result['edits_lost_after_kill_9_restart']} lost, answers still edited "
          f"{result['acknowledged_answers_after_restart']}")
    print(f"written to {out}")
    return 1 if result["edits_lost_after_kill_9_restart"] else 0


if __name__ == "__main__":
    sys.exit(main())
