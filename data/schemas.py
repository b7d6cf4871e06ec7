"""The Arrow schemas of a round's four parquet exports, defined once.

Column names are the ones ``datasets`` and TRL already accept, so a file loads with
``datasets.load_dataset("parquet", data_files=...)`` and trains with no glue:

- ``sft``:       ``prompt`` / ``completion`` (TRL SFTTrainer, prompt-completion format; loss on the completion);
- ``ppm_pairs``: ``prompt`` / ``chosen`` / ``rejected`` (TRL RewardTrainer, explicit-prompt preference format);
- ``steps``:     ``prompt`` / ``completions`` / ``labels`` (TRL stepwise supervision; labels are the steps'
                 Q-values as float32 in [-1, 1], not booleans);
- ``trees``:     the node table of ``mcts.serialize``, one row per kept node or rejected candidate, plus
                 ``behaviours`` (the export adds it; the stored shards under ``trees/`` are ``TREES_SCHEMA``).

``behaviours`` (``sft`` and ``trees``) lists the cognitive behaviours ``mcts.behaviours`` tags, in its
``BEHAVIOURS`` order: for an ``sft`` row the whole trajectory's, for a ``trees`` row that one step's, read after
the steps above it (a trajectory's behaviours are the union of its steps').

``prompt`` is the chat-templated question (+ shared step prefix), built by the pipeline's export from the
records' separate ``question`` and ``prefix`` with the policy's prompt builder. The other columns are
metadata for filtering and analysis. Any change to a schema bumps ``SCHEMA_VERSION``, which is stored in
each schema's metadata (key ``open_rstar.schema_version``).
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 2  # 2: sft and the trees export gained ``behaviours``
VERSION_KEY = b"open_rstar.schema_version"


def _schema(name: str, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={VERSION_KEY: str(SCHEMA_VERSION).encode(), b"open_rstar.table": name.encode()})


# Tags from mcts.behaviours.BEHAVIOURS ('verification', 'backtracking', 'subgoal_setting', 'backward_chaining').
BEHAVIOURS_FIELD = pa.field("behaviours", pa.list_(pa.string()), nullable=False)


SFT_SCHEMA = _schema(
    "sft",
    [
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("completion", pa.string(), nullable=False),
        pa.field("problem_id", pa.string(), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        pa.field("round", pa.int32(), nullable=False),
        pa.field("q_mean", pa.float64(), nullable=False),  # mean step Q of the trajectory
        pa.field("q_min", pa.float64(), nullable=False),
        pa.field("n_steps", pa.int32(), nullable=False),
        pa.field("leaf_id", pa.int32(), nullable=False),  # the terminal's node id in the trees table; -1: primed
        BEHAVIOURS_FIELD,  # the trajectory's
    ],
)

PPM_PAIRS_SCHEMA = _schema(
    "ppm_pairs",
    [
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("chosen", pa.string(), nullable=False),
        pa.field("rejected", pa.string(), nullable=False),
        pa.field("margin", pa.float64(), nullable=False),  # q_chosen - q_rejected
        pa.field("q_chosen", pa.float64(), nullable=False),
        pa.field("q_rejected", pa.float64(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),  # 'step' (shared prefix) | 'final' (whole solutions)
        pa.field("depth", pa.int32(), nullable=False),  # depth of the compared steps; 0 for 'final'
        pa.field("problem_id", pa.string(), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        pa.field("round", pa.int32(), nullable=False),
        pa.field("chosen_id", pa.int32(), nullable=False),
        pa.field("rejected_id", pa.int32(), nullable=False),
        # sizes of the two sides the pair was drawn from: rStar-Math's loss weight 1 / (pos_count * neg_count)
        pa.field("pos_count", pa.int32(), nullable=False),
        pa.field("neg_count", pa.int32(), nullable=False),
    ],
)

STEPS_SCHEMA = _schema(
    "steps",
    [
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("completions", pa.list_(pa.string()), nullable=False),
        pa.field("labels", pa.list_(pa.float32()), nullable=False),  # Q of each step, in [-1, 1]
        pa.field("problem_id", pa.string(), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        pa.field("round", pa.int32(), nullable=False),
        pa.field("outcome", pa.string(), nullable=False),  # 'correct' | 'wrong' | 'ungraded' | 'dead'
        pa.field("leaf_id", pa.int32(), nullable=False),
    ],
)

TREES_SCHEMA = _schema(
    "trees",
    [
        # the tree (repeated on each of its rows; parquet dictionary-encodes them)
        pa.field("problem_id", pa.string(), nullable=False),
        pa.field("round", pa.int32(), nullable=False),
        pa.field("mode", pa.string(), nullable=False),  # 'terminal' | 'ppm' | 'test_time'
        pa.field("prior_weight", pa.float64(), nullable=False),
        pa.field("tree_seed", pa.int64(), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        pa.field("reference", pa.string(), nullable=False),  # '' when searched without a reference
        pa.field("rollouts", pa.int32(), nullable=False),  # rollouts the search ran
        # the row
        pa.field("record", pa.string(), nullable=False),  # 'node' | 'failed' (a rejected candidate)
        pa.field("id", pa.int32(), nullable=False),  # unique within the tree across both record kinds
        pa.field("parent", pa.int32(), nullable=False),  # -1 for the root
        pa.field("depth", pa.int32(), nullable=False),
        pa.field("text", pa.string(), nullable=False),  # step text as written ('' for the root)
        pa.field("code", pa.string(), nullable=False),
        pa.field("stdout", pa.string(), nullable=False),
        pa.field("answer", pa.string(), nullable=True),  # \boxed{} content of a final step
        pa.field("status", pa.string(), nullable=False),  # 'open' | 'terminal' | 'dead'; '' for failed
        pa.field("verdict", pa.string(), nullable=False),  # 'correct' | 'wrong' | 'ungraded' | ''
        pa.field("reward", pa.float64(), nullable=False),  # terminal / dead-end outcome backed up
        pa.field("visits", pa.int32(), nullable=False),  # N
        pa.field("value_sum", pa.float64(), nullable=False),  # W
        pa.field("prior", pa.float64(), nullable=True),  # PPM score; null without one
        pa.field("q", pa.float64(), nullable=False),  # Q, derived (for analysis; recomputed on load)
        pa.field("expanded", pa.bool_(), nullable=False),
        pa.field("errors", pa.int32(), nullable=False),  # consecutive failed expansions
        pa.field("stage", pa.string(), nullable=False),  # failed: 'parse' | 'exec' | 'depth' | 'after_answer'
        pa.field("error", pa.string(), nullable=False),  # failed: why; '' for nodes
    ],
)

# The exported trees table: the node table and each row's step behaviours (failed candidates' too; root: []).
TREES_EXPORT_SCHEMA = _schema("trees", [*TREES_SCHEMA, BEHAVIOURS_FIELD])

SCHEMAS: dict[str, pa.Schema] = {"sft": SFT_SCHEMA, "ppm_pairs": PPM_PAIRS_SCHEMA, "steps": STEPS_SCHEMA,
                                 "trees": TREES_EXPORT_SCHEMA}


def schema_version(schema: pa.Schema) -> int | None:
    """The version stored in a file's schema metadata (``pq.read_schema(path)``); None if absent."""
    raw = (schema.metadata or {}).get(VERSION_KEY)
    return int(raw) if raw is not None else None
