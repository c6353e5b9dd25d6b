"""VIN generators for the benchmarks: realistic VINs that decode.

Each VIN takes positions 1-11 from tests/fixtures/pattern-vins.txt (real vPIC
WMI and model patterns), a 6-digit serial, and its 49 CFR 565.15 check digit.
"""
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
W = [8, 7, 6, 5, 4, 3, 2, 10, 0, 9, 8, 7, 6, 5, 4, 3, 2]
T = {**{str(i): i for i in range(10)},
     **dict(zip("ABCDEFGHJKLMNPRSTUVWXYZ", [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 7, 9, 2, 3, 4, 5, 6, 7, 8, 9]))}


def with_check_digit(v):
    s = sum(T[c] * w for c, w in zip(v, W)) % 11
    return v[:8] + ("X" if s == 10 else str(s)) + v[9:]


def patterns(n=None):
    p = [line.strip()[:11] for line in open(ROOT / "tests/fixtures/pattern-vins.txt") if line.strip()]
    return p[:n] if n else p


def distinct(n, offset=0):
    """`n` distinct VINs: every pattern in turn, serials counting up from `offset`."""
    p = patterns()
    return [with_check_digit(p[i % len(p)] + "%06d" % (offset + i // len(p))) for i in range(n)]


def random_vins(n, seed=1, models=None):
    """`n` VINs with random serials (duplicates possible), from `models` patterns."""
    rng = random.Random(seed)
    p = patterns(models)
    return [with_check_digit(rng.choice(p) + "%06d" % rng.randrange(1_000_000)) for _ in range(n)]


def write_lines(path, vins):
    with open(path, "w") as f:
        f.write("\n".join(vins))
        f.write("\n")
