"""The problem protocol the search types against (issue 18): the project's problems satisfy it, so mcts/ and the
evaluation read ``p.id`` / ``p.question`` as they are, without casts or type-checker escapes."""

from __future__ import annotations

from pathlib import Path

from mcts.protocols import ProblemLike

ROOT = Path(__file__).resolve().parents[2]


def test_data_problems_and_the_test_fakes_are_problem_like():
    from mcts_fakes import Problem as FakeProblem

    from data import Problem

    assert isinstance(Problem(id="p1", question="1+1?", answer="2", source="test"), ProblemLike)
    assert isinstance(FakeProblem("p1", "1+1?", "2"), ProblemLike)
    assert not isinstance(object(), ProblemLike)


def test_no_casts_or_type_ignores_left_where_the_protocol_applies():
    files = sorted((ROOT / "mcts").glob("*.py")) + [ROOT / "rounds" / "evaluate.py"]
    found = [f"{f.relative_to(ROOT)}:{i}: {line.strip()}" for f in files
             for i, line in enumerate(f.read_text().splitlines(), 1)
             if "type: ignore" in line or "str(p.id)" in line or "str(problem.id)" in line]
    assert found == [], "\n".join(found)
