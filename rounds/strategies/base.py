"""What every test-time strategy shares: the context it runs in, its candidates, and sampled chains.

A strategy is two functions (``Strategy``): ``generate`` spends the budget and returns each problem's
candidate solutions (batched over all problems, so the policy sees one batch per wave); ``select`` is pure and
picks one answer from a problem's candidates. Verification (``rounds.strategies.verify``) sits between them:
it marks candidates, the failures are dropped, and ``select`` ranks the rest. So ``--verify`` works for every
strategy without any strategy knowing about it.

Strategies never see a reference answer: trees are built from views without one, and grading happens
outside (``rounds.solve``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from mcts.answers import terminal_answers
from mcts.config import SearchConfig
from mcts.node import Node
from mcts.protocols import Executor, Policy, Proposal, Scorer, SearchState
from mcts.qvalues import check_unit
from mcts.search import TreeSearch
from mcts.seeds import derive_seed
from mcts.steps import render_steps
from mcts.wave import run_search

Aggregate = str  # 'last' | 'min' | 'prod': how best-of-N folds a solution's step scores into one
AGGREGATES = ("last", "min", "prod")


@dataclass(frozen=True)
class StepRec:
    """One executed step of a candidate: what the policy wrote, what its code printed."""

    text: str
    code: str
    stdout: str
    final: bool


@dataclass(frozen=True)
class Candidate:
    """One complete solution of a problem. ``score``: the strategy's ranking score (PPM score, aggregate or Q);
    None when the strategy does not score."""

    answer: str | None
    steps: tuple[StepRec, ...]
    score: float | None = None
    step_scores: tuple[float, ...] = ()
    group: int = 0  # the subtree it came from (DVTS); 0 elsewhere

    @property
    def solution(self) -> str:
        return render_steps([(s.text, s.stdout, s.final) for s in self.steps])

    @property
    def codes(self) -> tuple[str, ...]:
        return tuple(s.code for s in self.steps)


@dataclass
class SolveContext:
    """The engines and settings one solve uses. ``greedy`` decodes greedily (default: ``policy``)."""

    policy: Policy
    executor: Executor
    scorer: Scorer | None = None
    greedy: Policy | None = None
    search: SearchConfig = field(default_factory=SearchConfig)
    seed: int = 0
    aggregate: Aggregate = "last"  # best-of-N step-score aggregation
    expansion: int = 4  # beam / DVTS: M, the candidates each kept beam expands into per step
    mcts_children: int = 4  # test-time MCTS: candidates per expansion
    equivalent: Callable[[str, str], bool] | None = None
    # Sampled chains kept for reuse, keyed (tag, problem id, sample index): chain j of a problem is the same
    # draw (its seed derives from exactly that key) in every strategy and budget that asks for it, so a sweep
    # samples each chain once. None: no sharing. Each entry keeps its generated tokens, charged again on reuse.
    chain_cache: dict[tuple[str, str, int], tuple[Candidate | None, int]] | None = None

    def __post_init__(self) -> None:
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"aggregate={self.aggregate!r}: must be one of {', '.join(AGGREGATES)}")
        if self.expansion < 1 or self.mcts_children < 1:
            raise ValueError(f"expansion={self.expansion}, mcts_children={self.mcts_children}: must be >= 1")


class Strategy(Protocol):
    name: str
    needs_ppm: bool
    summary: str

    def generate(self, problems: Sequence[object], budget: int, ctx: SolveContext) -> list[list[Candidate]]: ...

    def select(self, candidates: Sequence[Candidate], ctx: SolveContext) -> str | None: ...


@dataclass(frozen=True)
class _View:
    """A problem as a tree sees it: its own tree id, the question, and no reference answer."""

    id: str
    question: str
    answer: None = None


def problem_id(tree_id: str) -> str:
    """The problem id of a tree id '<problem id>#<tag>' (problem ids may hold '#'; tags never do)."""
    return tree_id.rsplit("#", 1)[0]


def _never(_view: object, _answer: str | None) -> bool:
    return False  # chains run in terminal mode for their one-child walk; the verdict is never read


def steps_of(path: Sequence[Node]) -> tuple[StepRec, ...]:
    return tuple(StepRec(n.text, n.code, n.stdout, n.status == "terminal") for n in path)


def sample_chains(problems: Sequence[object], n: int, policy: Policy, ctx: SolveContext, tag: str) -> list[list[Candidate]]:
    """``n`` independent chains (one step per expansion, k = 1) per problem, all problems in one search batch.
    A chain that ended without a terminal is no candidate. result[i] = problem i's candidates, in sample order.
    With ``ctx.chain_cache``, chains drawn before are reused and their tokens charged to ``policy``'s meter."""
    cache = ctx.chain_cache
    keys = [(tag, str(p.id), j) for p in problems for j in range(n)]  # type: ignore[attr-defined]
    questions = {str(p.id): str(p.question) for p in problems}  # type: ignore[attr-defined]
    todo = [k for k in keys if cache is None or k not in cache]
    cfg = replace(ctx.search, mode="terminal", rollouts=1, children=1)
    searches = [TreeSearch(_View(f"{pid}#{t}{j}", questions[pid]), cfg, derive_seed("solve", ctx.seed, t, pid, j),
                           grader=_never) for t, pid, j in todo]
    run_search(searches, policy, ctx.executor)
    fresh: dict[tuple[str, str, int], tuple[Candidate | None, int]] = {}
    for key, s in zip(todo, searches, strict=True):
        terms = terminal_answers(s.tree)
        cand = Candidate(terms[0].answer, steps_of(s.tree.path(terms[0].node_id))) if terms else None
        fresh[key] = (cand, policy.tree_tokens(s.tree_id) if isinstance(policy, TokenMeter) else 0)
    if cache is not None:
        for key in keys:
            if key not in fresh and isinstance(policy, TokenMeter):
                policy.credit(f"{key[1]}#{key[0]}{key[2]}", cache[key][1])
        cache.update(fresh)
    got = {**(cache or {}), **fresh}
    return [[c for j in range(n) if (c := got[(tag, str(p.id), j)][0]) is not None] for p in problems]  # type: ignore[attr-defined]


