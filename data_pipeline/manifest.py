"""The job manifest: one Parquet row per object (docs/design.md section 3).

Status values: ``filtered`` (rejected before rendering, ``reason`` says by which rule),
``pending`` (to render), ``done`` (its samples are in ``shard``), ``failed`` (``reason`` says
why; retried by a re-run up to a limit). The file is rewritten whole, atomically
(temporary file + rename), so a reader never sees half a manifest.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from common.atomic import atomic_path
from data_pipeline.sources import ObjectRecord

STATUSES = ("filtered", "pending", "done", "failed")

SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("source", pa.string()),
        ("path", pa.string()),
        ("size", pa.int64()),
        ("sha256", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("attempts", pa.int32()),
        ("shard", pa.string()),
        ("render_seconds", pa.float64()),
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("updated_at", pa.timestamp("us", tz="UTC")),
        ("selection", pa.string()),
    ]
)
# Columns that manifests of earlier versions lack: read as null.
OPTIONAL_COLUMNS = ("selection",)


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass
class ManifestRow:
    """One object's state in the job."""

    uid: str
    source: str
    path: str
    size: int | None = None
    sha256: str | None = None
    status: str = "pending"
    reason: str | None = None
    attempts: int = 0
    shard: str | None = None
    render_seconds: float | None = None
    created_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None
    selection: str | None = None  # the list and/or rules that chose the object (ObjectRecord)

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"object {self.uid}: unknown status {self.status!r}")
        stamp = now()
        self.created_at = self.created_at or stamp
        self.updated_at = self.updated_at or stamp

    def update(self, **changes) -> None:
        """Set fields and the ``updated_at`` time."""
        for name, value in changes.items():
            setattr(self, name, value)
        if self.status not in STATUSES:
            raise ValueError(f"object {self.uid}: unknown status {self.status!r}")
        self.updated_at = now()

    @classmethod
    def from_record(cls, record: ObjectRecord, status="pending", reason=None) -> "ManifestRow":
        return cls(
            uid=record.uid, source=record.source, path=str(record.path_or_url),
            size=record.size, sha256=record.sha256, status=status, reason=reason,
            selection=record.selection,
        )


def read_manifest(path: str | Path) -> dict[str, ManifestRow]:
    """Rows by uid of a local manifest file; an absent file is an empty manifest.

    Raises:
        ValueError naming the file when it is not a manifest (unreadable, columns missing).
    """
    path = Path(path)
    if not path.exists():
        return {}
    return parse_manifest(path.read_bytes(), str(path))


def parse_manifest(data: bytes, where: str) -> dict[str, ManifestRow]:
    """Rows by uid of a manifest's bytes; ``where`` (its path or URL) names it in errors."""
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as error:
        raise ValueError(f"{where}: not a readable Parquet manifest ({error})") from None
    missing = set(SCHEMA.names) - set(table.column_names)
    if missing - set(OPTIONAL_COLUMNS):
        raise ValueError(f"{where}: manifest lacks columns {sorted(missing - set(OPTIONAL_COLUMNS))}")
    columns = [
        [None] * table.num_rows if name in missing
        else _timestamps(table.column(name)) if pa.types.is_timestamp(SCHEMA.field(name).type)
        else table.column(name).to_pylist()
        for name in SCHEMA.names
    ]
    rows = (ManifestRow(*values) for values in zip(*columns))  # fields are in SCHEMA's order
    return {row.uid: row for row in rows}


def _timestamps(column: pa.ChunkedArray) -> list:
    """UTC datetimes of a timestamp column, through int64 microseconds (several times faster
    than pyarrow's own conversion to Python datetimes)."""
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    micros = column.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_pylist()
    return [None if us is None else epoch + dt.timedelta(microseconds=us) for us in micros]


def manifest_bytes(rows: Iterable[ManifestRow]) -> bytes:
    """All rows (sorted by uid) as a Parquet file's bytes."""
    ordered = sorted(rows, key=lambda r: r.uid)
    columns = {name: [getattr(row, name) for row in ordered] for name in SCHEMA.names}
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pydict(columns, schema=SCHEMA), buffer)
    return buffer.getvalue().to_pybytes()


def write_manifest(path: str | Path, rows: Iterable[ManifestRow]) -> None:
    """Write all rows (sorted by uid) into a local file atomically: temporary file, fsync, rename."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(manifest_bytes(rows))
        handle.flush()
        os.fsync(handle.fileno())


def merge_records(
    rows: dict[str, ManifestRow],
    records: Iterable[ObjectRecord],
    filtered: Iterable[tuple[ObjectRecord, str]] = (),
) -> dict[str, ManifestRow]:
    """Add this run's objects to an existing manifest (resume).

    New objects become ``pending``; rows already ``done`` or ``failed`` keep their state, unless
    the object's file changed (other sha256), which makes it ``pending`` again with its attempts
    reset. A row takes the record's ``selection`` when it has one (what chose it this run).
    Filtered objects are recorded as ``filtered`` with the rule's reason (a ``done`` row stays
    done).

    Returns:
        the updated rows (the same dict).
    """
    for record in records:
        row = rows.get(record.uid)
        if row is None or row.status == "filtered":
            rows[record.uid] = ManifestRow.from_record(record)
            continue
        if record.selection and record.selection != row.selection:
            row.update(selection=record.selection)
        if record.sha256 and row.sha256 and record.sha256 != row.sha256:
            row.update(
                path=str(record.path_or_url), size=record.size, sha256=record.sha256,
                status="pending", reason="file changed since the last run", attempts=0,
                shard=None, render_seconds=None,
            )
    for record, reason in filtered:
        row = rows.get(record.uid)
        if row is None or row.status != "done":
            rows[record.uid] = ManifestRow.from_record(record, status="filtered", reason=reason)
    return rows


def status_counts(rows: Iterable[ManifestRow]) -> dict[str, int]:
    counts = dict.fromkeys(STATUSES, 0)
    for row in rows:
        counts[row.status] += 1
    return counts
