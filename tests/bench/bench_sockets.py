"""Benchmark: many websockets on one agent while events flow: push-to-socket latency and memory
per socket.

    python -m tests.bench.bench_sockets --sockets 5000 --rate 1000 --seconds 30

One agent process (``recsys-agent run --demo``: its embedded nats-server and local Qdrant in
``--data-dir``, every built-in plugin, the shipped 300-item demo catalog) takes ``--sockets``
websockets, one per user, opened ``--connect-concurrency`` at a time from this process. Then
events of those users (each drawn at random; a random demo item; view, click or like) are
published on NATS at ``--rate`` per second for ``--seconds``, open loop. Every socket records
when the first push that lists an event arrives. Printed:

- connect: sockets opened, refused, seconds; agent RSS before and after, per socket;
- flow: event -> socket p50 / p90 / p99 / max (publish on NATS to the push read from the
  socket: the agent's whole path, ranking included), push -> socket p50 / p99 (from the push's
  ``generated_at`` to the socket read: the fan-out through NATS and the socket layer alone),
  events reflected, pushes read, the agent's counters of pushes sent, replaced for slow
  sockets and sockets closed; agent, nats-server and client CPU per second;
- the machine and its load average, first and last.

The client shares the cores with the agent: its own CPU is printed, and on a small machine
part of the latency is the client's. File descriptors: each socket is one in the agent and
one here; the script raises its soft limit to the hard one (``ulimit -Hn``) and stops with a
message when that is not enough (the agent raises its own).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

import aiohttp
import nats
import orjson
from prometheus_client.parser import text_string_to_metric_families

from agent.bus.embedded_server import client_url
from agent.demo import demo_items
from agent.serving.socket_tokens import TokenSigner
from agent.wire.contract import Event, event_subject
from tests.bench.machine import children, cpu_seconds, describe, load_average, percentile, rss_kib
from tests.processes import start_agent, stop

PREFIX = "recsys"
SECRET = "bench-sockets-secret-0123456789abcdef"
TYPES = ("view", "view", "click", "like")


def rss_mib_of(pid: int) -> float:
    return rss_kib(pid) / 1024


def raise_own_descriptor_limit(needed: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        soft = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


class Readings:
    """What every socket read: when each event was first reflected, and each push's delay."""

    def __init__(self) -> None:
        self.sent: dict[str, float] = {}
        self.reflected: dict[str, float] = {}
        self.push_delays: list[float] = []
        self.pushes = 0
        self.initial = 0
        self.closed: list[int | None] = []

    def on_push(self, data: str, started: bool) -> None:
        arrived = time.perf_counter()
        wall = time.time()
        push = orjson.loads(data)
        self.pushes += 1
        ids = push.get("event_ids")
        if not ids:
            self.initial += 1
            return
        if started:
            self.push_delays.append(1000 * (wall - push["generated_at"]))
        for event_id in ids:
            if event_id in self.sent and event_id not in self.reflected:
                self.reflected[event_id] = arrived


async def hold_socket(
    http: aiohttp.ClientSession,
    url: str,
    token: str,
    readings: Readings,
    flowing: asyncio.Event,
    opened: asyncio.Future[None],
) -> None:
    """Read one socket until the agent closes it; ``opened`` is done at its first list."""
    try:
        async with http.ws_connect(url, params={"token": token}, max_msg_size=0) as ws:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    readings.on_push(msg.data, flowing.is_set())
                    if not opened.done():
                        opened.set_result(None)
            readings.closed.append(ws.close_code)
    except Exception as exc:
        if not opened.done():
            opened.set_exception(exc)


async def counters(http: aiohttp.ClientSession, base: str) -> dict[str, float]:
    async with http.get(f"{base}/metrics") as response:
        text = await response.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


