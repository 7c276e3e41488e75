"""Manifest inputs: files that name the images instead of a folder to list.

- A manifest file: Parquet, CSV (header row; optionally .gz) or JSON lines (optionally .gz),
  one object per row. Columns are matched by name, ignoring case and `_ - space`:
  the image is `uri`, else `url`, else `path`, else `bucket` + `key`; optional `size` (bytes),
  and a version, the first of `etag`, `version`, `last_modified` (`LastModifiedDate`); rows
  whose `is_delete_marker` is true or `is_latest` false are skipped. Relative paths are
  relative to the manifest's folder; absolute paths are local files; `bucket` + `key` take the
  manifest's protocol (s3:// for a local manifest). URIs are used as written.
- An S3 Inventory `manifest.json`: its data files (CSV.gz in `fileSchema` order with URL-encoded
  keys, Parquet or ORC), each one part, read in parallel.

Only image and .tar keys become rows, in the form of batchseg.inputs.sources (size -1 and version ""
when the manifest has none). Without a version column, an image annotated once counts as done
until its URI changes. `manifest_parts` is cheap (one small read per manifest) and checks the
columns, so a bad manifest fails at planning with one line; `read_manifest_part` streams one
part batch by batch (pyarrow), in whatever process runs it.
"""

from __future__ import annotations

import csv
import gzip
import json
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO
from urllib.parse import unquote_plus

import pyarrow as pa
import pyarrow.compute as pc
from fsspec.core import url_to_fs

from batchseg.inputs.names import (
    IMAGE_EXTENSIONS,
    INVENTORY_NAME,
    PAGE_ROWS,
    SHARD_EXTENSIONS,
    VIDEO_EXTENSIONS,
    InputError,
    is_shard_name,
)

URI_COLUMNS = ("uri", "url", "path")  # in order of precedence; else bucket + key
_ROLES = {  # role -> normalised column names, first present wins
    "uri": URI_COLUMNS,
    "bucket": ("bucket",),
    "key": ("key",),
    "size": ("size",),
    "version": ("etag", "version", "lastmodified", "lastmodifieddate"),
    "is_latest": ("islatest",),
    "is_delete_marker": ("isdeletemarker",),
}
_TYPES = {"size": pa.int64(), "is_latest": pa.bool_(), "is_delete_marker": pa.bool_()}  # others: text
_LISTED = re.compile(r"\.(" + "|".join(e[1:] for e in IMAGE_EXTENSIONS + SHARD_EXTENSIONS + VIDEO_EXTENSIONS) + r")$")
_BLOCK = 8 << 20  # bytes per read from the store: bounds memory per open manifest file
_BATCH_ROWS = 8192  # rows per Arrow batch: a few MB of Python rows at most


@dataclass(frozen=True)
class ManifestPart:
    """One unit of parallel reading: a data file (or some row groups of one).

    `columns`: (role, column name) pairs found at planning. `header`: column names of a CSV
    without a header row (S3 Inventory). `pieces`: Parquet row groups or ORC stripes (None: all).
    `protocol`: of bucket + key rows. `base`: the manifest's folder (URI), for relative paths.
    """

    uri: str
    format: str  # "parquet" | "csv" | "jsonl" | "orc"
    columns: tuple[tuple[str, str], ...]
    source: str  # the manifest named by the user, for messages
    header: tuple[str, ...] | None = None
    encoded_keys: bool = False
    pieces: tuple[int, ...] | None = None
    protocol: str = "s3"
    base: str = ""


def manifest_parts(uri: str, storage_options: dict[str, Any], rows_per_part: int = 1_000_000) -> list[ManifestPart]:
    """The parts to read for a manifest file or an S3 Inventory manifest.json, after checking
    its columns. A Parquet manifest splits by row groups (about `rows_per_part` rows a part);
    CSV and JSON lines are one part each; an inventory gives one part per data file.

    Raises InputError (one line naming the manifest, and the expected columns where they lack).
    """
    fs, path = url_to_fs(uri, **storage_options)
    protocol = _protocol(fs)
    folder = posixpath.dirname(path)
    try:
        if posixpath.basename(path) == INVENTORY_NAME:
            return _inventory_parts(fs, path, uri)
        fmt = _format(path)
        common = {"source": uri, "protocol": "s3" if protocol == "file" else protocol,
                  "base": fs.unstrip_protocol(folder)}
        if fmt == "parquet":
            import pyarrow.parquet as pq

            with fs.open(path, "rb", block_size=_BLOCK) as f:
                meta = pq.ParquetFile(f).metadata
                names = meta.schema.to_arrow_schema().names
            columns = _columns(names, uri)
            return [ManifestPart(fs.unstrip_protocol(path), fmt, columns, pieces=group, **common)
                    for group in _row_group_runs(meta, rows_per_part)]
        with fs.open(path, "rb", block_size=_BLOCK) as f:
            line = _first_line(f, path)
        if fmt == "csv":
            names = next(csv.reader([line]))
        else:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise InputError(f"manifest {uri}: the first line is not a JSON object")
            names = list(record)
        return [ManifestPart(fs.unstrip_protocol(path), fmt, _columns(names, uri), **common)]
    except FileNotFoundError:
        raise InputError(f"manifest not found: {uri}") from None
    except PermissionError:
        raise InputError(f"manifest not readable (access denied): {uri}") from None
    except (ValueError, OSError, pa.ArrowException) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"manifest {uri}: cannot read it ({_one_line(e)})") from None


