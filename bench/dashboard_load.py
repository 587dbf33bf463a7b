"""Benchmark: 20 concurrent users on the dashboard under gunicorn for a minute.

Usage:
    pip install -e ".[serve]" locust
    python bench/dashboard_load.py [--users 20] [--seconds 60] [--workers 2]

Starts ``gunicorn --workers N "malaria_classifier.dashboard.wsgi:create_server()"`` on
127.0.0.1, runs Locust headless with bench/locustfile_dashboard.py, and samples the
resident memory of the gunicorn processes every 2 s. Reports requests, failures,
latency percentiles per request kind, and memory at the start, the peak and the end.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"gunicorn exited with status {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"{url} did not answer within {timeout} s")


def tree_rss_mb(process: subprocess.Popen) -> float:
    root = psutil.Process(process.pid)
    members = [root, *root.children(recursive=True)]
    return sum(member.memory_info().rss for member in members) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--workers",
            str(args.workers),
            "--bind",
            f"127.0.0.1:{port}",
            "--timeout",
            "120",
            "malaria_classifier.dashboard.wsgi:create_server()",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_up(url + "/", server)
        time.sleep(2)
        memory = [(0.0, tree_rss_mb(server))]
        with tempfile.TemporaryDirectory() as folder:
            prefix = os.path.join(folder, "load")
            locust = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "locust",
                    "-f",
                    str(HERE / "locustfile_dashboard.py"),
                    "--headless",
                    "--users",
                    str(args.users),
                    "--spawn-rate",
                    str(args.users),
                    "--run-time",
                    f"{args.seconds}s",
                    "--host",
                    url,
                    "--csv",
                    prefix,
                    "--only-summary",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            started = time.time()
            while locust.poll() is None:
                time.sleep(2)
                memory.append((time.time() - started, tree_rss_mb(server)))
            with open(prefix + "_stats.csv", newline="") as handle:
                stats = list(csv.DictReader(handle))
    finally:
        server.terminate()
        server.wait(timeout=30)
    rows = [
        {
            "name": row["Name"],
            "requests": int(row["Request Count"]),
            "failures": int(row["Failure Count"]),
            "median_ms": float(row["50%"]),
            "p95_ms": float(row["95%"]),
            "p99_ms": float(row["99%"]),
            "requests_per_s": round(float(row["Requests/s"]), 1),
        }
        for row in stats
    ]
    values = [value for _, value in memory]
    report = {
        "users": args.users,
        "seconds": args.seconds,
        "gunicorn_workers": args.workers,
        "requests": rows,
        "memory_mb": {
            "start": round(values[0], 1),
            "peak": round(max(values), 1),
            "end": round(values[-1], 1),
            "after_first_10s": round(next((v for t, v in memory if t >= 10), values[-1]), 1),
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
