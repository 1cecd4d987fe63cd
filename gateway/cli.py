"""The `iot-gateway` command line (PROTOCOL.md section 6)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `iot-gateway` console script."""
    print("iot-gateway: the hub is not built yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
