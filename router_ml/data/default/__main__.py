"""Rebuild or check the routing data set shipped in the package.

python -m router_ml.data.default --rebuild                # from $ROUTER_ML_DATA_DIR/llmrouter_ulab
python -m router_ml.data.default --rebuild --source DIR   # from another copy of the folder
python -m router_ml.data.default --check                  # exit 1 when the shipped copy differs
"""

from __future__ import annotations

import argparse
import sys

from router_ml.data.default import DEFAULT_FILE, check_default, write_default


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m router_ml.data.default", description=__doc__.split("\n")[0]
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--rebuild", action="store_true", help="write the compact copy into the package")
    action.add_argument("--check", action="store_true", help="compare the shipped copy with the source")
    parser.add_argument("--source", default=None, help="the llmrouter_ulab folder (default: the data dir's)")
    args = parser.parse_args(argv)
    if args.rebuild:
        out = write_default(args.source)
        print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
        return 0
    problems = check_default(args.source)
    for p in problems:
        print(p, file=sys.stderr)
    if not problems:
        print(f"{DEFAULT_FILE.name} matches the source")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