def prefix_states(pid: str, question: str, cand: Candidate) -> list[SearchState]:
    """The PPM inputs of every step prefix of ``cand`` (steps 1..t for t = 1..T), as the search scores them."""
    return [SearchState(pid, question, render_steps([(s.text, s.stdout, s.final) for s in cand.steps[:t]]), 0)
            for t in range(1, len(cand.steps) + 1)]


def score_steps(problems: Sequence[object], cands: list[list[Candidate]], scorer: Scorer | None,
                last_only: bool = False) -> list[list[tuple[float, ...]]]:
    """PPM scores of every step prefix of every answered candidate (or its full solution only), in ONE batch."""
    if scorer is None:
        raise ValueError("this strategy ranks with the PPM: give a PPM (--ppm, or a run round that trained one)")
    states: list[SearchState] = []
    sizes: list[tuple[int, int, int]] = []
    for i, (p, row) in enumerate(zip(problems, cands, strict=True)):
        for j, c in enumerate(row):
            st = prefix_states(str(p.id), str(p.question), c)  # type: ignore[attr-defined]
            st = st[-1:] if last_only else st
            sizes.append((i, j, len(st)))
            states.extend(st)
    raw = scorer.score(states) if states else []
    if len(raw) != len(states):
        raise ValueError(f"scorer.score returned {len(raw)} scores for {len(states)} states")
    out: list[list[tuple[float, ...]]] = [[() for _ in row] for row in cands]
    at = 0
    for i, j, k in sizes:
        out[i][j] = tuple(check_unit(s, f"PPM score of {cands[i][j].answer!r}") for s in raw[at:at + k])
        at += k
    return out


def aggregate(scores: Sequence[float], how: Aggregate) -> float | None:
    """One score from a solution's step scores: 'last' s_T; 'min' min_t s_t; 'prod' the product of
    (s_t + 1) / 2, each step's score read as a probability in [0, 1]. None for no steps."""
    if not scores:
        return None
    if how == "last":
        return scores[-1]
    if how == "min":
        return min(scores)
    if how == "prod":
        p = 1.0
        for s in scores:
            p *= (s + 1.0) / 2.0
        return p
    raise ValueError(f"aggregate={how!r}: must be one of {', '.join(AGGREGATES)}")


def best_by_score(candidates: Sequence[Candidate]) -> str | None:
    """The answer of the highest-scored answered candidate; ties: the first (strict '>')."""
    best: Candidate | None = None
    for c in candidates:
        if c.answer is None or c.score is None:
            continue
        if best is None or c.score > best.score:  # type: ignore[operator]
            best = c
    return None if best is None else best.answer


class ScoreMemo:
    """A ``Scorer`` that remembers: a prefix (question, history) is scored once, however many strategies and
    budgets rank it (the PPM is deterministic, so a remembered score is the score). Misses go in one batch."""

    def __init__(self, inner: Scorer):
        self.inner = inner
        self.memo: dict[tuple[str, str], float] = {}

    def score(self, states: Sequence[SearchState]) -> list[float]:
        keys = [(s.question, s.history) for s in states]
        missing = list(dict.fromkeys(k for k in keys if k not in self.memo))
        if missing:
            by_key = {k: s for k, s in zip(keys, states, strict=True)}
            fresh = self.inner.score([by_key[k] for k in missing])
            if len(fresh) != len(missing):
                raise ValueError(f"scorer.score returned {len(fresh)} scores for {len(missing)} states")
            self.memo.update(zip(missing, fresh, strict=True))
        return [self.memo[k] for k in keys]


class TokenMeter:
    """A ``Policy`` that forwards to ``inner`` and counts the tokens of every proposal, per problem and tree.

    ``count(text)`` is the policy's tokenizer length (production) or any counter (tests); the stop string is
    not part of a proposal's text, so each proposal counts one token less than the engine decoded for it.
    Several meters may share one tally (``share``): greedy and sampled decoding of one model."""

    def __init__(self, inner: Policy, count: Callable[[str], int]):
        self.inner = inner
        self.count = count
        self.tokens: dict[str, int] = {}  # problem id -> tokens since the last take
        self.by_tree: dict[str, int] = {}  # tree id -> tokens

    def share(self, other: TokenMeter) -> TokenMeter:
        self.tokens, self.by_tree = other.tokens, other.by_tree
        return self

    def propose(self, states: Sequence[SearchState], k: int) -> list[list[Proposal]]:
        outs = self.inner.propose(states, k)
        for st, props in zip(states, outs, strict=True):
            self.credit(st.tree_id, sum(self.count(p.text) for p in props))
        return outs

    def credit(self, tree_id: str, n: int) -> None:
        """Charge ``n`` tokens to ``tree_id`` (and its problem): generated now, or a reused chain's."""
        pid = problem_id(tree_id)
        self.tokens[pid] = self.tokens.get(pid, 0) + n
        self.by_tree[tree_id] = self.by_tree.get(tree_id, 0) + n

    def tree_tokens(self, tree_id: str) -> int:
        return self.by_tree.get(tree_id, 0)

    def take(self, pid: str) -> int:
        """Tokens spent on problem ``pid`` since the last take (and forget them)."""
        return self.tokens.pop(str(pid), 0)
