"""Export a round: its committed trees -> ``sft`` / ``ppm_pairs`` / ``steps`` / ``trees`` parquet files.

    result = export_round(RunDir("runs/demo"), 2, PromptBuilder(tok).build)   # -> runs/demo/round_2/*.parquet
    result.rows   # {'sft': 74, 'ppm_pairs': 301, 'steps': 912, 'trees': 15044}

Streaming: the round's shards are read one record batch at a time and one tree at a time (``TreeStore.
iter_trees``); each tree is rebuilt (``mcts.serialize``), its records extracted (``mcts.extract``), their
prompts rendered with ``prompt_fn(question, prefix)`` and the rows handed to one ``ParquetWriter`` per table,
which writes a row group whenever ``row_group_rows`` are buffered. Memory is one tree plus one row group per
table, whatever the number of trees.

Behaviours (``mcts.behaviours``): ``sft`` rows carry their trajectory's, ``trees`` rows their step's (a column the
stored node table does not have). ``behaviours.json`` beside the files counts them per graded trajectory - every
path root -> terminal graded 'correct' or 'wrong' - for the report and ``pipeline info`` (format in
``rounds.behaviour_report``). Round 1 also gets the priming file's rows (``pipeline.priming``) when configured.

Files are written under temporary names and renamed only when all four are complete, so a crash mid-export
leaves the previous export (or none) in place, never a truncated file. Schemas are ``data.schemas``'; every
file loads with ``datasets.load_dataset("parquet", data_files=...)`` and ``sft`` / ``ppm_pairs`` feed TRL's
``SFTTrainer`` / ``RewardTrainer`` as they are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.storage import EXPORT_TABLES, RunDir, StorageError, TreeStore, atomic_path, atomic_write_json

if TYPE_CHECKING:
    import pyarrow as pa

    from mcts.config import ExtractConfig

PromptFn = Callable[[str, str], str]  # (question, rendered step prefix) -> full prompt text


@dataclass(frozen=True)
class ExportConfig:
    # Rows buffered per table before they are written as one parquet row group: larger groups compress and
    # read better, smaller ones bound the export's memory.
    row_group_rows: int = 2048
    read_batch_rows: int = 4096  # node-table rows read from a shard at a time
    tables: tuple[str, ...] = EXPORT_TABLES  # which files to write
    compression: str = "zstd"

    def __post_init__(self) -> None:
        if self.row_group_rows < 1:
            raise ValueError(f"row_group_rows={self.row_group_rows}: must be >= 1")
        if self.read_batch_rows < 1:
            raise ValueError(f"read_batch_rows={self.read_batch_rows}: must be >= 1")
        unknown = [t for t in self.tables if t not in EXPORT_TABLES]
        if unknown or not self.tables or len(set(self.tables)) != len(self.tables):
            raise ValueError(f"tables={list(self.tables)}: must be distinct names among {', '.join(EXPORT_TABLES)}")
        if self.compression not in ("zstd", "snappy", "gzip", "none"):
            raise ValueError(f"compression={self.compression!r}: must be one of zstd, snappy, gzip, none")


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    paths: dict[str, Path]  # table -> file written
    rows: dict[str, int]  # table -> rows written
    problems: int  # trees exported
    solved: int  # trees with a correct terminal (they give SFT rows when sft_top_n > 0)
    summary: dict[str, Any] = field(default_factory=dict)  # JSON-able, for the export phase marker


class _Sink:
    """One table's ``ParquetWriter`` with a row buffer; rows are checked against the schema's columns."""

    def __init__(self, path: Path, schema: pa.Schema, cfg: ExportConfig):
        import pyarrow.parquet as pq

        self.name = schema.metadata.get(b"open_rstar.table", b"?").decode() if schema.metadata else "?"
        self.schema = schema
        self.cfg = cfg
        self.writer = pq.ParquetWriter(path, schema, compression=cfg.compression)
        self.rows: list[dict] = []
        self.tables: list[pa.Table] = []  # node-table slices (the trees table arrives as Arrow already)
        self.buffered = 0
        self.written = 0
        self._names = set(schema.names)

    def add_row(self, row: dict) -> None:
        if row.keys() != self._names:
            missing, extra = sorted(self._names - row.keys()), sorted(row.keys() - self._names)
            raise StorageError(f"export {self.name}: row of problem {row.get('problem_id')!r} does not match "
                               f"data.schemas (missing {missing}, unexpected {extra})")
        self.rows.append(row)
        self._added(1)

    def add_table(self, table: pa.Table) -> None:
        self.tables.append(table.select(self.schema.names).cast(self.schema))
        self._added(table.num_rows)

    def _added(self, n: int) -> None:
        self.buffered += n
        if self.buffered >= self.cfg.row_group_rows:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa

        if not self.buffered:
            return
        parts = list(self.tables)
        if self.rows:
            parts.append(pa.Table.from_pylist(self.rows, schema=self.schema))
        table = pa.concat_tables(parts).combine_chunks()
        self.writer.write_table(table, row_group_size=max(self.cfg.row_group_rows, table.num_rows))
        self.written += table.num_rows
        self.rows, self.tables, self.buffered = [], [], 0

    def close(self) -> None:
        self.flush()
        self.writer.close()


BEHAVIOURS_FILE = "behaviours.json"


def _behaviour_column(table: pa.Table, node_tags: dict[int, list[str]], failure_tags: dict[int, list[str]]):
    import pyarrow as pa

    from data.schemas import BEHAVIOURS_FIELD

    tags = [node_tags[i] if rec == "node" else failure_tags[i]
            for rec, i in zip(table.column("record").to_pylist(), table.column("id").to_pylist(), strict=True)]
    return table.append_column(BEHAVIOURS_FIELD, pa.array(tags, BEHAVIOURS_FIELD.type))


def _count_trajectories(tree, node_tags: dict[int, list[str]], counts: dict) -> None:
    """Add each graded trajectory's behaviours (the union of its steps') to ``counts`` (behaviours.json)."""
    for leaf in tree.terminals():
        if leaf.verdict not in ("correct", "wrong"):
            continue
        shown = {b for n in tree.path(leaf.id) for b in node_tags[n.id]}
        counts["trajectories"][leaf.verdict] += 1
        for b in shown:
            counts["with_behaviour"][leaf.verdict][b] += 1


def export_trees(store: TreeStore, out_dir: str | Path, prompt_fn: PromptFn,
                 extract_config: ExtractConfig | None = None, config: ExportConfig = ExportConfig(),
                 extra_sft: list[dict] | None = None) -> ExportResult:
    """Export every committed tree of ``store`` into ``out_dir/<table>.parquet`` (see module doc); ``extra_sft``
    rows (priming) are written to ``sft`` after the trees' rows."""
    from data.schemas import SCHEMAS
    from mcts.behaviours import BEHAVIOURS, tree_row_behaviours
    from mcts.config import ExtractConfig
    from mcts.extract import export_row, extract
    from mcts.serialize import tree_from_rows

    xcfg = extract_config if extract_config is not None else ExtractConfig()
    out = Path(out_dir)
    if not store.shards():
        raise StorageError(f"{store.dir}: no committed trees to export (no {store.manifest_path.name} or it lists "
                           f"no shards); run the round's rollouts first")
    paths = {t: out / f"{t}.parquet" for t in config.tables}
    prompts: dict[tuple[str, str], str] = {}  # per tree: SFT rows, final pairs and steps share one prompt

    def prompt(question: str, prefix: str) -> str:
        key = (question, prefix)
        if key not in prompts:
            prompts[key] = prompt_fn(question, prefix)
        return prompts[key]

    problems = solved = 0
    counts = {"tagger": "rules", "trajectories": {"correct": 0, "wrong": 0},
              "with_behaviour": {v: dict.fromkeys(BEHAVIOURS, 0) for v in ("correct", "wrong")}}
    with contextlib.ExitStack() as stack:
        # All temp files are renamed when the stack unwinds cleanly, and all are removed on an exception.
        tmps = {t: stack.enter_context(atomic_path(p)) for t, p in paths.items()}
        sinks: dict[str, _Sink] = {}
        try:
            for t in config.tables:
                sinks[t] = _Sink(tmps[t], SCHEMAS[t], config)
            for table in store.iter_trees(batch_size=config.read_batch_rows):
                tree = tree_from_rows(table.to_pylist())
                ex = extract(tree, xcfg)
                problems += 1
                solved += any(n.verdict == "correct" for n in tree.terminals())
                prompts.clear()
                for name, records in (("sft", ex.sft), ("ppm_pairs", ex.pairs), ("steps", ex.steps)):
                    if name in sinks:
                        for rec in records:
                            sinks[name].add_row(export_row(rec, prompt(rec.question, rec.prefix)))
                node_tags, failure_tags = tree_row_behaviours(tree)
                _count_trajectories(tree, node_tags, counts)
                if "trees" in sinks:
                    by_id = {f.id: t for f, t in zip(tree.failures, failure_tags, strict=True)}
                    sinks["trees"].add_table(_behaviour_column(table, node_tags, by_id))
            if "sft" in sinks:
                for row in extra_sft or ():
                    sinks["sft"].add_row(row)
        except BaseException:
            for sink in sinks.values():
                sink.writer.close()  # release the file; atomic_path then removes it, the old export stays
            raise
        for sink in sinks.values():
            sink.close()
        rows = {t: s.written for t, s in sinks.items()}
    atomic_write_json(out / BEHAVIOURS_FILE, counts)
    summary = {"problems": problems, "solved": solved, "rows": rows, "out_dir": str(out), "behaviours": counts}
    return ExportResult(out, paths, rows, problems, solved, summary)


def export_round(run: RunDir | str | Path, round: int, prompt_fn: PromptFn, out_dir: str | Path | None = None,
                 extract_config: ExtractConfig | None = None, config: ExportConfig = ExportConfig()) -> ExportResult:
    """Export ``round`` of ``run`` into ``out_dir`` (default: the round directory, the run's own copy)."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    target = Path(out_dir) if out_dir is not None else run.round_dir(round)
    primed = None
    if round == 1 and extract_config is not None and extract_config.priming_file:
        from pipeline.priming import load_priming

        primed = load_priming(extract_config.priming_file, extract_config.priming_behaviours, prompt_fn, round)
    result = export_trees(run.trees(round), target, prompt_fn, extract_config, config,
                          extra_sft=primed.rows if primed else None)
    if primed is not None:
        result.summary["priming"] = primed.summary()
    return result


def load_export(path: str | Path | Sequence[str | Path]):
    """A ``datasets.Dataset`` of one export file (or several files of the same table), the documented way."""
    import datasets

    files = [str(p) for p in ([path] if isinstance(path, (str, Path)) else path)]
    return datasets.load_dataset("parquet", data_files=files, split="train")


__all__ = ["ExportConfig", "ExportResult", "PromptFn", "export_round", "export_trees", "load_export"]
