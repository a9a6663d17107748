"""The bulk jobs (``embedding-cluster embed`` and ``score``): files in, parquet parts out, resumable.

``run_job`` is their one path: the results of the job's ``map_batches`` stages
(``embed_dataset``, ``bulk_score.score_dataset``) stream back and are written
as parquet parts, each first to a temporary name and then renamed, so a part
that exists is complete. ``resume`` keeps the parts of an earlier run and runs
only the rows whose ids they do not hold. Before any work, one pass over the
input refuses columns the job would write itself and, with an id column, ids
that are missing or not unique (resume could not tell those rows apart).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data import Dataset
from tqdm import tqdm

from cluster.bulk import (
    BULK_WEIGHTS_USER,
    CHUNK_INDEX,
    ERROR_COLUMN,
    INPUT_ERROR_COLUMN,
    TOKENS_COLUMN,
    BulkLevel,
    Chunking,
    check_input_columns,
    embed_dataset,
)
from cluster.sources import IO_TASK_CPUS, InputProfile, expand_inputs, profile_input, read_inputs
from deployments.settings import LimitsSettings, ModelConfig
from deployments.weight_store import release_weights

logger = logging.getLogger(__name__)

#: The file a job keeps in its output folder: the parts it wrote, in order. ``--resume`` reads and
#: removes only those; a folder with anything in it and without this file is not the job's own.
MANIFEST = ".embedding-cluster-parts.json"


@dataclass
class BulkSummary:
    """What a bulk job did; the counts cover earlier, resumed runs too. Rows are input rows
    (documents); with chunking, ``chunks`` counts the chunks embedded."""

    rows_in: int = 0
    rows_out: int = 0
    rows_with_error: int = 0
    tokens: int | None = None
    seconds: float = 0.0
    rows_resumed: int = 0
    chunks: int | None = None

    def line(self) -> str:
        return (f"rows in: {self.rows_in}, rows out: {self.rows_out}, rows with an error: {self.rows_with_error}, "
                + (f"chunks: {self.chunks}, " if self.chunks is not None else "")
                + (f"tokens: {self.tokens}, " if self.tokens is not None else "")
                + f"seconds: {self.seconds:.1f}"
                + (f" ({self.rows_resumed} rows kept from an earlier run)" if self.rows_resumed else ""))

    def add(self, table: pa.Table) -> None:
        documents = _document_starts(table)
        self.rows_out += len(documents)
        self.rows_with_error += table.num_rows - table.column(ERROR_COLUMN).null_count
        if TOKENS_COLUMN in table.column_names:
            self.tokens = (self.tokens or 0) + int(pc.sum(table.column(TOKENS_COLUMN)).as_py() or 0)
        if CHUNK_INDEX in table.column_names:
            self.chunks = (self.chunks or 0) + table.column(ERROR_COLUMN).null_count


def _document_starts(table: pa.Table) -> np.ndarray:
    """Rows where a document starts: every row, or with chunking the rows of its first chunk."""
    if CHUNK_INDEX not in table.column_names:
        return np.arange(table.num_rows)
    return np.flatnonzero(table.column(CHUNK_INDEX).to_numpy(zero_copy_only=False) == 0)


def _read_manifest(output: Path) -> list[str] | None:
    """The parts the job wrote into ``output`` (``None``: the folder holds no manifest)."""
    path = output / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def _write_manifest(output: Path, parts: list[str]) -> None:
    temporary = output / f"{MANIFEST}.tmp"
    temporary.write_text(json.dumps(parts))
    temporary.replace(output / MANIFEST)


def _claim_output(output: Path, resume: bool) -> None:
    """Check that ``output`` may be the job's (made if missing; the manifest comes with the first part):
    a folder the job wrote is refused without ``resume`` (its results would be mixed); any other
    non-empty folder is refused (it is someone else's: nothing in it is read or removed)."""
    output.mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(output)
    if manifest is None:
        if any(output.iterdir()):
            raise FileExistsError(f"{output} is not empty and no embedding-cluster job wrote it (it has no "
                                  f"{MANIFEST}); choose an empty folder")
    elif manifest and not resume:
        raise FileExistsError(f"{output} already holds results; pass --resume to finish that run, "
                              "or choose an empty folder")


def _collect_finished_parts(output: Path, id_column: str, summary: BulkSummary) -> pa.Array:
    """Ids held by the complete parts the manifest lists; unreadable parts of its and the job's own
    temporary files are removed (nothing else in the folder is touched)."""
    for leftover in output.glob(".part-*.parquet.tmp"):
        leftover.unlink()
    ids, kept = [], []
    for name in _read_manifest(output) or []:
        part = output / name
        try:
            names = pq.read_schema(part).names
            table = pq.read_table(part, columns=[id_column, ERROR_COLUMN,
                                                 *(c for c in (TOKENS_COLUMN, CHUNK_INDEX) if c in names)])
        except Exception as error:  # a part cut short by a crash: redo its rows
            logger.warning("removing unreadable part %s (%s)", part.name, type(error).__name__)
            part.unlink(missing_ok=True)
            continue
        summary.add(table)
        kept.append(name)
        ids.append(table.column(id_column).combine_chunks())
    if (output / MANIFEST).exists():
        _write_manifest(output, kept)
    summary.rows_resumed = summary.rows_out
    return pa.concat_arrays(ids) if ids else pa.array([])


def _check_ids(profile: InputProfile, id_column: str) -> None:
    """Refuse null or repeated ids: ``resume`` keeps the rows whose ids the finished parts hold, so a
    row without an id, or one sharing its id, would be lost (or embedded twice) on every resume."""
    advice = ("--resume tells the rows already done by their id, so every row needs an id of its own: fix the "
              "input, or run without --id-column and --resume (every input column is kept anyway)")
    if profile.null_ids:
        raise ValueError(f"{profile.null_ids} row{'s' * (profile.null_ids > 1)} of the input "
                         f"{'have' if profile.null_ids > 1 else 'has'} no {id_column!r} (e.g. the row "
                         f"{profile.null_example}); {advice}")
    counts = pc.value_counts(profile.ids)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(repeated):
        example = repeated[0].as_py()
        extra = pc.sum(repeated.field("counts")).as_py() - len(repeated)
        raise ValueError(f"{len(repeated)} {id_column!r} value{'s' * (len(repeated) > 1)} of the input "
                         f"{'occur' if len(repeated) > 1 else 'occurs'} in more than one row ({extra} duplicate "
                         f"row{'s' * (extra > 1)}; e.g. {example['values']!r} in {example['counts']} rows); {advice}")


def _drop_done(table: pa.Table, id_column: str, done_ref) -> pa.Table:
    done = ray.get(done_ref)
    if len(done) == 0:
        return table
    return table.filter(pc.invert(pc.is_in(table.column(id_column), value_set=done.cast(table.column(id_column).type))))


def _part_end(pending: pa.Table, rows_per_part: int) -> int | None:
    """How many rows of ``pending`` make the next part: ``rows_per_part``, moved back to where a
    document starts (forward, for a document with more chunks than that), so that a part only holds
    whole documents; ``None`` while ``pending`` holds too few rows to tell."""
    if pending.num_rows < rows_per_part:
        return None
    if CHUNK_INDEX not in pending.column_names:
        return rows_per_part
    starts = _document_starts(pending)
    before = starts[(starts > 0) & (starts <= rows_per_part)]
    if len(before):
        return int(before[-1])
    after = starts[starts > rows_per_part]
    return int(after[0]) if len(after) else None


def _write_part(output: Path, run_id: str, number: int, table: pa.Table, summary: BulkSummary) -> None:
    final = output / f"part-{run_id}-{number:05d}.parquet"
    temporary = output / f".{final.name}.tmp"
    pq.write_table(table, temporary)
    temporary.replace(final)
    _write_manifest(output, [*(_read_manifest(output) or []), final.name])
    summary.add(table)


def run_job(
    source: str,
    output: str | Path,
    transform: Callable[[Dataset], Dataset],
    *,
    text_columns: str | Mapping[str, str],
    check_columns: Callable[[list[str]], None],
    id_column: str | None = None,
    resume: bool = False,
    rows_per_part: int = 10_000,
    batch_size: int = 256,
    show_progress: bool = True,
    description: str = "embedding",
) -> BulkSummary:
    """Every row of ``source`` through ``transform`` (the job's ``map_batches`` stages: one output
    row per input row, or with chunks whole documents of rows), written as parquet parts under
    ``output``; Ray must be initialized. ``text_columns`` are read as strings (see
    ``sources.text_labels``); ``check_columns`` refuses, with a ``ValueError`` before any work, an
    input column the job writes itself, and with ``id_column`` (or ``resume``, whose default id
    column is ``id``) null or repeated ids are refused too. ``description`` labels the progress bar."""
    started = time.monotonic()
    output = Path(output)
    _claim_output(output, resume)
    summary = BulkSummary()
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds: Dataset = read_inputs(expand_inputs(source), text_columns)
    if resume:
        id_column = id_column or "id"
    profile = profile_input(ds, id_column)
    summary.rows_in = profile.rows
    check_columns(profile.columns)
    if id_column is not None:
        if id_column not in profile.columns:
            raise KeyError(f"--resume needs an id column; the input has no {id_column!r} (use --id-column)"
                           if resume else f"the input has no id column {id_column!r}; it has "
                           f"{[name for name in profile.columns if name != INPUT_ERROR_COLUMN]}")
        _check_ids(profile, id_column)
    if resume:
        done = _collect_finished_parts(output, id_column, summary)
        ds = ds.map_batches(_drop_done, fn_kwargs={"id_column": id_column, "done_ref": ray.put(done)},
                            batch_format="pyarrow", num_cpus=IO_TASK_CPUS)
    run_id = uuid.uuid4().hex[:8]
    results = transform(ds)
    pending: pa.Table | None = None
    parts = 0
    with tqdm(total=summary.rows_in, initial=summary.rows_out, unit="rows", disable=not show_progress,
              desc=description, dynamic_ncols=True) as progress:
        for table in results.iter_batches(batch_size=min(batch_size, rows_per_part), batch_format="pyarrow"):
            pending = table if pending is None else pa.concat_tables([pending, table], promote_options="permissive")
            progress.update(len(_document_starts(table)))
            while (cut := _part_end(pending, rows_per_part)) is not None:
                _write_part(output, run_id, parts, pending.slice(0, cut), summary)
                pending = pending.slice(cut)
                parts += 1
        if pending is not None and pending.num_rows:
            _write_part(output, run_id, parts, pending, summary)
    summary.seconds = time.monotonic() - started
    return summary


def run_bulk_job(
    source: str,
    output: str | Path,
    model: ModelConfig,
    *,
    text_column: str = "text",
    id_column: str | None = None,
    level: BulkLevel = "pooled",
    truncate: bool = False,
    prompt_name: str | None = None,
    prompt: str | None = None,
    chunks: Chunking | None = None,
    precision: str = "float32",
    resume: bool = False,
    rows_per_part: int = 10_000,
    batch_size: int = 256,
    encode_actors: int | None = None,
    show_progress: bool = True,
    limits: LimitsSettings | None = None,
) -> BulkSummary:
    """Embed every row of ``source`` into parquet parts under ``output`` (``run_job``); each row within
    the serving path's ``limits`` (``embed_dataset``).
    ``prompt_name`` / ``prompt`` choose the prompt as on ``/embed``; with ``chunks`` each document
    gives one row per chunk, and a part always holds whole documents (so ``resume`` works per id);
    ``precision`` quantizes the vectors as ``embed_dataset`` does. Raises ``ValueError`` before any embedding for an input column the job writes itself, and with
    ``id_column`` (or ``resume``, whose default id column is ``id``) for null or repeated ids."""
    model = model.resolved()
    model.prompt(prompt_name, prompt)
    weights_user = BULK_WEIGHTS_USER.format(uuid.uuid4().hex[:8])

    def embed(ds: Dataset) -> Dataset:
        return embed_dataset(ds, model, text_column=text_column, level=level, truncate=truncate,
                             prompt_name=prompt_name, prompt=prompt, chunks=chunks, precision=precision,
                             weights_user=weights_user, batch_size=batch_size, encode_actors=encode_actors,
                             limits=limits)

    try:
        return run_job(source, output, embed, text_columns=text_column,
                       check_columns=lambda columns: check_input_columns(columns, chunks=chunks),
                       id_column=id_column, resume=resume, rows_per_part=rows_per_part, batch_size=batch_size,
                       show_progress=show_progress, description="embedding")
    finally:
        release_weights(weights_user)
