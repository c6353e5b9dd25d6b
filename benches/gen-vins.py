#!/usr/bin/env python3
"""Writes N distinct, pattern-conforming VINs with correct check digits.

    python3 benches/gen-vins.py N OUT [SERIAL_OFFSET] [--random]

Each VIN takes positions 1-11 from tests/fixtures/pattern-vins.txt (real vPIC
WMI and model patterns, so the VINs decode) and a 6-digit serial, then gets
its 49 CFR 565.15 check digit. With --random the serials are drawn at random
(duplicates possible, seeded for repeatability) instead of counted.
"""
import random
import sys

W = [8, 7, 6, 5, 4, 3, 2, 10, 0, 9, 8, 7, 6, 5, 4, 3, 2]
T = {**{str(i): i for i in range(10)},
     **dict(zip("ABCDEFGHJKLMNPRSTUVWXYZ", [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 7, 9, 2, 3, 4, 5, 6, 7, 8, 9]))}


def with_check_digit(v):
    s = sum(T[c] * w for c, w in zip(v, W)) % 11
    return v[:8] + ('X' if s == 10 else str(s)) + v[9:]


def main():
    args = [a for a in sys.argv[1:] if a != '--random']
    n, out = int(args[0]), args[1]
    offset = int(args[2]) if len(args) > 2 else 0
    pattern = open('tests/fixtures/pattern-vins.txt').read().split()
    rng = random.Random(1)
    with open(out, 'w') as f:
        for i in range(n):
            if '--random' in sys.argv:
                v = rng.choice(pattern)[:11] + '%06d' % rng.randrange(1_000_000)
            else:
                v = pattern[i % len(pattern)][:11] + '%06d' % (offset + i // len(pattern))
            f.write(with_check_digit(v) + '\n')


main()
