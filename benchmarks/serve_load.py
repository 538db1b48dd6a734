"""Load test of `imgclf serve` on loopback: steady load, then overload.

1. Steady: CLIENTS concurrent clients (default 32) each POST one image after another for SECONDS
   (default 30). Reports throughput, p50/p99 latency and errors; the target is 0 errors.
2. Overload: a server started with a small --max-concurrency gets more clients than it admits.
   Excess requests must get 503 quickly (p99 of the 503s is reported) while a prober keeps hitting
   /health from a separate process, which must keep answering 200.

Each phase starts its own `python -m imgclf serve` subprocess on 127.0.0.1 and a free port, so the
server does not share a GIL with the clients. Traffic only ever goes to 127.0.0.1.

Usage:
    nice -n 15 python benchmarks/serve_load.py runs/pets [--clients 32 --seconds 30]

Results are printed as a markdown table; see BENCHMARKS.md for recorded runs.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

HOST = "127.0.0.1"


@dataclass
class Tally:
    latencies_s: dict[int, list[float]] = field(default_factory=dict)  # status -> latencies
    failures: int = 0  # transport errors: no HTTP answer at all

    def add(self, status: int, seconds: float) -> None:
        self.latencies_s.setdefault(status, []).append(seconds)

    def count(self, status: int | None = None) -> int:
        if status is None:
            return sum(len(v) for v in self.latencies_s.values())
        return len(self.latencies_s.get(status, []))

    def percentile_ms(self, status: int, q: float) -> float:
        values = self.latencies_s.get(status, [])
        return float(np.percentile(values, q) * 1000) if values else float("nan")

    def other(self, *statuses: int) -> int:
        return sum(len(v) for s, v in self.latencies_s.items() if s not in statuses) + self.failures


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def start_server(model: str, port: int, runtime: str, max_concurrency: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "imgclf", "serve", model, "--host", HOST, "--port", str(port),
           "--runtime", runtime, "--max-concurrency", str(max_concurrency)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def wait_ready(url: str, server: subprocess.Popen[bytes], timeout_s: float = 180) -> str:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise SystemExit(f"server exited: {server.stderr.read().decode() if server.stderr else ''}")
            try:
                response = await client.get(f"{url}/ready", timeout=2)
                if response.status_code == 200:
                    return str(response.json()["runtime"])
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit(f"server on {url} not ready after {timeout_s} s")


async def hammer(url: str, body: bytes, clients: int, seconds: float, tally: Tally) -> None:
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:

        async def one_client() -> None:
            while time.monotonic() < deadline:
                start = time.perf_counter()
                try:
                    response = await client.post(f"{url}/predict", content=body,
                                                 headers={"content-type": "image/png"})
                    tally.add(response.status_code, time.perf_counter() - start)
                except httpx.HTTPError:
                    tally.failures += 1

        await asyncio.gather(*(one_client() for _ in range(clients)))


def probe(url: str, body: bytes, seconds: float, every_s: float = 0.1) -> dict[str, list[tuple[int, float]]]:
    """Every `every_s` for `seconds`, GET /health and POST one /predict: {endpoint: [(status, latency_s)]}.

    Runs in its own process, so its timings show the server's answer time, not the queueing inside
    the load generator's busy event loop. Status 0 is a transport failure.
    """
    results: dict[str, list[tuple[int, float]]] = {"health": [], "predict": []}
    deadline = time.monotonic() + seconds
    with httpx.Client(timeout=30) as client:
        while time.monotonic() < deadline:
            for name in ("health", "predict"):
                start = time.perf_counter()
                try:
                    if name == "health":
                        status = client.get(f"{url}/health").status_code
                    else:
                        status = client.post(f"{url}/predict", content=body,
                                             headers={"content-type": "image/png"}).status_code
                except httpx.HTTPError:
                    status = 0
                results[name].append((status, time.perf_counter() - start))
            time.sleep(every_s)
    return results


def _noop() -> None:
    return None


def test_image(model: str) -> bytes:
    import json

    from PIL import Image

    size = int(json.loads((Path(model) / "imgclf.json").read_text())["preprocessing"]["image_size"])
    rng = np.random.default_rng(0)
    array = np.clip(np.array([40, 200, 60]) + rng.normal(0, 25, (size * 2, size * 2, 3)), 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


async def phase(args: argparse.Namespace, body: bytes, *, clients: int, seconds: float, limit: int,
                with_probe: bool) -> tuple[Tally, dict[str, Tally], float, str]:
    port = free_port()
    url = f"http://{HOST}:{port}"
    server = start_server(args.model, port, args.runtime, limit)
    try:
        runtime = await wait_ready(url, server)
        tally, probes = Tally(), {"health": Tally(), "predict": Tally()}
        if not with_probe:
            start = time.perf_counter()
            await hammer(url, body, clients, seconds, tally)
            return tally, probes, time.perf_counter() - start, runtime
        loop = asyncio.get_running_loop()
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            await loop.run_in_executor(pool, _noop)  # start the probe process before the clock runs
            start = time.perf_counter()
            _, results = await asyncio.gather(hammer(url, body, clients, seconds, tally),
                                              loop.run_in_executor(pool, probe, url, body, seconds))
        for name, rows in results.items():
            for status, latency in rows:
                probes[name].add(status, latency)
        return tally, probes, time.perf_counter() - start, runtime
    finally:
        server.terminate()
        server.wait(timeout=30)


async def main_async(args: argparse.Namespace) -> None:
    body = test_image(args.model)
    print(f"model {args.model}, image {len(body)} bytes, {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d %H:%M %Z')}", flush=True)

    steady, _, wall, runtime = await phase(args, body, clients=args.clients, seconds=args.seconds,
                                           limit=args.max_concurrency, with_probe=False)
    over, probes, over_wall, _ = await phase(args, body, clients=args.overload_clients,
                                             seconds=args.overload_seconds, limit=args.overload_limit,
                                             with_probe=True)
    print()
    print("| run | clients | limit | seconds | requests | req/s | 200 | 503 | other errors | "
          "p50 ms (200) | p99 ms (200) | p50 ms (503) | p99 ms (503) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, tally, clients, limit, seconds in (
        (f"steady ({runtime})", steady, args.clients, args.max_concurrency, wall),
        (f"overload ({runtime})", over, args.overload_clients, args.overload_limit, over_wall),
    ):
        print(f"| {name} | {clients} | {limit} | {seconds:.1f} | {tally.count()} | {tally.count() / seconds:.1f} | "
              f"{tally.count(200)} | {tally.count(503)} | {tally.other(200, 503)} | "
              f"{tally.percentile_ms(200, 50):.1f} | {tally.percentile_ms(200, 99):.1f} | "
              f"{tally.percentile_ms(503, 50):.1f} | {tally.percentile_ms(503, 99):.1f} |")
    health, predict = probes["health"], probes["predict"]
    print("\nseen by a separate probe process during the overload run (every 0.1 s):")
    print(f"  GET /health: {health.count(200)}/{health.count()} answered 200, "
          f"p50 {health.percentile_ms(200, 50):.1f} ms, p99 {health.percentile_ms(200, 99):.1f} ms")
    print(f"  POST /predict: {predict.count(503)} x 503 (p50 {predict.percentile_ms(503, 50):.1f} ms, "
          f"p99 {predict.percentile_ms(503, 99):.1f} ms), {predict.count(200)} x 200, "
          f"{predict.other(200, 503)} other")
    steady_errors = steady.other(200)
    print(f"steady-load errors: {steady_errors}")
    if steady_errors or health.other(200):
        raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="bundle folder")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--max-concurrency", type=int, default=64, help="server limit in the steady run")
    parser.add_argument("--overload-clients", type=int, default=64)
    parser.add_argument("--overload-limit", type=int, default=4, help="server limit in the overload run")
    parser.add_argument("--overload-seconds", type=float, default=10)
    parser.add_argument("--runtime", default="auto", choices=["auto", "torch", "onnx", "openvino"])
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
