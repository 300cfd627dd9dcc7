"""An emulated `systemctl restart` under load, for README's "Upgrades without disconnects" table (a benchmark,
not a test): sseload's subscribers and publishers run against the daemon while this script plays systemd (the
fd store of tests/test_fdstore.py), stops the daemon with SIGTERM once sseload has warmed up, and starts the next
one with the stored descriptors. Prints one JSON line: what sseload saw (streams closed, events lost, duplicated,
reordered, latency) and what the restart took.

    ulimit -n $(ulimit -Hn)
    python3 -m tests.fdstore_bench --sseload /tmp/sseload --port 5077 --config bench.toml --after 5 -- \\
        --subs 10000 --msgs 1000 --rate 50 --pub-conns 4 --duration 40 --drain 10
"""

import argparse
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time

from tests.support import assert_exit, daemon_process
from tests.test_fdstore import FakeSystemd

STORE_SIZE = 65538  # the shipped unit's FileDescriptorStoreMax=


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sseload", required=True)
    parser.add_argument("--port", type=int, default=5077)
    parser.add_argument("--config")
    parser.add_argument("--after", type=float, default=5.0, help="seconds after sseload's warm-up to restart")
    parser.add_argument("--no-restart", action="store_true", help="the same run without a restart, to compare")
    parser.add_argument("load", nargs="*", help="sseload's arguments (after --)")
    options = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this process holds the store's descriptors
    fake = FakeSystemd()
    env = {"NOTIFY_SOCKET": fake.address, "FDSTORE": str(STORE_SIZE)}
    args = ["--port", str(options.port), *(["-c", options.config] if options.config else [])]
    result: dict = {}
    try:
        with daemon_process(*args, env=env) as (first, port):
            load = subprocess.Popen(
                [options.sseload, "--port", str(port), *options.load],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for line in load.stderr:  # sseload's progress lines
                if "warm-up complete" in line:
                    break
            if options.no_restart:
                output, _ = load.communicate(timeout=300)
                print(output.strip().splitlines()[-1])
                return 0
            time.sleep(options.after)  # the load runs steadily before the restart (a benchmark's pacing)
            started = time.monotonic()
            os.kill(first.pid, signal.SIGTERM)
            assert_exit(first, 0)
            stopped = time.monotonic()
            stored = len(fake.names())
            stop_log = re.findall(r"fd store: (.*)", "\n".join(first.log_lines))
        with daemon_process(*args, env=env, fds=fake.passed()) as (second, _):
            serving = time.monotonic()
            output, _ = load.communicate(timeout=300)
            os.kill(second.pid, signal.SIGTERM)
            assert_exit(second, 0)
        report = json.loads(output.strip().splitlines()[-1])
        result = {
            "subs": report["N"],
            "streams_closed": report["subs_closed_eof"] + report["subs_closed_reset"] + report["subs_closed_other"],
            "lost": report["lost"],
            "dup": report["dup"],
            "reordered": report["reordered"],
            "expected": report["expected"],
            "delivered": report["delivered"],
            "pub_http_err": report["pub_http_err"],
            "pub_reconnects": report["pub_reconnects"],
            "p99_ms": report["p99_ms"],
            "max_ms": report["max_ms"],
            "descriptors_stored": stored,
            "sigterm_to_exit_ms": round((stopped - started) * 1000),
            "sigterm_to_serving_ms": round((serving - started) * 1000),
            "stop_log": stop_log,
            "start_log": re.findall(r"restart: (adopted .*)", "\n".join(second.log_lines)),
        }
    finally:
        fake.close()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
