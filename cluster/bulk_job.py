"""The ``embedding-cluster embed`` job: files in, parquet parts out, resumable.

Results stream back from ``embed_dataset`` and are written as parquet parts,
each first to a temporary name and then renamed, so a part that exists is
complete. ``resume`` keeps the parts of an earlier run and embeds only the
rows whose ids they do not hold.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data import Dataset
from tqdm import tqdm

from cluster.bulk import ERROR_COLUMN, TOKENS_COLUMN, BulkLevel, embed_dataset
from cluster.sources import IO_TASK_CPUS, expand_inputs, read_inputs
from deployments.settings import ModelConfig

logger = logging.getLogger(__name__)

PART_GLOB = "part-*.parquet"


@dataclass
class BulkSummary:
    """What a bulk job did; the counts cover earlier, resumed runs too."""

    rows_in: int = 0
    rows_out: int = 0
    rows_with_error: int = 0
    tokens: int = 0
    seconds: float = 0.0
    rows_resumed: int = 0

    def line(self) -> str:
        return (f"rows in: {self.rows_in}, rows out: {self.rows_out}, rows with an error: {self.rows_with_error}, "
                f"tokens: {self.tokens}, seconds: {self.seconds:.1f}"
                + (f" ({self.rows_resumed} rows kept from an earlier run)" if self.rows_resumed else ""))

    def add(self, table: pa.Table) -> None:
        self.rows_out += table.num_rows
        self.rows_with_error += table.num_rows - table.column(ERROR_COLUMN).null_count
        self.tokens += int(pc.sum(table.column(TOKENS_COLUMN)).as_py() or 0)


def _collect_finished_parts(output: Path, id_column: str, summary: BulkSummary) -> pa.Array:
    """Ids held by the complete parts in ``output``; unreadable parts and temporary files are removed."""
    for leftover in output.glob(".part-*.tmp"):
        leftover.unlink()
    ids = []
    for part in sorted(output.glob(PART_GLOB)):
        try:
            table = pq.read_table(part, columns=[id_column, ERROR_COLUMN, TOKENS_COLUMN])
        except Exception as error:  # a part cut short by a crash: redo its rows
            logger.warning("removing unreadable part %s (%s)", part.name, type(error).__name__)
            part.unlink()
            continue
        summary.add(table)
        ids.append(table.column(id_column).combine_chunks())
    summary.rows_resumed = summary.rows_out
    return pa.concat_arrays(ids) if ids else pa.array([])


def _drop_done(table: pa.Table, id_column: str, done_ref) -> pa.Table:
    done = ray.get(done_ref)
    if len(done) == 0:
        return table
    return table.filter(pc.invert(pc.is_in(table.column(id_column), value_set=done.cast(table.column(id_column).type))))


def _write_part(output: Path, run_id: str, number: int, table: pa.Table, summary: BulkSummary) -> None:
    final = output / f"part-{run_id}-{number:05d}.parquet"
    temporary = output / f".{final.name}.tmp"
    pq.write_table(table, temporary)
    temporary.replace(final)
    summary.add(table)


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
    resume: bool = False,
    rows_per_part: int = 10_000,
    batch_size: int = 256,
    encode_actors: int | None = None,
    show_progress: bool = True,
) -> BulkSummary:
    """Embed every row of ``source`` into parquet parts under ``output`` (Ray must be initialized).
    ``prompt_name`` / ``prompt`` choose the prompt as on ``/embed``."""
    started = time.monotonic()
    model = model.resolved()
    model.prompt(prompt_name, prompt)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    summary = BulkSummary()
    if any(output.glob(PART_GLOB)) and not resume:
        raise FileExistsError(f"{output} already holds results; pass --resume to finish that run, "
                              "or choose an empty folder")
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds: Dataset = read_inputs(expand_inputs(source), text_column)
    summary.rows_in = ds.count()
    columns = ds.schema().names
    if resume:
        id_column = id_column or "id"
        if id_column not in columns:
            raise KeyError(f"--resume needs an id column; the input has no {id_column!r} (use --id-column)")
        done = _collect_finished_parts(output, id_column, summary)
        ds = ds.map_batches(_drop_done, fn_kwargs={"id_column": id_column, "done_ref": ray.put(done)},
                            batch_format="pyarrow", num_cpus=IO_TASK_CPUS)
    elif id_column is not None and id_column not in columns:
        raise KeyError(f"the input has no id column {id_column!r}; it has {columns}")
    embedded = embed_dataset(ds, model, text_column=text_column, level=level, truncate=truncate,
                             prompt_name=prompt_name, prompt=prompt, batch_size=batch_size,
                             encode_actors=encode_actors)
    run_id = uuid.uuid4().hex[:8]
    pending: pa.Table | None = None
    parts = 0
    with tqdm(total=summary.rows_in, initial=summary.rows_out, unit="rows", disable=not show_progress,
              desc="embedding", dynamic_ncols=True) as progress:
        for table in embedded.iter_batches(batch_size=min(batch_size, rows_per_part), batch_format="pyarrow"):
            pending = table if pending is None else pa.concat_tables([pending, table], promote_options="permissive")
            progress.update(table.num_rows)
            while pending.num_rows >= rows_per_part:
                _write_part(output, run_id, parts, pending.slice(0, rows_per_part), summary)
                pending = pending.slice(rows_per_part)
                parts += 1
        if pending is not None and pending.num_rows:
            _write_part(output, run_id, parts, pending, summary)
    summary.seconds = time.monotonic() - started
    return summary
