"""Write the demo dataset (scikit-learn's handwritten digits as PNG image folders).

    python tools/make_demo_data.py [--dst datasets/demo_digits]

Training with configs/demo/ makes it on first use anyway; this command makes it ahead of time, for
example before a multi-process run or to look at the images. Running it again changes nothing.
"""

import argparse
import sys
from collections.abc import Sequence

from cli import run_tool  # puts the checkout on the path for the imports below

from data import DataError, make_demo_digits


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the demo digits dataset as train/ and val/ image folders.")
    parser.add_argument("--dst", default="datasets/demo_digits", help="output folder (configs/demo's DATA_PATH)")
    args = parser.parse_args(argv)
    try:
        written = make_demo_digits(args.dst)
    except OSError as err:  # an unwritable --dst, say
        raise DataError(f"cannot write the demo dataset to {args.dst}: {err}") from err
    print(f"{'wrote' if written else 'already there:'} {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
