import os
import subprocess
import sys

import pytest

from mcts.seeds import derive_seed, proposal_seed, tree_seed


def test_seeds_are_63_bit_and_distinguish_their_parts():
    seeds = {
        tree_seed(0, 1, "p1"),
        tree_seed(0, 2, "p1"),
        tree_seed(1, 1, "p1"),
        tree_seed(0, 1, "p2"),
        derive_seed("ab", "c"),
        derive_seed("a", "bc"),
        derive_seed(1),
        derive_seed("1"),
    }
    assert len(seeds) == 8  # every change of a part (or of its type / split) changes the seed
    assert all(0 <= s < 2**63 for s in seeds)
    assert proposal_seed(5, 3, 0) != proposal_seed(5, 3, 1)


def test_rejects_parts_that_have_no_stable_encoding():
    with pytest.raises(TypeError, match="must be an int or a str"):
        derive_seed(1.5)  # type: ignore[arg-type]


def test_same_seed_in_a_fresh_process_with_another_hash_salt():
    code = "from mcts.seeds import tree_seed; print(tree_seed(7, 3, 'gsm8k-12'))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert int(out.stdout) == tree_seed(7, 3, "gsm8k-12")
