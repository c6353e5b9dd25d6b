#!/usr/bin/env python3
"""Writes src/local/model-supplement.tsv.zst: vPIC's model patterns of the
WMIs several makes share, for the VINs the embedded decoder (corgi-rs)
names no make for.

A WMI such as 5T4 (Workhorse, Caterpillar, IC Bus, International) names no
make; vPIC takes the make from the model a pattern decodes. corgi-rs 0.4.0's
export predates some of those rows (schema 3214 of 5T4 ends in 2013 there
and is open-ended in vPIC now; 10T's `FJ` was `FJ**[A-M]`). The decoder
consults this table only where the embedded tables name no make, so a row
they already hold changes nothing. The source is the vPIC database Corgi JS
bundles (NHTSA data, public domain); zstd keeps the 3.5 MB table at 0.2 MB.

    scripts/wmi-supplement   # installs Corgi JS, builds vinetl, runs this and wmi_supplement.py
"""
import subprocess
import sys
from pathlib import Path

from vpic_db import query, tsv_line

ROOT = Path(__file__).resolve().parent.parent
# Three-character WMIs with no make of their own and several makes;
# model patterns whose model belongs to exactly one make.
rows = query("""
    SELECT w.Wmi, ws.YearFrom, coalesce(ws.YearTo, 0), p.Keys, min(mk.Name), m.Name
    FROM Wmi w
    JOIN Wmi_VinSchema ws ON ws.WmiId = w.Id
    JOIN Pattern p ON p.VinSchemaId = ws.VinSchemaId AND p.ElementId = 28
    JOIN Model m ON m.Id = CAST(p.AttributeId AS INTEGER)
    JOIN Make_Model mm ON mm.ModelId = m.Id
    JOIN Make mk ON mk.Id = mm.MakeId
    WHERE w.MakeId IS NULL AND length(w.Wmi) = 3
      AND (SELECT count(*) FROM Wmi_Make wm WHERE wm.WmiId = w.Id) > 1
    GROUP BY w.Wmi, ws.YearFrom, ws.YearTo, p.Keys, m.Id
    HAVING count(DISTINCT mk.Id) = 1
    ORDER BY w.Wmi, ws.YearFrom, p.Keys, m.Name""")

text = "wmi\tyear_from\tyear_to\tkeys\tmake\tmodel\n" + "".join(tsv_line(r) for r in rows)
out = ROOT / "src/local/model-supplement.tsv.zst"
subprocess.run(["zstd", "-19", "-q", "-f", "-o", str(out)], input=text.encode(), check=True)
print(f"{len(rows)} model patterns of shared WMIs, {out.stat().st_size:,} bytes", file=sys.stderr)
