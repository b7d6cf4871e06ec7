"""Code-augmented MCTS: nodes, UCT, expansion, Q backup, extraction of trajectories and pairs.

Pure Python: no Ray, torch, vLLM or transformers. The engines and the sandbox plug in through the
protocols of ``mcts.protocols``. Typical use from a rollout worker::

    cfg = dataclasses.replace(run_cfg.search, rollouts=spec.rollouts, children=spec.children, mode=spec.q_mode)
    searches = [TreeSearch(p, cfg, tree_seed(run_seed, round_index, p.id), grader, round_index) for p in problems]
    run_search(searches, policy, executor, scorer, on_done=store)        # waves: one policy batch each
    rows = tree_to_rows(search.tree); data = extract(search.tree, cfg.extract)
"""

from mcts.answers import TerminalAnswer, best_answer, terminal_answers, vote
from mcts.config import ExtractConfig, SearchConfig
from mcts.extract import Extracted, PairRecord, SFTRecord, StepsRecord, extract
from mcts.search import ExecBatch, ProposeRequest, ScoreBatch, TreeSearch
from mcts.seeds import derive_seed, tree_seed
from mcts.serialize import table_to_trees, tree_from_rows, tree_to_rows, trees_to_table
from mcts.tree import Tree, TreeInfo
from mcts.wave import answer_request, run_lanes, run_one, run_search, run_wave

__all__ = [
    "SearchConfig", "ExtractConfig", "TreeSearch", "ProposeRequest", "ExecBatch", "ScoreBatch", "Tree", "TreeInfo",
    "run_wave", "run_search", "run_lanes", "run_one", "answer_request", "extract", "Extracted", "SFTRecord", "PairRecord",
    "StepsRecord", "best_answer", "terminal_answers", "vote", "TerminalAnswer", "tree_to_rows", "tree_from_rows",
    "trees_to_table", "table_to_trees", "derive_seed", "tree_seed",
]
