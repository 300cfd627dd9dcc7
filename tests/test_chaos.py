"""The fault-injection model test (tests/chaos.py) on a fixed budget: a few seeds per mode, every run checking
the promise after every step. A failure prints the seed, the mode, the steps and the command that replays them.

Longer runs by hand: `python3 -m tests.chaos --mode redis --seed 7 --steps 50000` (README, "Tests").
"""

import io
import os
import shutil
import sys
import tempfile
import unittest

from tests import chaos
from tests.support import REQUIRE_ALL, require_binary

# The budget: SEEDS x STEPS per mode. Each mode takes 5-20 s on the 2-core CI machine (restarts, strace and Redis
# faults dominate); the six together stay well under the suite's share of 2.5 minutes.
SEEDS = (1, 2, 3)
STEPS = 120


def require_namespace_disk() -> None:
    """The history-file modes keep the file on a small tmpfs in a private mount namespace (unshare + nsenter,
    which needs root or unprivileged user namespaces)."""
    for binary in ("unshare", "nsenter", "strace"):
        require_binary(binary)
    directory = tempfile.mkdtemp(prefix="chaos-probe-")
    holder = chaos.TmpfsHolder(os.path.join(directory, "disk"), 1 << 20)
    try:
        holder.start()
    except chaos.StartFailed as exc:
        if REQUIRE_ALL:
            raise AssertionError(f"{exc} (SSESERVER_TEST_REQUIRE_ALL=1 forbids skipping)") from None
        raise unittest.SkipTest(str(exc)) from None
    finally:
        holder.stop()
        shutil.rmtree(directory, ignore_errors=True)


class ChaosTest(unittest.TestCase):
    def run_budget(self, mode: str) -> None:
        for seed in SEEDS:
            with self.subTest(mode=mode, seed=seed):
                out = io.StringIO()
                passed = chaos.Chaos(mode, seed, STEPS, out=out).run()
                report = out.getvalue()
                # One line per run in the CI log says what was exercised, pass or fail.
                summary = [line for line in report.splitlines() if line.startswith(("chaos summary", "  faults"))]
                print("\n" + "\n".join(summary), file=sys.stderr, flush=True)
                self.assertTrue(passed, "\n" + report)

    def test_memory(self):
        self.run_budget("memory")

    def test_file_always(self):
        require_namespace_disk()
        self.run_budget("file-always")

    def test_file_interval(self):
        require_namespace_disk()
        self.run_budget("file-interval")

    def test_file_never(self):
        require_namespace_disk()
        self.run_budget("file-never")

    def test_redis(self):
        require_binary("redis-server")
        self.run_budget("redis")

    def test_redis_aof(self):
        require_binary("redis-server")
        self.run_budget("redis-aof")


class PlanTest(unittest.TestCase):
    def test_the_same_seed_gives_the_same_operations(self):
        for mode in chaos.MODES:
            first = [str(op) for op in chaos.make_plan(mode, 11, 300)[1]]
            self.assertEqual(first, [str(op) for op in chaos.make_plan(mode, 11, 300)[1]])
            self.assertNotEqual(first, [str(op) for op in chaos.make_plan(mode, 12, 300)[1]])

    def test_payloads_are_reproducible_and_within_the_limit_unless_meant_to_be_over(self):
        for spec in (
            s for op in chaos.make_plan("memory", 3, 400)[1] if op.kind == "publish" for s in [op.args["payload"]]
        ):
            tag, name, body = chaos.make_payload(spec, 1795000000000000)
            self.assertEqual((tag, name, body), chaos.make_payload(spec, 1795000000000000))
            self.assertEqual(len(body) > chaos.LIMIT, spec[2] == "over", spec)
            body.decode("utf-8")


if __name__ == "__main__":
    unittest.main()
