"""data.problem: the Problem record, its validation, content ids and the dict round trip."""

from __future__ import annotations

import json

import pytest

from data.problem import KIND_COUNTDOWN, KIND_MATH, Problem, content_id


def test_round_trip_through_dict_and_json():
    p = Problem(id="p1", question="1+1?", answer="2", source="test", difficulty=1, meta={"expression": "1 + 1"})
    row = p.to_dict()
    assert isinstance(row["meta"], str)  # a JSON string: one column type whatever the source
    assert Problem.from_dict(json.loads(json.dumps(row))) == p
    assert Problem.from_dict({"id": 7, "question": "q", "answer": 3, "source": "s"}) == Problem("7", "q", "3", "s")


def test_content_id_is_stable_and_content_derived():
    a = content_id("builtin:arithmetic", "What is 2+2?", "4")
    assert a == content_id("builtin:arithmetic", "What is 2+2?", "4")
    assert a.startswith("arithmetic-") and len(a) == len("arithmetic-") + 12
    assert a != content_id("builtin:arithmetic", "What is 2+2?", "5")
    assert content_id("/data/gsm8k-test.jsonl", "q", "a").startswith("gsm8k-test-")


def test_validation_names_the_field():
    with pytest.raises(ValueError, match="Problem.question=''"):
        Problem(id="x", question="", answer="1", source="s")
    with pytest.raises(ValueError, match="Problem.difficulty='hard'"):
        Problem(id="x", question="q", answer="1", source="s", difficulty="hard")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="countdown meta"):
        Problem(id="x", question="q", answer="24", source="s", meta={"kind": KIND_COUNTDOWN})


def test_kind_and_hashability():
    p = Problem(id="x", question="q", answer="24", source="s", meta={"kind": KIND_COUNTDOWN, "numbers": [4, 6]})
    assert p.kind == KIND_COUNTDOWN
    assert Problem(id="y", question="q", answer="1", source="s").kind == KIND_MATH
    assert len({p, p}) == 1  # usable as a dict key although meta is a dict
