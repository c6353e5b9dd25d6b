#!/usr/bin/env python3
"""Reads a vinetl Parquet dataset back with two independent readers from
PyPI, DuckDB and pyarrow, and prints what they see as JSON for the Rust
tests to check.

    read_dataset.py ROOT [--endpoint http://127.0.0.1:PORT] [--vin VIN ...]

ROOT is a local directory or s3://bucket/prefix (credentials from
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY). Only committed partitions (with
_SUCCESS) are read; the others are listed as incomplete.
"""
import argparse
import json
import os
import sys

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs


def filesystem(root, endpoint):
    if root.startswith("s3://"):
        host = endpoint.split("://", 1)[1] if endpoint else None
        fs = pafs.S3FileSystem(
            access_key=os.environ["AWS_ACCESS_KEY_ID"],
            secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
            region=os.environ.get("AWS_REGION", "us-east-1"),
            endpoint_override=host,
            scheme="http" if endpoint and endpoint.startswith("http://") else "https",
        )
        return fs, root[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(root)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--endpoint")
    ap.add_argument("--vin", action="append", default=[])
    args = ap.parse_args()
    fs, base = filesystem(args.root, args.endpoint)

    def exists(path):
        return fs.get_file_info(path).type == pafs.FileType.File

    partitions, committed_files, incomplete = {}, [], []
    for info in fs.get_file_info(pafs.FileSelector(base, recursive=False)):
        name = info.base_name
        if info.type != pafs.FileType.Directory or name.startswith(("_", ".")):
            continue
        part = f"{base}/{name}"
        ok = exists(f"{part}/_SUCCESS") and exists(f"{part}/_manifest.json")
        entry = {"committed": ok}
        if ok:
            with fs.open_input_file(f"{part}/_manifest.json") as f:
                manifest = json.loads(f.read())
            entry["manifest_rows"] = manifest["rows"]
            entry["manifest_files"] = [x["path"] for x in manifest["files"]]
            committed_files += [f"{base}/{x['path']}" for x in manifest["files"]]
        else:
            incomplete.append(name)
        partitions[name] = entry

    out = {"partitions": partitions, "incomplete": incomplete}
    if committed_files:
        # pyarrow: the manifest's files, with the Hive partition typed as a date.
        part_schema = pa.schema([("dt", pa.date32())])
        dataset = ds.dataset(
            committed_files,
            filesystem=fs,
            format="parquet",
            partitioning=ds.partitioning(part_schema, flavor="hive"),
            partition_base_dir=base,
        )
        table = dataset.to_table()
        out["pyarrow"] = {
            "rows": table.num_rows,
            "schema": {f.name: str(f.type) for f in table.schema},
        }
        con = duckdb.connect()
        if args.root.startswith("s3://"):
            # DuckDB's S3 support is an extension downloaded at run time; here
            # it scans the same files through pyarrow's S3 filesystem.
            con.register("t", dataset)
            source = "t"
        else:
            files = ", ".join(f"'{p}'" for p in committed_files)
            source = f"read_parquet([{files}], hive_partitioning = true)"
        rows, distinct_rows, distinct_vins = con.execute(
            f"SELECT count(*), count(DISTINCT (job_id, source, source_row)), count(DISTINCT vin) FROM {source}"
        ).fetchone()
        types = {row[0]: row[1] for row in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()}
        makes = dict(
            con.execute(f"SELECT vin, any_value(make) FROM {source} WHERE list_contains(?, vin) GROUP BY vin", [args.vin]).fetchall()
        ) if args.vin else {}
        by_status = dict(con.execute(f"SELECT status, count(*) FROM {source} GROUP BY status").fetchall())
        recalls = con.execute(
            f"""SELECT count(*) FILTER (WHERE has_recalls), count(*) FILTER (WHERE has_recalls IS NULL AND status = 'decoded'),
                       count(*) FILTER (WHERE has_recalls = false)
                FROM {source}"""
        ).fetchone()
        out["duckdb"] = {
            "rows": rows,
            "distinct_rows": distinct_rows,
            "distinct_vins": distinct_vins,
            "types": types,
            "makes": makes,
            "by_status": by_status,
            "rows_with_recalls": recalls[0],
            "decoded_rows_recalls_unknown": recalls[1],
            "rows_without_recalls": recalls[2],
        }
    json.dump(out, sys.stdout, default=str)


if __name__ == "__main__":
    main()
