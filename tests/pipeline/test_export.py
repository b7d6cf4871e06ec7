"""Export of a round's trees into the four parquet files, streaming and atomic; they load and train as they are."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.schemas import SCHEMAS
from mcts.node import ROOT_ID
from mcts.qvalues import backup
from mcts.serialize import tree_to_rows
from mcts.steps import parse_step, render_step
from mcts.tree import Tree, TreeInfo
from pipeline.export import ExportConfig, export_round, export_trees, load_export
from pipeline.storage import RunDir, StorageError

ADD = "# Add the numbers.\nx = 2 + 3\nprint(x)"
MUL = "# Multiply them instead of adding.\nx = 2 * 3\nprint(x)"
ANS5 = "# The answer is \\boxed{5}"
# ADD vs MUL and ANS5 vs ANS6 are >= 20 characters apart (rendered), so rStar's pair filter keeps their pairs.
ANS6 = "# Multiplying would give six, so \\boxed{6}"


def prompt_fn(question: str, prefix: str) -> str:
    return f"<q>{question}</q>\n{prefix}"


def solved_tree(pid: str, round: int = 1) -> Tree:
    """root ─ 1 ADD(5) ─┬ 3 ANS5 correct          outcomes backed up: +1 via 3, -1 via 4, -1 via 5
                   └ 4 ANS6 wrong            Q(1) = (1 - 1) / 2 = 0, Q(2) = -1, Q(3) = 1, Q(4) = Q(5) = -1
    └ 2 MUL(6) ─── 5 ANS6 wrong              plus one rejected candidate (id 6) under the root
    """
    t = Tree(TreeInfo(pid, f"What is 2+3? ({pid})", "5", round, "terminal", 1.0, 42))
    n1 = t.add_child(t.new_id(), ROOT_ID, parse_step(ADD), "5", "open")
    n2 = t.add_child(t.new_id(), ROOT_ID, parse_step(MUL), "6", "open")
    for parent, text, verdict, reward in (
        (n1.id, ANS5, "correct", 1.0),
        (n1.id, ANS6, "wrong", -1.0),
        (n2.id, ANS6, "wrong", -1.0),
    ):
        leaf = t.add_child(t.new_id(), parent, parse_step(text), "", "terminal", verdict)
        leaf.reward = reward
        backup(t.nodes, leaf.id, reward)
    for i in (ROOT_ID, n1.id, n2.id):
        t.mark_expanded(i)
    t.add_failure(ROOT_ID, "x = 1", "parse", "no reasoning comment")
    t.rollouts = 3
    return t


def unsolved_tree(pid: str) -> Tree:
    """root ─ 1 ANS6 wrong: no SFT row, no pair, one step-label row."""
    t = Tree(TreeInfo(pid, f"What is 2+3? ({pid})", "5", 1, "terminal", 1.0, 7))
    leaf = t.add_child(t.new_id(), ROOT_ID, parse_step(ANS6), "", "terminal", "wrong")
    leaf.reward = -1.0
    backup(t.nodes, leaf.id, -1.0)
    t.mark_expanded(ROOT_ID)
    t.rollouts = 1
    return t


def make_run(tmp_path, n_solved: int = 5, n_unsolved: int = 2, shard_problems: int = 3) -> RunDir:
    run = RunDir(tmp_path / "run")
    trees = [solved_tree(f"s{i}") for i in range(n_solved)] + [unsolved_tree(f"u{i}") for i in range(n_unsolved)]
    with run.trees(1).writer(shard_problems) as w:
        for t in trees:
            w.append(t.info.problem_id, tree_to_rows(t))
    return run


def test_export_counts_and_rows_match_hand_computed_extraction(tmp_path):
    run = make_run(tmp_path)
    res = export_round(run, 1, prompt_fn)
    # per solved tree: 1 SFT row (path 1-3); pairs: root (1 vs 2) + node 1 (3 vs 4) + final (3 vs 5, 3 vs 4) = 4;
    # steps: leaves 3, 4, 5 = 3; trees: 6 nodes + 1 failure = 7.  Per unsolved: 0, 0, 1, 2.
    # 5 solved + 2 unsolved: sft 5, ppm_pairs 20, steps 5*3 + 2 = 17, trees 5*7 + 2*2 = 39
    assert res.rows == {"sft": 5, "ppm_pairs": 20, "steps": 17, "trees": 39}
    assert (res.problems, res.solved) == (7, 5)
    assert res.out_dir == run.round_dir(1)
    for name, path in res.paths.items():
        assert path == run.export_path(1, name)
        assert pq.read_schema(path).equals(SCHEMAS[name], check_metadata=False), name
        assert pq.read_metadata(path).num_rows == res.rows[name]
    assert not [f for f in os.listdir(run.round_dir(1)) if f.startswith(".tmp-")]

    sft = pq.read_table(res.paths["sft"]).to_pylist()[0]
    q = "What is 2+3? (s0)"
    assert sft["prompt"] == f"<q>{q}</q>\n"  # whole solutions follow the bare question
    assert sft["completion"] == render_step(ADD, "5") + render_step(ANS5, "", final=True)
    assert sft["completion"].endswith("<end_of_answer>\n")
    assert (sft["problem_id"], sft["round"], sft["n_steps"], sft["leaf_id"]) == ("s0", 1, 2, 3)
    assert (sft["q_mean"], sft["q_min"]) == (0.5, 0.0)  # (Q1 + Q3) / 2 = (0 + 1) / 2; min(0, 1)

    pairs = [r for r in pq.read_table(res.paths["ppm_pairs"]).to_pylist() if r["problem_id"] == "s0"]
    by_kind = {(r["kind"], r["depth"], r["chosen_id"], r["rejected_id"]): r for r in pairs}
    assert sorted(by_kind) == [("final", 0, 3, 4), ("final", 0, 3, 5), ("step", 1, 1, 2), ("step", 2, 3, 4)]
    deep = by_kind[("step", 2, 3, 4)]
    assert deep["prompt"] == f"<q>{q}</q>\n" + render_step(ADD, "5")  # the shared prefix joins the prompt
    assert deep["chosen"] == render_step(ANS5, "", final=True)
    assert deep["rejected"] == render_step(ANS6, "", final=True)
    assert (deep["q_chosen"], deep["q_rejected"], deep["margin"]) == (1.0, -1.0, 2.0)
    # final pair 3 vs 5: mean Q (0 + 1) / 2 = 0.5 against (-1 + -1) / 2 = -1 -> margin 1.5
    assert by_kind[("final", 0, 3, 5)]["margin"] == 1.5

    steps = [r for r in pq.read_table(res.paths["steps"]).to_pylist() if r["problem_id"] == "s0"]
    assert [(r["leaf_id"], r["outcome"], r["labels"]) for r in steps] == [
        (3, "correct", [0.0, 1.0]),
        (4, "wrong", [0.0, -1.0]),
        (5, "wrong", [-1.0, -1.0]),
    ]
    assert steps[0]["completions"] == [render_step(ADD, "5"), render_step(ANS5, "", final=True)]

    trees = pq.read_table(res.paths["trees"])
    assert trees.column("problem_id").to_pylist()[:7] == ["s0"] * 7
    assert trees.column("record").to_pylist()[:7] == ["node"] * 6 + ["failed"]


def test_export_is_streamed_shard_by_shard_in_row_groups(tmp_path, monkeypatch):
    run = make_run(tmp_path, n_solved=9, n_unsolved=0, shard_problems=2)

    # Whole-file reads would defeat streaming: forbid them for the duration of the export.
    def no_whole_reads(*a, **k):
        raise AssertionError("export must stream with ParquetFile.iter_batches, not read whole files")

    monkeypatch.setattr(pq, "read_table", no_whole_reads)
    seen: list[str] = []

    def spy(question: str, prefix: str) -> str:
        seen.append(question)
        return prompt_fn(question, prefix)

    res = export_round(run, 1, spy, config=ExportConfig(row_group_rows=8, read_batch_rows=3))
    monkeypatch.undo()
    assert res.rows["trees"] == 63  # 9 * 7
    # 63 node rows in groups of >= 8 rows, flushed as trees arrive (7 rows each): several row groups
    assert pq.ParquetFile(res.paths["trees"]).num_row_groups > 3
    # one prompt per distinct (question, prefix) per tree: '' and the node-1 prefix -> 2 calls per tree
    assert len(seen) == 18 and seen[:2] == ["What is 2+3? (s0)"] * 2
    assert pq.read_table(res.paths["trees"]).equals(
        pq.read_table(export_round(run, 1, prompt_fn, tmp_path / "b").paths["trees"])
    )


def test_every_export_loads_with_datasets(tmp_path):
    run = make_run(tmp_path, n_solved=2, n_unsolved=1)
    res = export_round(run, 1, prompt_fn, out_dir=tmp_path / "out")
    assert res.out_dir == tmp_path / "out" and not run.export_path(1, "sft").exists()
    for name, path in res.paths.items():
        ds = load_export(path)
        assert len(ds) == res.rows[name], name
        assert set(ds.column_names) == set(SCHEMAS[name].names)
    steps = load_export(res.paths["steps"])
    assert str(steps.features["labels"].feature.dtype) == "float32"
    assert steps[0]["labels"] == [0.0, 1.0]


def test_failed_export_leaves_previous_files_and_no_temp(tmp_path):
    run = make_run(tmp_path)
    first = export_round(run, 1, prompt_fn)
    before = {n: p.read_bytes() for n, p in first.paths.items()}
    calls = 0

    def flaky(question: str, prefix: str) -> str:
        nonlocal calls
        calls += 1
        if calls == 5:
            raise RuntimeError("tokenizer exploded")
        return "other " + prompt_fn(question, prefix)

    with pytest.raises(RuntimeError, match="tokenizer exploded"):
        export_round(run, 1, flaky, config=ExportConfig(row_group_rows=1))
    assert {n: p.read_bytes() for n, p in first.paths.items()} == before
    assert not [f for f in os.listdir(run.round_dir(1)) if f.startswith(".tmp-")]


def test_only_committed_trees_are_exported(tmp_path):
    run = make_run(tmp_path, n_solved=2, n_unsolved=0, shard_problems=1)
    # A shard renamed into place by a writer killed before it wrote the manifest: not part of the round.
    orphan = pa.Table.from_pylist(tree_to_rows(solved_tree("ghost")), schema=SCHEMAS["trees"])
    pq.write_table(orphan, run.trees_dir(1) / "part-00007.parquet")
    res = export_round(run, 1, prompt_fn, config=ExportConfig(tables=("sft", "trees")))
    assert res.rows == {"sft": 2, "trees": 14}
    assert set(res.paths) == {"sft", "trees"} and not run.export_path(1, "steps").exists()
    assert "ghost" not in pq.read_table(res.paths["trees"]).column("problem_id").to_pylist()


def test_export_of_a_round_without_trees_is_refused(tmp_path):
    with pytest.raises(StorageError, match="no committed trees to export"):
        export_trees(RunDir(tmp_path).trees(1), tmp_path / "out", prompt_fn)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"row_group_rows": 0}, "row_group_rows=0: must be >= 1"),
        ({"read_batch_rows": -1}, "read_batch_rows=-1: must be >= 1"),
        ({"tables": ("sft", "pairs")}, r"tables=\['sft', 'pairs'\]: must be distinct names among sft, ppm_pairs"),
        ({"tables": ()}, r"tables=\[\]"),
        ({"compression": "lz5"}, "compression='lz5'"),
    ],
)
def test_export_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ExportConfig(**kwargs)


def test_exports_feed_trl_sft_and_reward_trainers_as_they_are(tmp_path):
    """issue 7: sft -> SFTTrainer, ppm_pairs -> RewardTrainer, no conversion; 2 steps each on the tiny model."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

    from rounds.models import resolve_model

    model_dir = str(resolve_model("tiny-random"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    run = make_run(tmp_path, n_solved=4, n_unsolved=1)

    # The real prompt: the model's chat template around the question, then the prefix (as PromptBuilder does).
    def chat_prompt(question: str, prefix: str) -> str:
        msgs = [{"role": "user", "content": question}]
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) + prefix

    res = export_round(run, 1, chat_prompt)
    common = dict(
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        dataloader_num_workers=0,
        seed=0,
    )

    sft = SFTTrainer(
        model=model_dir,
        processing_class=tok,
        train_dataset=load_export(res.paths["sft"]),
        args=SFTConfig(output_dir=str(tmp_path / "sft"), max_length=256, **common),
    )
    before = [p.detach().clone() for p in sft.model.parameters()]
    sft.train()
    assert sft.state.global_step == 2
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, sft.model.parameters(), strict=True))

    rm = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    reward = RewardTrainer(
        model=rm,
        processing_class=tok,
        train_dataset=load_export(res.paths["ppm_pairs"]),
        args=RewardConfig(output_dir=str(tmp_path / "rm"), max_length=256, **common),
    )
    head = rm.score.weight.detach().clone()
    reward.train()
    assert reward.state.global_step == 2
    assert not torch.equal(head, rm.score.weight.detach())
    losses = [h["loss"] for h in reward.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(loss == loss for loss in losses)  # finite, not NaN