async def run(args: argparse.Namespace) -> None:
    print(describe(), flush=True)
    needed = args.sockets + 256
    limit = raise_own_descriptor_limit(needed)
    if limit < needed:
        sys.exit(f"open-files limit {limit} < {needed} for {args.sockets} sockets: raise it (ulimit -n)")
    data_dir = Path(args.data_dir)
    # empty streams every run; the demo catalog's vectors stay in Qdrant
    shutil.rmtree(data_dir / "nats", ignore_errors=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {
        "RECSYS_TOKEN_SECRET": SECRET,
        "RECSYS_WS_MAX_SOCKETS": str(args.sockets + 100),
        "RECSYS_LOAD_ENTRY_POINTS": "false",
    }
    flags = ["--demo", "--data-dir", str(data_dir), "--nats-port", "0", "--http-port", "0", "--log-level", "WARNING"]
    started = time.perf_counter()
    process, _, http_url = await start_agent(*flags, env=env, log_path=data_dir / "agent.log", ready_timeout_s=600)
    print(f"agent ready in {time.perf_counter() - started:.1f} s (demo catalog embedded)", flush=True)
    signer = TokenSigner(SECRET)
    readings = Readings()
    flowing = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    try:
        async with aiohttp.ClientSession(connector=connector) as http:
            await asyncio.sleep(2.0)
            rss_before = rss_mib_of(process.pid)
            client_before = rss_mib_of(os.getpid())
            ws_url = f"{http_url.replace('http://', 'ws://')}/v1/ws"
            users = [f"bench-{i}" for i in range(args.sockets)]
            gate = asyncio.Semaphore(args.connect_concurrency)
            holders: list[asyncio.Task[None]] = []

            async def open_one(user: str) -> bool:
                async with gate:
                    opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                    token = signer.mint(user, 86_400)[0]
                    holders.append(asyncio.create_task(hold_socket(http, ws_url, token, readings, flowing, opened)))
                    try:
                        await opened
                    except Exception as exc:
                        print(f"socket of {user} refused: {exc}", flush=True)
                        return False
                    return True

            connect_started = time.perf_counter()
            opened = sum(await asyncio.gather(*(open_one(user) for user in users)))
            connect_s = time.perf_counter() - connect_started
            await asyncio.sleep(3.0)
            rss_sockets = rss_mib_of(process.pid)
            client_sockets = rss_mib_of(os.getpid())
            open_now = (await counters(http, http_url)).get("recsys_ws_sockets", 0)
            print(
                f"connect: {opened} sockets open ({args.sockets - opened} refused) in {connect_s:.1f} s, each with"
                f" its first list; the agent counts {open_now:.0f}; agent RSS {rss_before:.0f} -> {rss_sockets:.0f}"
                f" MiB: {(rss_sockets - rss_before) * 1024 / max(opened, 1):.1f} KiB per socket (this client:"
                f" {(client_sockets - client_before) * 1024 / max(opened, 1):.1f} KiB per socket)",
                flush=True,
            )

            items = [item.id for item in demo_items()]
            rng = random.Random(args.seed)
            total = int(args.rate * args.seconds)
            run_id = os.urandom(3).hex()
            messages = []
            for n in range(total):
                user, item, kind = rng.choice(users), rng.choice(items), rng.choice(TYPES)
                event_id = f"s-{run_id}-{n}"
                body = {"id": event_id, "type": kind, "user_id": user, "item_id": item}
                subject = event_subject(PREFIX, Event(type=kind, user_id=user, ts=0.0, item_id=item))
                messages.append((event_id, subject, orjson.dumps(body)))
            nc = await nats.connect(client_url(data_dir))
            counted_before = await counters(http, http_url)
            agent_cpu, nats_cpu = cpu_seconds(process.pid), sum(cpu_seconds(c) for c in children(process.pid))
            client_cpu = time.process_time()
            load = load_average()
            flowing.set()
            send_started = time.perf_counter()
            for n, (event_id, subject, body) in enumerate(messages):
                delay = send_started + n / args.rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                readings.sent[event_id] = time.perf_counter()
                await nc.publish(subject, body)
            await nc.flush()
            send_s = time.perf_counter() - send_started
            async with asyncio.timeout(args.wait):
                while len(readings.reflected) < total:
                    await asyncio.sleep(0.05)
            window_s = time.perf_counter() - send_started
            agent_used = cpu_seconds(process.pid) - agent_cpu
            nats_used = sum(cpu_seconds(c) for c in children(process.pid)) - nats_cpu
            client_used = time.process_time() - client_cpu
            rss_flow = rss_mib_of(process.pid)
            counted = await counters(http, http_url)
            print_flow(args, readings, total, send_s, load)
            sent = counted.get("recsys_ws_pushes_total", 0) - counted_before.get("recsys_ws_pushes_total", 0)
            replaced = counted.get("recsys_ws_pushes_replaced_total", 0) - counted_before.get(
                "recsys_ws_pushes_replaced_total", 0
            )
            print(
                f"agent: {sent:.0f} pushes sent on sockets, {replaced:.0f} replaced unsent (slow sockets),"
                f" {counted.get('recsys_ws_closed_total', 0):.0f} sockets closed, RSS {rss_flow:.0f} MiB after the"
                f" flow; cpu per second of the flow ({window_s:.1f} s): agent {agent_used / window_s:.2f},"
                f" nats-server {nats_used / window_s:.2f}, this client {client_used / window_s:.2f}",
                flush=True,
            )
            await nc.drain()
    except TimeoutError:
        print(f"flow: only {len(readings.reflected)} of {len(readings.sent)} events reflected within {args.wait} s")
        raise
    finally:
        await stop(process)
    print(describe(), flush=True)


def print_flow(args: argparse.Namespace, readings: Readings, total: int, send_s: float, load: float) -> None:
    latencies = [1000 * (readings.reflected[e] - t) for e, t in readings.sent.items() if e in readings.reflected]
    delays = readings.push_delays
    print(
        f"flow: {total} events at {total / send_s:.0f}/s for {send_s:.1f} s to {args.sockets} sockets (load average"
        f" {load:.2f}): event -> socket p50 {statistics.median(latencies):.1f} ms, p90 {percentile(latencies, 0.9):.1f}"
        f" ms, p99 {percentile(latencies, 0.99):.1f} ms, max {max(latencies):.0f} ms; push -> socket p50"
        f" {statistics.median(delays):.1f} ms, p99 {percentile(delays, 0.99):.1f} ms; reflected"
        f" {len(readings.reflected)}/{total}; pushes read {readings.pushes - readings.initial}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sockets", type=int, default=5_000)
    parser.add_argument("--rate", type=float, default=1_000.0, help="events per second")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--connect-concurrency", type=int, default=100)
    parser.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the last pushes")
    parser.add_argument("--data-dir", default="out/bench-sockets")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
