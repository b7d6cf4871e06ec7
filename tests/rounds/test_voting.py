import pytest

from rounds.voting import best_scored, majority_vote, normalise


@pytest.mark.parametrize(
    ("raw", "form"),
    [
        ("4", "4"),
        (" 4.0 ", "4"),  # exact rational 4.0 = 4
        ("+4", "4"),
        ("$12$", "12"),
        ("1,234", "1234"),  # thousands separators only when the grouping is well formed
        ("0.50", "1/2"),
        ("\\text{42}", "42"),
        ("x + 1.", "x+1"),
        ("\\left(1, 2\\right)", "(1,2)"),
        ("1,2", "1,2"),  # a pair, not a number
    ],
)
def test_normalise(raw, form):
    assert normalise(raw) == form


def test_majority_vote_counts_and_ignores_missing():
    # answers: 4, 4.0, 5, None, 4 -> normal forms 4,4,5,4 (None does not vote) -> group "4" has 3 votes
    v = majority_vote(["4", "4.0", "5", None, "4"])
    assert (v.answer, v.votes, v.answered, v.groups) == ("4", 3, 4, 2)


def test_majority_vote_tie_goes_to_first_seen():
    # 7 and 3 both have 2 votes; 7 was seen first
    v = majority_vote(["7", "3", "3", "7"])
    assert (v.answer, v.votes) == ("7", 2)


def test_majority_vote_uses_equivalence_across_forms():
    calls = []

    def eq(a, b):
        calls.append((a, b))
        return {a, b} == {"1/2", "\\frac{1}{2}"}

    # "1/2" and "0.5" share the normal form 1/2 (no call needed); "\frac{1}{2}" needs one call to join them;
    # "3" is compared against the one representative "1/2" and starts its own group.
    v = majority_vote(["3", "1/2", "0.5", "\\frac{1}{2}"], equivalent=eq)
    assert (v.answer, v.votes, v.groups) == ("1/2", 3, 2)
    # eq calls: "1/2" vs rep "3"; "\frac{1}{2}" vs "3", then vs "1/2" -> 3 calls ("0.5" matched by form)
    assert len(calls) == 3


def test_majority_vote_no_answers():
    v = majority_vote([None, None])
    assert (v.answer, v.votes, v.answered, v.groups) == (None, 0, 0, 0)


def test_best_scored_picks_highest_answered():
    # index 1 has the top score but no answer; index 3 (0.9) beats index 0 (0.2); None score is skipped
    p = best_scored(["a", None, "c", "d"], [0.2, 0.99, None, 0.9])
    assert (p.answer, p.score, p.index) == ("d", 0.9, 3)


def test_best_scored_tie_lowest_index_and_empty():
    assert best_scored(["a", "b"], [0.5, 0.5]).index == 0
    assert best_scored([None], [1.0]).answer is None
    with pytest.raises(ValueError, match="2 answers but 1 scores"):
        best_scored(["a", "b"], [0.1])
