"""`python3 -m tests`: run the whole suite with the standard library's unittest.

Prints unittest's usual report, then one closing line "N passed, N failed, N skipped" that CI reads.
Extra arguments are test-name patterns (unittest's -k), e.g. `python3 -m tests framing`.
"""

import os
import sys
import unittest


def main() -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    suite = unittest.defaultTestLoader.discover(os.path.join(root, "tests"), top_level_dir=root)
    patterns = sys.argv[1:]
    if patterns:
        suite = unittest.TestSuite(test for test in _flatten(suite) if any(p in test.id() for p in patterns))
    result = unittest.TextTestRunner(verbosity=2, buffer=False).run(suite)
    # A test with failing subtests is reported once per subtest: count each test once.
    failed = len(
        {getattr(test, "test_case", test).id() for test, _ in result.failures + result.errors}
        | {test.id() for test in result.unexpectedSuccesses}
    )
    skipped = len(result.skipped)
    passed = result.testsRun - failed - skipped
    print(f"tests: {passed} passed, {failed} failed, {skipped} skipped")
    if result.testsRun == 0:
        print("no test ran", file=sys.stderr)
        return 1
    return 0 if failed == 0 else 1


def _flatten(suite):
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            yield from _flatten(item)
        else:
            yield item


if __name__ == "__main__":
    sys.exit(main())
