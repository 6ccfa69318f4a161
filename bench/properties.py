"""The command line's property tests (tests/test_properties.py) with a larger budget.

The same properties and input strategies (tests/helpers/cli_inputs.py) as in CI, but
``--examples`` generated inputs per property (CI: a few dozen, derandomized) drawn at random
(``--seed`` makes a run repeatable). A failure prints the smallest input found; keep it as an
``@example`` of its test once fixed.

    python bench/properties.py --examples 500                 # every property, ~0.3 s per example
    python bench/properties.py --examples 2000 -k train_backdoor --seed 7
"""
import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=500, help="generated inputs per property (default 500)")
    ap.add_argument("-k", default=None, help="pytest -k expression selecting properties (e.g. purify, evaluate)")
    ap.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: a random one)")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the runs (default 1)")
    args, rest = ap.parse_known_args()
    if args.examples < 1:
        ap.error("--examples must be at least 1")
    env = dict(os.environ, NFT_FAST_PROPERTY_EXAMPLES=str(args.examples), OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_properties.py",
           "--hypothesis-show-statistics"]
    if args.k:
        cmd += ["-k", args.k]
    if args.seed is not None:
        cmd += [f"--hypothesis-seed={args.seed}"]
    return subprocess.call(cmd + rest, cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
