import pyarrow.parquet as pq
import pytest
from mcts_fakes import NamespaceExecutor, Problem, ScriptedPolicy, TableScorer, exact_grader, random_script

from data.schemas import SCHEMA_VERSION, TREES_SCHEMA, schema_version
from mcts.config import SearchConfig
from mcts.search import TreeSearch
from mcts.serialize import table_to_trees, tree_from_rows, tree_to_rows, trees_to_table
from mcts.wave import run_search


def _searched(mode="ppm"):
    cfg = SearchConfig(rollouts=8, children=3, mode=mode, prior_weight=2.0)
    searches = [TreeSearch(Problem(f"s{i}", f"q{i}", "4"), cfg, seed=i, grader=exact_grader, round_index=3)
                for i in range(3)]
    run_search(searches, ScriptedPolicy(random_script), NamespaceExecutor(), TableScorer({}, default=-0.125))
    return [s.tree for s in searches]


def _same(a, b):
    assert a.info == b.info and a.rollouts == b.rollouts and a.next_id == b.next_id
    assert a.nodes == b.nodes  # every field, derived ones (children, open_children, closed) included
    assert a.failures == b.failures


def test_rows_round_trip_losslessly():
    trees = _searched()
    assert any(t.failures for t in trees) and any(n.status == "terminal" for t in trees for n in t.nodes.values())
    for t in trees:
        back = tree_from_rows(tree_to_rows(t))
        _same(t, back)
        assert tree_to_rows(back) == tree_to_rows(t)
        assert back.find_child(0, "x") is None


def test_parquet_round_trip(tmp_path):
    trees = _searched(mode="terminal")
    table = trees_to_table(trees)
    assert table.schema.equals(TREES_SCHEMA)
    pq.write_table(table, tmp_path / "part-00000.parquet")
    assert schema_version(pq.read_schema(tmp_path / "part-00000.parquet")) == SCHEMA_VERSION
    back = table_to_trees(pq.read_table(tmp_path / "part-00000.parquet"))
    assert [t.info.problem_id for t in back] == ["s0", "s1", "s2"]
    for a, b in zip(trees, back, strict=True):
        _same(a, b)
    failed = [r for r in table.to_pylist() if r["record"] == "failed"]
    assert failed and all(r["error"] and r["stage"] and r["problem_id"] and r["round"] == 3 for r in failed)


def test_broken_rows_are_rejected_with_the_problem_named():
    rows = tree_to_rows(_searched()[0])
    with pytest.raises(ValueError, match="no rows"):
        tree_from_rows([])
    with pytest.raises(ValueError, match="tree 's0': the rows hold no root"):
        tree_from_rows([r for r in rows if r["id"] != 0])
    orphan = [r for r in rows if r["record"] == "node" and r["parent"] == 0][0]["id"]
    with pytest.raises(ValueError, match=f"tree 's0': node .* has parent {orphan}"):
        tree_from_rows([r for r in rows if r["id"] != orphan])
