#!/usr/bin/env python3
"""Writes src/local/wmi-supplement.tsv: what vPIC's WMI table says about the
manufacturers the embedded decoder (corgi-rs) has no entry for, so a VIN of
theirs still gets its make, manufacturer, country and vehicle type.

corgi-rs 0.4.0 ships WMIs of cars, trucks, MPVs and incomplete vehicles
from an export older than March 2026; vPIC also knows motorcycles, buses,
low-speed and off-road vehicles, and WMIs registered since. The source is
the vPIC database Corgi JS bundles (NHTSA data, public domain; installed by
scripts/tools: tools_corgi_js). Trailers are left out (two thirds of vPIC's
WMIs; nobody enriches a fleet of trailers by VIN).

    scripts/wmi-supplement   # installs Corgi JS, builds vinetl (release), runs this
"""
import json
import os
import subprocess
import sys
from pathlib import Path

from vpic_db import query, tsv_line

ROOT = Path(__file__).resolve().parent.parent
binary = Path(os.environ["CARGO_TARGET_DIR"]) / "release" / "vinetl"
rows = query("""
    SELECT w.Wmi, coalesce(mk.Name, (SELECT min(m.Name) FROM Wmi_Make wm JOIN Make m ON m.Id = wm.MakeId
                                     WHERE wm.WmiId = w.Id HAVING count(*) = 1), ''),
           coalesce(mf.Name, ''), coalesce(c.Name, ''), coalesce(vt.Name, '')
    FROM Wmi w
    LEFT JOIN Make mk ON mk.Id = w.MakeId
    LEFT JOIN Manufacturer mf ON mf.Id = w.ManufacturerId
    LEFT JOIN Country c ON c.Id = w.CountryId
    LEFT JOIN VehicleType vt ON vt.Id = w.VehicleTypeId
    WHERE w.VehicleTypeId IS NOT NULL AND w.VehicleTypeId <> 6 AND length(w.Wmi) IN (3, 6)
    ORDER BY w.Wmi""")

# A VIN per WMI (6-character WMIs put their last three in positions 12-14);
# the ones the embedded decoder answers with code 7 are the ones it lacks.
def probe(wmi):
    tail = wmi[3:] if len(wmi) == 6 else "111"
    return f"{wmi[:3]}11111" + "1A1" + tail + "111"

# The note the decoder adds when this file answered (src/local/decoder.rs).
SUPPLEMENTED = "the embedded tables have no patterns for it"
vins = "\n".join(probe(r[0]) for r in rows) + "\n"
out = subprocess.run([str(binary), "decode", "--file", "-"], input=vins, capture_output=True, text=True,
                     check=True).stdout
lacking = set()
for line, r in zip(out.splitlines(), rows):
    answer = json.loads(line)
    if "7" in answer.get("ErrorCode", "").split(",") or SUPPLEMENTED in answer.get("ErrorText", ""):
        lacking.add(r[0])
kept = [r for r in rows if r[0] in lacking]
with open(ROOT / "src/local/wmi-supplement.tsv", "w") as f:
    f.write("wmi\tmake\tmanufacturer\tcountry\tvehicle_type\n")
    for r in kept:
        f.write(tsv_line(r))
print(f"{len(kept)} of {len(rows)} WMIs (no trailers) are not in the embedded tables", file=sys.stderr)