def read_manifest_part(part: ManifestPart, storage_options: dict[str, Any],
                       page_rows: int = PAGE_ROWS) -> Iterator[list[dict[str, Any]]]:
    """Yield pages (lists of at most `page_rows` rows) of the images and shards one part names,
    reading the file batch by batch. Raises InputError (one line) if the file cannot be parsed."""
    fs, path = url_to_fs(part.uri, **storage_options)
    try:
        with fs.open(path, "rb", block_size=_BLOCK) as f:
            for batch in _batches(part, f):
                rows = _rows(batch, part)
                for start in range(0, len(rows), page_rows):
                    yield rows[start:start + page_rows]
    except FileNotFoundError:
        raise InputError(f"manifest data file not found: {part.uri} (named by {part.source})") from None
    except (pa.ArrowException, ValueError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"manifest {part.uri}: cannot read it ({_one_line(e)})") from None


# ---------------------------------------------------------------------------------------------
# planning


def _format(path: str) -> str:
    if path.lower().endswith(".parquet"):
        return "parquet"
    name = path.lower().removesuffix(".gz")
    if name.endswith(".csv"):
        return "csv"
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    raise InputError(f"manifest {path}: unknown format; expected .parquet, .csv[.gz] or .jsonl[.gz]")


def _normalise(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name.lower())


def _columns(names: list[str], source: str, inventory: bool = False) -> tuple[tuple[str, str], ...]:
    """(role, column name) for each role present; the image column is required."""
    by_norm: dict[str, str] = {}
    for name in names:
        by_norm.setdefault(_normalise(name.lstrip("\ufeff")), name)
    found: dict[str, str] = {}
    for role, candidates in _ROLES.items():
        for candidate in candidates:
            if candidate in by_norm:
                found[role] = by_norm[candidate]
                break
    if inventory or "uri" not in found:
        found.pop("uri", None)
        if not ("bucket" in found and "key" in found):
            expected = "bucket and key" if inventory else f"one of {', '.join(URI_COLUMNS)}, or bucket and key"
            raise InputError(f"manifest {source}: no column naming the images; expected {expected} "
                             f"(found: {', '.join(names) or 'none'})")
    else:
        found.pop("bucket", None)
        found.pop("key", None)
    return tuple(found.items())


def _row_group_runs(meta: Any, rows_per_part: int) -> list[tuple[int, ...] | None]:
    runs: list[tuple[int, ...]] = []
    current: list[int] = []
    rows = 0
    for i in range(meta.num_row_groups):
        current.append(i)
        rows += meta.row_group(i).num_rows
        if rows >= rows_per_part:
            runs.append(tuple(current))
            current, rows = [], 0
    if current:
        runs.append(tuple(current))
    return runs if len(runs) > 1 else [None]


def _first_line(f: BinaryIO, path: str) -> str:
    stream = gzip.GzipFile(fileobj=f) if path.lower().endswith(".gz") else f
    line = stream.readline().decode("utf-8-sig").strip()
    if not line:
        raise InputError(f"manifest {path}: empty")
    return line


def _inventory_parts(fs: Any, path: str, uri: str) -> list[ManifestPart]:
    try:
        doc = json.loads(fs.cat_file(path))
        fmt = doc["fileFormat"].lower()
        schema = doc["fileSchema"]
        files = [f["key"] for f in doc["files"]]
        destination = doc.get("destinationBucket", "").rsplit(":", 1)[-1]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"S3 Inventory manifest {uri}: not a manifest.json with fileFormat, fileSchema and files "
                         f"({_one_line(e)})") from None
    if fmt == "csv":
        header: tuple[str, ...] | None = tuple(n.strip() for n in schema.split(","))
        names = list(header)
    elif fmt in ("parquet", "orc"):
        header = None
        # Parquet: "message s3.inventory { required binary bucket (UTF8); ...}"; ORC: "struct<bucket:string,...>"
        names = re.findall(r"(?:required|optional)\s+\w+\s+(\w+)", schema) or re.findall(r"(\w+):", schema)
    else:
        raise InputError(f"S3 Inventory manifest {uri}: fileFormat {doc['fileFormat']!r} is not CSV, Parquet or ORC")
    columns = _columns(names, uri, inventory=True)
    protocol = _protocol(fs)
    return [
        ManifestPart(_data_file(fs, path, key, destination, uri), fmt, columns, source=uri, header=header,
                     encoded_keys=fmt == "csv", protocol="s3" if protocol == "file" else protocol)
        for key in files
    ]


