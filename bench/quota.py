"""A key's requests-per-minute limit under a load at 4x the limit: what one gateway and two gateways
sharing a PostgreSQL state database admit in 60 s.

    .venv/bin/python bench/quota.py                  # rpm 120, 60 s, one and two gateways, 2 repeats
    .venv/bin/python bench/quota.py --rpm 60 --seconds 60 --repeats 1

A mock engine answers at once (loaders/mock_engine.py); clients send `--load` x rpm requests a
minute, paced, with one key of a project limited to `--rpm` (each repeat a new key). With two
gateways every request goes to the next gateway in turn. Printed: requests admitted (200) against
the limit over the run, as a ratio (issue 38's target: within 5%). The two-gateway runs need
Debian's PostgreSQL (`make system-deps`); each gateway shares its window every --state-poll-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import start_gateway, start_mock  # noqa: E402

from loaders.engine import free_port  # noqa: E402
from loaders.pico import make_pico_base  # noqa: E402

ADMIN = "bench-admin"
POLL = 0.5


def postgres(root: Path) -> tuple[subprocess.Popen, str]:
    """A throwaway PostgreSQL server on loopback (as tests/conftest.py's); (process, URL)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if not found:
        raise SystemExit("PostgreSQL is not installed (make system-deps installs Debian's postgresql)")
    bin_dir, port = Path(found[-1]).parent, free_port()
    shutil.chown(root, "postgres")
    subprocess.run(
        [str(bin_dir / "initdb"), "-D", str(root / "data"), "-U", "deltagate", "--auth=trust"],
        check=True,
        capture_output=True,
        user="postgres",
    )
    cmd = [str(bin_dir / "postgres"), "-D", str(root / "data"), "-p", str(port), "-k", str(root)]
    cmd += ["-c", "listen_addresses=127.0.0.1"]
    proc = subprocess.Popen(
        cmd, stdout=open(root / "pg.log", "ab"), stderr=subprocess.STDOUT, user="postgres"
    )
    for _ in range(100):
        if subprocess.run([str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)]).returncode == 0:
            break
        time.sleep(0.2)
    return proc, f"postgresql://deltagate@127.0.0.1:{port}/postgres"


async def run(urls: list[str], secret: str, rate: float, seconds: float) -> dict:
    """Paced requests at `rate` a second for `seconds`, round robin over `urls`: statuses counted."""
    import aiohttp

    counts: dict[int, int] = {}
    body = {"model": "mock", "prompt": "x", "max_tokens": 1}
    headers = {"Authorization": f"Bearer {secret}"}
    async with aiohttp.ClientSession(headers=headers) as session:

        async def one(url: str) -> None:
            async with session.post(url + "/v1/completions", json=body) as resp:
                await resp.read()
                counts[resp.status] = counts.get(resp.status, 0) + 1

        start, tasks, i = time.monotonic(), [], 0
        while (now := time.monotonic()) < start + seconds:
            due = start + i / rate
            if due > now:
                await asyncio.sleep(due - now)
            tasks.append(asyncio.create_task(one(urls[i % len(urls)])))
            i += 1
        await asyncio.gather(*tasks)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rpm", type=int, default=120)
    parser.add_argument("--load", type=float, default=4.0, help="offered load, times the limit")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--fronts", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    args = parser.parse_args()

    import httpx

    work = Path(tempfile.mkdtemp(prefix="deltagate-quota-"))
    print(f"work dir {work}", flush=True)
    base = make_pico_base(work / "pico")
    mock = start_mock("mock", work, 0)
    services, pg = [mock], None
    rows = []
    try:
        for fronts in args.fronts:
            extra = ["--state-poll-seconds", str(POLL)]
            if fronts > 1:  # its own temp dir: the server's user must reach it (the work dir is 0700)
                pg, url = postgres(Path(tempfile.mkdtemp(prefix="deltagate-quota-pg-")))
                extra += ["--state-db", url, "--artifact-store", str(work / "store")]
            gateways = []
            for k in range(fronts):
                (work / f"g{fronts}-{k}").mkdir()
                args_k = ["--base", f"mock={base}", "--engine-url", f"mock={mock.url}", *extra]
                gateways.append(start_gateway(args_k, work / f"g{fronts}-{k}").wait(120))
            services += gateways
            for rep in range(args.repeats):
                body = {"name": f"k{fronts}-{rep}", "models": ["mock"], "limits": {"rpm": args.rpm}}
                auth = {"Authorization": f"Bearer {ADMIN}"}
                made = httpx.post(f"{gateways[0].url}/v1/projects/bench/keys", json=body, headers=auth)
                made.raise_for_status()
                time.sleep(3 * POLL)  # every gateway has read the new key
                rate = args.load * args.rpm / 60
                counts = asyncio.run(
                    run([g.url for g in gateways], made.json()["secret"], rate, args.seconds)
                )
                allowed = args.rpm * args.seconds / 60
                row = {
                    "fronts": fronts,
                    "repeat": rep + 1,
                    "sent": sum(counts.values()),
                    "admitted": counts.get(200, 0),
                    "refused": counts.get(429, 0),
                    "other": sum(v for s, v in counts.items() if s not in (200, 429)),
                    "limit": allowed,
                    "ratio": counts.get(200, 0) / allowed,
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
            for g in gateways:
                g.stop()
    finally:
        for service in reversed(services):
            service.stop()
        if pg is not None:
            pg.kill()
    print(f"\nrpm limit {args.rpm}, offered {args.load:g}x for {args.seconds:g} s, poll {POLL} s")
    print("| gateways | repeat | sent | admitted | refused | other | limit over the run | admitted / limit |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['fronts']} | {r['repeat']} | {r['sent']} | {r['admitted']} | {r['refused']} "
            f"| {r['other']} | {r['limit']:.0f} | {r['ratio']:.3f} |"
        )


if __name__ == "__main__":
    main()
