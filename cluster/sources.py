"""Reading the bulk job's INPUT: JSON Lines, parquet, CSV or text files, a folder or a glob of them."""

from __future__ import annotations

import glob
from dataclasses import dataclass
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import ray
from ray.data import Dataset

from cluster.bulk import INPUT_ERROR_COLUMN
from deployments.validation import text_problem

#: CPUs a read or parse task asks for: light I/O work that must not wait behind the actor pools.
IO_TASK_CPUS = 0.25

FORMATS = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".parquet": "parquet", ".csv": "csv",
           ".txt": "text"}


def expand_inputs(source: str) -> list[Path]:
    """The input files: ``source`` itself, every supported file in a folder, or a glob's matches."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FORMATS)
    elif path.is_file():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
    if not files:
        raise FileNotFoundError(f"no input files at {source!r} (looked for {', '.join(sorted(FORMATS))})")
    unknown = [str(p) for p in files if p.suffix.lower() not in FORMATS]
    if unknown:
        raise ValueError(f"unsupported input format: {unknown[:3]}; use {', '.join(sorted(FORMATS))}")
    return files


def text_labels(text_columns: str | Mapping[str, str]) -> dict[str, str]:
    """The text columns a job reads, each with the word its messages use: one column is ``text``
    (``embed``); a job of several names them (``score``: ``{"query": "query", "text": "document"}``)."""
    return {text_columns: "text"} if isinstance(text_columns, str) else dict(text_columns)


def parse_json_lines(table: pa.Table, text_columns: str | Mapping[str, str]) -> pa.Table:
    """``map_batches`` function: lines of JSON objects -> columns.

    A line that is not a JSON object, or whose text (any of the ``text_columns``, see
    ``text_labels``) is not a string, becomes a row with that text null and the reason in
    ``INPUT_ERROR_COLUMN`` (the job's first stage makes it the row's ``error``), so that it is
    counted, not lost. Every field of the objects is kept (but one named ``INPUT_ERROR_COLUMN``,
    which is the parser's).
    """
    labels = text_labels(text_columns)
    records, errors = [], []
    for line in table.column("text").to_pylist():
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            records.append({})
            errors.append("line is not a JSON object")
            continue
        problem = None
        for column, label in labels.items():
            text = record.get(column)
            if text is not None and not isinstance(text, str):
                record[column] = None
                problem = problem or f"{label} {text_problem(text)}"
        errors.append(problem)
        records.append(record)
    keys = list(dict.fromkeys(k for r in records for k in r if k != INPUT_ERROR_COLUMN and k not in labels))
    columns = {key: _column([r.get(key) for r in records]) for key in keys}
    for column in labels:
        columns[column] = pa.array([r.get(column) for r in records], type=pa.string())
    columns[INPUT_ERROR_COLUMN] = pa.array(errors, type=pa.string())
    return pa.table(columns)


def _column(values: list) -> pa.Array:
    """An Arrow column of the values, or of their JSON text where their types differ."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else orjson.dumps(v).decode() for v in values], type=pa.string())


def read_inputs(files: list[Path], text_columns: str | Mapping[str, str] = "text") -> Dataset:
    """One dataset over every input file (formats may be mixed); ``text_columns`` as in
    ``text_labels`` (a ``.txt`` file's lines are the one text column)."""
    labels = text_labels(text_columns)
    by_format: dict[str, list[str]] = {}
    for path in files:
        by_format.setdefault(FORMATS[path.suffix.lower()], []).append(str(path))
    datasets = []
    for kind, paths in by_format.items():
        if kind == "json":
            ds = ray.data.read_text(paths, drop_empty_lines=True, num_cpus=IO_TASK_CPUS).map_batches(
                parse_json_lines, fn_kwargs={"text_columns": labels}, batch_format="pyarrow",
                num_cpus=IO_TASK_CPUS)
        elif kind == "parquet":
            ds = ray.data.read_parquet(paths, num_cpus=IO_TASK_CPUS)
        elif kind == "csv":
            ds = ray.data.read_csv(paths, num_cpus=IO_TASK_CPUS, convert_options=pacsv.ConvertOptions(
                column_types=dict.fromkeys(labels, pa.string()), strings_can_be_null=False))
        else:
            ds = ray.data.read_text(paths, drop_empty_lines=False, num_cpus=IO_TASK_CPUS)
            if len(labels) == 1 and (only := next(iter(labels))) != "text":
                ds = ds.rename_columns({"text": only})
        names = ds.schema().names
        for column, label in labels.items():
            if column not in names:
                raise KeyError(f"the input has no column {column!r} in {', '.join(paths[:3])}: it has {names} "
                               f"(use --{label}-column)")
        datasets.append(ds)
    return datasets[0] if len(datasets) == 1 else datasets[0].union(*datasets[1:])


@dataclass
class InputProfile:
    """What one pass over the input found: its rows, every column any block has (JSON Lines
    blocks may differ), and with an id column each non-null id as text, how many rows have none
    and one of those rows."""

    rows: int
    columns: list[str]
    ids: pa.Array
    null_ids: int
    null_example: str | None


def _short(value: Any) -> Any:
    """A value for a message: long strings cut to 40 characters."""
    return value if not isinstance(value, str) or len(value) <= 40 else value[:40] + "…"


def _id_text(ids: pa.Array) -> pa.Array:
    """Ids as strings, so that blocks whose ids came out as different types still compare."""
    try:
        return pc.cast(ids, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return pa.array([repr(value) for value in ids.to_pylist()], type=pa.string())


def _row_example(row: dict[str, Any]) -> str:
    """One row for a message: its non-null fields, long strings cut, and why it could not be read."""
    problem = row.pop(INPUT_ERROR_COLUMN, None)
    example = repr({key: _short(value) for key, value in row.items() if value is not None})
    return example + (f" ({problem})" if problem else "")


def profile_input(ds: Dataset, id_column: str | None = None) -> InputProfile:
    """One streaming pass over ``ds``, before any embedding: what ``InputProfile`` holds. The blocks
    come to this process rather than to a map task of this module's own, which every fresh worker
    would first have to import (torch with it) before doing next to nothing."""
    rows, nulls, columns, ids, example = 0, 0, {}, [], None
    for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        rows += block.num_rows
        columns.update(dict.fromkeys(block.column_names))
        if id_column is None:
            continue
        values = (block.column(id_column).combine_chunks() if id_column in block.column_names
                  else pa.nulls(block.num_rows))
        if values.null_count:
            nulls += values.null_count
            if example is None:
                example = _row_example(block.filter(values.is_null()).slice(0, 1).to_pylist()[0])
        ids.append(_id_text(values.drop_null()))
    return InputProfile(rows=rows, columns=list(columns), null_ids=nulls, null_example=example,
                        ids=pa.concat_arrays(ids) if ids else pa.array([], type=pa.string()))
