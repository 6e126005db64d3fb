"""How every tool starts: the checkout on the import path, and a user-facing error as one line.

A tool runs as ``python tools/NAME.py``, so Python puts ``tools/`` on the path and this module imports first, before
the tool's imports of the checkout's modules (their import sorting places it there). Each tool ends with

    if __name__ == "__main__":
        sys.exit(run_tool(main))

``main(argv)`` returns the exit status and raises :class:`utils.RunError` (or a subclass) for what the user must
fix; ``run_tool`` turns that into ``error: ...`` on stderr and exit status 1. argparse's usage errors keep status 2.
"""

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils import RunError  # noqa: E402  (the checkout is on the path only now)


def run_tool(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """``main(argv)``'s exit status; a RunError becomes one ``error: ...`` line on stderr and status 1."""
    try:
        return main(argv)
    except RunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
