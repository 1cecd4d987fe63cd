"""Every end-to-end benchmark in a row: ``.venv/bin/python -m benchmarks.suite [--quick]``.

Runs ``hotpath``, ``e2e``, ``idle`` and ``slow_consumer`` one after the other
(never at once: they would measure each other), each writing its JSON under
``benchmarks/results/``. Extra arguments are passed to every one of them.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence

from benchmarks.harness import ROOT

BENCHMARKS = ("hotpath", "e2e", "idle", "slow_consumer")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    failed = []
    for name in BENCHMARKS:
        print(f"==== benchmarks.{name} {' '.join(args)}", flush=True)
        code = subprocess.call([sys.executable, "-m", f"benchmarks.{name}", *args], cwd=ROOT)
        if code:
            failed.append(name)
    print(f"==== suite done in {time.monotonic() - started:.0f} s; failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
