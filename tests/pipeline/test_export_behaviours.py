"""The behaviours column of the sft and trees exports, behaviours.json, behaviour-aware SFT selection, priming."""

from __future__ import annotations

import json
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.generators.countdown import countdown_question
from data.schemas import SCHEMAS
from mcts.config import ExtractConfig
from mcts.extract import sft_records
from mcts.node import ROOT_ID
from mcts.qvalues import backup
from mcts.serialize import tree_to_rows
from mcts.steps import parse_step, render_step
from mcts.tree import Tree, TreeInfo
from pipeline.export import BEHAVIOURS_FILE, export_round, load_export
from pipeline.priming import PrimingError, load_priming
from pipeline.storage import RunDir

Q = countdown_question([8, 3, 5], 19)
PLAIN = "# 8 * 3 = 24.\na = 8 * 3\nprint(a)"
CHECK = "# Check that 24 - 5 equals the target.\nprint(a - 5 == 19)"
ANSWER = "# The answer is \\boxed{8 * 3 - 5}"
WRONG = "# The answer is \\boxed{8 + 3 + 5}"
RESTART = "# That does not work. Try again.\nb = 8 + 3 + 5\nprint(b)"


def prompt_fn(question: str, prefix: str) -> str:
    return f"<q>{question}</q>\n{prefix}"


def tree(pid: str = "c1") -> tuple[Tree, dict[str, int]]:
    """root ─ 1 PLAIN ─┬ 2 ANSWER correct                 rewards backed up: +1 via 2, +1 via 4, -1 via 5
                       └ 3 CHECK ─ 4 ANSWER correct        Q(1) = (1 + 1) / 2 = 1, Q(2) = Q(3) = Q(4) = 1
         └ 5 WRONG wrong   (+ a failed candidate RESTART under node 1)
    Both correct trajectories have mean Q 1 and min Q 1: the tie goes to the lower leaf id, 2 (no behaviour)
    before 4 (verification, from step 3).
    """
    t = Tree(TreeInfo(pid, Q, "19", 1, "terminal", 1.0, 3))
    n1 = t.add_child(t.new_id(), ROOT_ID, parse_step(PLAIN), "24", "open")
    ids = {"plain": n1.id}
    leaf = t.add_child(t.new_id(), n1.id, parse_step(ANSWER), "", "terminal", "correct")
    ids["a_direct"] = leaf.id
    n3 = t.add_child(t.new_id(), n1.id, parse_step(CHECK), "True", "open")
    ids["check"] = n3.id
    leaf2 = t.add_child(t.new_id(), n3.id, parse_step(ANSWER), "", "terminal", "correct")
    ids["a_checked"] = leaf2.id
    bad = t.add_child(t.new_id(), ROOT_ID, parse_step(WRONG), "", "terminal", "wrong")
    ids["wrong"] = bad.id
    for node, r in ((leaf, 1.0), (leaf2, 1.0), (bad, -1.0)):
        node.reward = r
        backup(t.nodes, node.id, r)
    for i in (ROOT_ID, n1.id, n3.id):
        t.mark_expanded(i)
    ids["failed"] = t.add_failure(n1.id, RESTART, "exec", "NameError").id
    t.rollouts = 3
    return t, ids


def make_run(tmp_path, trees: list[Tree]) -> RunDir:
    run = RunDir(tmp_path / "run")
    with run.trees(1).writer(2) as w:
        for t in trees:
            w.append(t.info.problem_id, tree_to_rows(t))
    return run


def test_sft_and_trees_exports_carry_behaviours_and_load_in_datasets(tmp_path):
    t, ids = tree()
    run = make_run(tmp_path, [t])
    res = export_round(run, 1, prompt_fn)
    for name in ("sft", "trees"):
        assert pq.read_schema(res.paths[name]).equals(SCHEMAS[name], check_metadata=False)
        assert pq.read_schema(res.paths[name]).field("behaviours").type == pa.list_(pa.string())
    sft = pq.read_table(res.paths["sft"]).to_pylist()
    # sft_top_n = 2: both correct trajectories, in the tree's tie order (see tree()).
    assert [(r["leaf_id"], r["behaviours"]) for r in sft] == [(ids["a_direct"], []),
                                                              (ids["a_checked"], ["verification"])]
    rows = {(r["record"], r["id"]): r["behaviours"] for r in pq.read_table(res.paths["trees"]).to_pylist()}
    assert rows[("node", ROOT_ID)] == [] and rows[("node", ids["plain"])] == []
    assert rows[("node", ids["check"])] == ["verification"]
    assert rows[("node", ids["a_checked"])] == []  # the answer step itself checks nothing
    assert rows[("failed", ids["failed"])] == ["backtracking"]  # "does not work", read after node 1
    ds = load_export(res.paths["trees"])
    assert ds.features["behaviours"].feature.dtype == "string"
    assert load_export(res.paths["sft"])["behaviours"] == [[], ["verification"]]


