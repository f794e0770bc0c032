"""`python -m rewards`: the reward self-test table; exits non-zero on any failure."""

import sys

from rewards.selftest import run

if __name__ == "__main__":
    sys.exit(1 if run() else 0)