def _data_file(fs: Any, manifest: str, key: str, destination: str, uri: str) -> str:
    """Where an inventory data file `key` (a key in the destination bucket) is: beside the
    manifest as S3 lays them out (DEST/PREFIX/SRC/CONFIG/{TIMESTAMP/manifest.json, data/...}),
    found by the folder names they share (SRC/CONFIG), so a copied inventory reads too; else in
    the manifest's destination bucket."""
    parts, key_parts = manifest.split("/"), key.split("/")
    for folder in (parts[:-1], parts[:-2]):  # the manifest's folder, then the one above it
        for n in range(len(folder), 1, -1):  # the longest run of shared folder names first
            tail = folder[-n:]
            for j in range(len(key_parts) - n):
                if key_parts[j:j + n] == tail:
                    return fs.unstrip_protocol("/".join(folder + key_parts[j + n:]))
    if destination and _protocol(fs) != "file":
        return fs.unstrip_protocol(f"{destination}/{key}")
    raise InputError(f"S3 Inventory manifest {uri}: cannot locate its data file {key}")


def _protocol(fs: Any) -> str:
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


# ---------------------------------------------------------------------------------------------
# reading


def _batches(part: ManifestPart, f: BinaryIO) -> Iterator[pa.RecordBatch]:
    names = [name for _, name in part.columns]
    if part.format == "parquet":
        import pyarrow.parquet as pq

        yield from pq.ParquetFile(f).iter_batches(batch_size=_BATCH_ROWS, row_groups=part.pieces, columns=names)
    elif part.format == "orc":
        from pyarrow import orc

        reader = orc.ORCFile(f)
        for stripe in part.pieces or range(reader.nstripes):
            yield reader.read_stripe(stripe, columns=names)
    else:
        stream = pa.input_stream(f, compression="gzip" if part.uri.lower().endswith(".gz") else None)
        types = {name: _TYPES.get(role, pa.string()) for role, name in part.columns}
        if part.format == "csv":
            from pyarrow import csv as pacsv

            yield from pacsv.open_csv(
                stream,
                read_options=pacsv.ReadOptions(column_names=part.header, block_size=1 << 20),
                convert_options=pacsv.ConvertOptions(include_columns=names, column_types=types,
                                                     strings_can_be_null=True),
            )
        else:
            from pyarrow import json as pajson

            yield from pajson.open_json(
                stream,
                read_options=pajson.ReadOptions(block_size=1 << 20),
                parse_options=pajson.ParseOptions(explicit_schema=pa.schema(list(types.items())),
                                                  unexpected_field_behavior="ignore"),
            )


def _rows(batch: pa.RecordBatch, part: ManifestPart) -> list[dict[str, Any]]:
    """Rows of the batch that name a current image or shard, in the listing's form."""
    col = {role: batch.column(name) for role, name in part.columns}
    name = col["uri"] if "uri" in col else col["key"]
    name = name.cast(pa.string())
    keep = pc.fill_null(pc.match_substring_regex(name, _LISTED.pattern, ignore_case=True), False)
    if "is_delete_marker" in col:
        keep = pc.and_(keep, pc.invert(pc.fill_null(col["is_delete_marker"].cast(pa.bool_()), False)))
    if "is_latest" in col:
        keep = pc.and_(keep, pc.fill_null(col["is_latest"].cast(pa.bool_()), True))
    names = name.filter(keep).to_pylist()
    if "uri" in col:
        uris = [_resolve(n, part) for n in names]
    else:
        buckets = col["bucket"].cast(pa.string()).filter(keep).to_pylist()
        keys = [unquote_plus(k) for k in names] if part.encoded_keys else names
        uris = [f"{part.protocol}://{b}/{k}" for b, k in zip(buckets, keys)]
    sizes = col["size"].cast(pa.int64()).filter(keep).to_pylist() if "size" in col else [None] * len(uris)
    versions = (pc.utf8_trim(col["version"].cast(pa.string()), '"').filter(keep).to_pylist()
                if "version" in col else [None] * len(uris))
    return [
        {"uri": u, "size": -1 if s is None else s, "version": v or "", "is_shard": is_shard_name(u)}
        for u, s, v in zip(uris, sizes, versions)
    ]


def _resolve(name: str, part: ManifestPart) -> str:
    if "://" in name:
        return name
    if name.startswith("/"):
        return "file://" + posixpath.normpath(name)
    protocol, _, folder = part.base.partition("://")
    return f"{protocol}://{posixpath.normpath(posixpath.join(folder, name))}"


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]