def test_behaviours_json_counts_graded_trajectories(tmp_path):
    t, _ = tree()
    run = make_run(tmp_path, [t, tree("c2")[0]])
    res = export_round(run, 1, prompt_fn)
    counts = json.loads((run.round_dir(1) / BEHAVIOURS_FILE).read_text())
    # per tree: correct 1-2 (none), 1-3-4 (verification); wrong 5 (none). Two trees: correct 4, wrong 2.
    assert counts["trajectories"] == {"correct": 4, "wrong": 2}
    assert counts["with_behaviour"]["correct"] == {"verification": 2, "backtracking": 0, "subgoal_setting": 0,
                                                   "backward_chaining": 0}
    assert set(counts["with_behaviour"]["wrong"].values()) == {0}
    assert res.summary["behaviours"] == counts


def test_behaviour_aware_selection_prefers_verified_trajectories_only_when_asked():
    t, ids = tree()
    # One more outcome, -1 through the checked answer: N/W of 4: 2/0, 3: 2/0, 1: 3/1, so the trajectory means
    # are 1-2 = (1/3 + 1) / 2 = 0.667 and 1-3-4 = (1/3 + 0 + 0) / 3 = 0.111: the direct answer is better by Q.
    backup(t.nodes, ids["a_checked"], -1.0)
    one = ExtractConfig(sft_top_n=1)
    assert [r.leaf_id for r in sft_records(t, one)] == [ids["a_direct"]]
    preferred = sft_records(t, replace(one, prefer_behaviours=("verification", "backtracking")))
    assert [(r.leaf_id, r.behaviours) for r in preferred] == [(ids["a_checked"], ("verification",))]
    # Nothing shows subgoal setting: the order by Q stands.
    assert [r.leaf_id for r in sft_records(t, replace(one, prefer_behaviours=("subgoal_setting",)))] == [ids["a_direct"]]
    with pytest.raises(ValueError, match=r"prefer_behaviours=\['verify'\]: unknown behaviour"):
        ExtractConfig(prefer_behaviours=("verify",))


def _priming_file(tmp_path, lines: list[str]):
    path = tmp_path / "prime.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


BACKTRACK_COMPLETION = (render_step("# 8 + 3 + 5 = 16. That does not work, try multiplying instead.\nb = 8 * 3\nprint(b)",
                                    "24") + render_step(ANSWER, "", final=True))
PLAIN_COMPLETION = render_step(PLAIN, "24") + render_step(ANSWER, "", final=True)


def test_priming_rows_join_round_1_sft_and_only_round_1(tmp_path):
    path = _priming_file(tmp_path, [json.dumps({"question": Q, "completion": BACKTRACK_COMPLETION}), "",
                                    json.dumps({"question": Q, "completion": PLAIN_COMPLETION, "problem_id": "x"})])
    t, _ = tree()
    run = make_run(tmp_path, [t])
    xcfg = ExtractConfig(priming_file=str(path))
    res = export_round(run, 1, prompt_fn, extract_config=xcfg)
    sft = pq.read_table(res.paths["sft"]).to_pylist()
    assert len(sft) == 3  # 2 from the tree + 1 primed; the plain one shows neither behaviour
    primed = sft[-1]
    assert (primed["leaf_id"], primed["q_mean"], primed["n_steps"]) == (-1, 0.0, 2)
    assert primed["behaviours"] == ["backtracking"] and primed["completion"] == BACKTRACK_COMPLETION
    assert primed["prompt"] == f"<q>{Q}</q>\n" and primed["problem_id"].startswith("primed-")
    assert res.summary["priming"] == {"read": 2, "added": 1,
                                      "skipped": {"shows none of backtracking, verification": 1}}
    # Another round's export ignores the priming file.
    t2 = Tree(replace(t.info, round=2))
    t2.nodes, t2.failures, t2.rollouts = t.nodes, t.failures, t.rollouts
    with run.trees(2).writer(1) as w:
        w.append("c1", tree_to_rows(t2))
    assert export_round(run, 2, prompt_fn, extract_config=xcfg).rows["sft"] == 2


def test_priming_file_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(PrimingError, match=r"priming_file='.*nope.jsonl': file not found"):
        load_priming(tmp_path / "nope.jsonl", ("verification",), prompt_fn)
    bad = _priming_file(tmp_path, [json.dumps({"question": Q, "completion": PLAIN_COMPLETION}), "{oops"])
    with pytest.raises(PrimingError, match=r"prime.jsonl:2: not JSON"):
        load_priming(bad, ("verification",), prompt_fn)
    bad.write_text(json.dumps({"question": Q}) + "\n")
    with pytest.raises(PrimingError, match=r"prime.jsonl:1: needs non-empty string fields"):
        load_priming(bad, ("verification",), prompt_fn)


def test_the_shipped_countdown_priming_file_loads_and_every_trajectory_qualifies():
    from pathlib import Path

    path = Path(__file__).parents[2] / "configs" / "countdown_priming.jsonl"
    primed = load_priming(path, ("verification", "backtracking"), prompt_fn)
    assert primed.read == 8 and len(primed.rows) == 8 and primed.skipped == {}
    assert all(r["completion"].endswith("<end_of_answer>\n") for r in primed.rows)
