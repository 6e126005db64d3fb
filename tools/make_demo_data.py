"""Write the demo dataset (scikit-learn's handwritten digits as PNG image folders).

    python tools/make_demo_data.py [--dst datasets/demo_digits]

Training with configs/demo/ makes it on first use anyway; this command makes it ahead of time, for
example before a multi-process run or to look at the images. Running it again changes nothing.
"""

import argparse
import os
import sys

# Run as a script from anywhere: the data package lives in the repository root, one level up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import DataError, make_demo_digits  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the demo digits dataset as train/ and val/ image folders.")
    parser.add_argument("--dst", default="datasets/demo_digits", help="output folder (configs/demo's DATA_PATH)")
    args = parser.parse_args(argv)
    try:
        written = make_demo_digits(args.dst)
    except (DataError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{'wrote' if written else 'already there:'} {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
