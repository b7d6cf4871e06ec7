"""The policy's SFT data for a round: the best correct trajectories found so far for each problem.

    rows = build_sft_data([run.export_path(r, "sft") for r in (1, 2, 3)], run.round_dir(3) / "sft_train.parquet",
                          top_n=2, prompt=lambda question: builder.build(question))

rStar-Math re-searches every problem each round, so each round's SFT set holds the best trajectories of every
problem solved so far. A small run cannot afford that: a round searches a few problems with a few rollouts, and
a problem solved in round 1 may not be solved again in round 2 (the issue measured 4/10 then 0/10). Without a
pool the round-2 policy trains on nothing, and a policy retrained from the base weights forgets what round 1
taught. The pool keeps, per problem, the ``top_n`` best correct trajectories over all rounds' ``sft`` exports.

Order (best first): mean step Q, then min step Q, then the later round (its Q-values come from a better policy
and PPM), then the completion text (so the choice is deterministic). A completion already kept for a problem is
not kept twice. ``prompt`` re-renders each row's prompt from its question, so the policy trains on the prompt it
will search with (for a small model: with the few-shot examples it still needs); None keeps the stored prompt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from data.atomic_io import atomic_path


def select_pool(rows: Sequence[dict[str, Any]], top_n: int) -> list[dict[str, Any]]:
    """Per ``problem_id``, the ``top_n`` best distinct completions (module doc); output sorted by problem id
    then rank, so the same rows in any order give the same list."""
    if top_n < 1:
        raise ValueError(f"top_n={top_n}: must be >= 1")
    by_problem: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_problem.setdefault(str(row["problem_id"]), []).append(row)
    out: list[dict[str, Any]] = []
    for pid in sorted(by_problem):
        ranked = sorted(by_problem[pid], key=lambda r: (-r["q_mean"], -r["q_min"], -r["round"], r["completion"]))
        seen: set[str] = set()
        for row in ranked:
            if row["completion"] in seen:
                continue
            seen.add(row["completion"])
            out.append(row)
            if len(seen) == top_n:
                break
    return out


def read_sft_rows(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Every row of the existing ``sft`` exports among ``paths`` (a round without a file adds nothing)."""
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = []
    for path in paths:
        if Path(path).is_file():
            rows += pq.read_table(path).to_pylist()
    return rows


def build_sft_data(paths: Sequence[str | Path], out_path: str | Path, top_n: int,
                   prompt: Callable[[str], str] | None = None) -> dict[str, Any]:
    """Write the pooled SFT rows of ``paths`` to ``out_path`` (the ``sft`` schema, atomically); returns
    {"rows", "problems", "digest"}. ``digest`` is a hash of the (prompt, completion) pairs: two rounds with the
    same digest train the same model, so the later one need not train again."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data.schemas import SFT_SCHEMA

    rows = select_pool(read_sft_rows(paths), top_n)
    if prompt is not None:
        rows = [dict(r, prompt=prompt(r["question"])) for r in rows]
    digest = hashlib.sha256()
    for r in rows:
        digest.update(r["prompt"].encode() + b"\x00" + r["completion"].encode() + b"\x01")
    with atomic_path(out_path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=SFT_SCHEMA), tmp)
    return {"rows": len(rows), "problems": len({r["problem_id"] for r in rows}), "digest": digest.hexdigest()[:16]}
