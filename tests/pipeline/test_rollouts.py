"""The rollout phase on a real local Ray cluster, with scripted fake engines so each run takes seconds.

What is checked: every problem's tree is stored once; trees do not depend on how problems are sharded or
on a worker dying mid-run (derived seeds); resume skips stored problems; a killed worker's problems are
reassigned; a dead engine is restarted and its requests re-sent; PPM rounds go through the scorer actor;
extra rollouts go to unsolved trees. One test runs the real tiny model with the real sandbox and grader.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pytest

from mcts.protocols import Proposal
from pipeline.actors import PolicyEngine, ScorerEngine
from pipeline.rollouts import Backends, RolloutConfig, RolloutStats, run_rollouts
from pipeline.runlog import RunLog, RunLogConfig
from pipeline.storage import TreeStore

# The fakes below run inside Ray actors, which cannot import this test module by name: ship it by value.
ray = pytest.importorskip("ray")
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


# --------------------------------------------------------------------------------------------- fakes


@dataclass(frozen=True)
class FakeProblem:
    id: str
    question: str
    answer: str


@dataclass(frozen=True)
class FakeOutcome:
    ok: bool
    error: str | None
    stdout: str


class ScriptedPolicy:
    """k candidates per state: a non-final step (j >= 2), a wrong answer (j = 1) and, from depth 1 on, the
    right answer (j = 0) unless the problem id is in ``never_solve``. Sleeps ``delay`` per call, like an engine.
    ``die_on_call``: the process exits on that call, once per ``marker`` file (so a restarted engine lives)."""

    def __init__(
        self,
        answers: dict[str, str],
        delay: float = 0.0,
        never_solve: frozenset = frozenset(),
        die_on_call: int = 0,
        marker: str = "",
    ):
        self.answers, self.delay, self.never_solve = answers, delay, never_solve
        self.die_on_call, self.marker, self.calls = die_on_call, marker, 0

    def propose(self, states, k):
        self.calls += 1
        if self.die_on_call and self.calls == self.die_on_call and not os.path.exists(self.marker):
            Path(self.marker).touch()
            os._exit(1)  # the engine process dies mid-request, as a crashed GPU worker would
        time.sleep(self.delay)
        out = []
        for st in states:
            depth = st.history.count("<end_of_step>")
            props = []
            for j in range(k):
                if j == 0 and depth >= 1 and st.tree_id not in self.never_solve:
                    props.append(Proposal(f"# The answer is \\boxed{{{self.answers[st.tree_id]}}}", "<end_of_answer>"))
                elif j == 1:
                    props.append(Proposal("# The answer is \\boxed{-1}", "<end_of_answer>"))
                else:
                    step = f"# step {depth} option {j}\nx{depth} = {j} + {st.seed % 7}"
                    props.append(Proposal(step, "<end_of_step>"))
            out.append(props)
        return out


class FixedScorer:
    """PPM fake: the score of a prefix is 0.5 minus 0.1 per completed step, at least -1 (priors are checkable)."""

    def score(self, states):
        return [max(-1.0, 0.5 - 0.1 * st.history.count("<end_of_step>")) for st in states]


class OkExecutor:
    """Every step runs fine. ``busy_marker``: after ``busy_after`` batches, touch ``<dir>/<actor name>.busy``."""

    def __init__(self, busy_dir: str = "", busy_after: int = 0):
        self.busy_dir, self.busy_after, self.batches = busy_dir, busy_after, 0

    def run(self, requests):
        self.batches += 1
        if self.busy_dir and self.batches == self.busy_after:
            name = ray.get_runtime_context().get_actor_name()
            Path(self.busy_dir, f"{name}.busy").touch()
        return [FakeOutcome(True, None, "") for _ in requests]

    def release(self, tree_id):
        pass


def exact_grade(problem, answer):
    return answer == problem.answer


PROBLEMS = [FakeProblem(f"p{i}", f"What is {i} + 1?", str(i + 1)) for i in range(8)]
ANSWERS = {p.id: p.answer for p in PROBLEMS}


# --------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def cluster(ray_session):
    """The session's one local Ray cluster (tests/conftest.py: Ray is started once per test process)."""
    return ray_session


def make_cfg(workers: int = 2, engines: int = 1, max_restarts: int = 2):
    from mcts.config import SearchConfig
    from pipeline.config import RayConfig, RunConfig, StorageConfig

    # Shallow trees keep each run to a second or two. Fractional CPUs: 2 workers + an engine + a scorer (and
    # a replacement worker) fit the 2-CPU test cluster.
    return RunConfig(
        seed=7,
        storage=StorageConfig(shard_problems=3),
        search=SearchConfig(max_depth=4),
        ray=RayConfig(
            num_cpus=2,
            rollout_workers=workers,
            policy_engines=engines,
            cpus_per_engine=0.25,
            cpus_per_worker=0.25,
            max_restarts=max_restarts,
        ),
    )


def make_spec(**kw):
    from rounds.schedule import RoundSpec

    return RoundSpec(**{"policy": "bootstrap", "q_mode": "terminal", "rollouts": 3, "children": 3, **kw})


def backends(delay=0.0, never_solve=frozenset(), scorer=False, executor=OkExecutor, **policy_kw):
    return Backends(
        policy=functools.partial(ScriptedPolicy, ANSWERS, delay, frozenset(never_solve), **policy_kw),
        executor=executor,
        grader=exact_grade,
        scorer=FixedScorer if scorer else None,
    )


def quiet_log(tmp_path: Path) -> RunLog:
    return RunLog(tmp_path / "log.jsonl", RunLogConfig(console=False))


def rollouts(
    tmp_path: Path, name: str, problems=PROBLEMS, cfg=None, spec=None, be=None, **kw
) -> tuple[RolloutStats, TreeStore]:
    store = TreeStore(tmp_path / name / "trees")
    stats = run_rollouts(
        cfg or make_cfg(),
        1,
        spec or make_spec(),
        problems,
        "fake-policy",
        None,
        store,
        quiet_log(tmp_path / name),
        settings=RolloutConfig(retry_backoff_s=0.05),
        backends=be or backends(),
        **kw,
    )
    return stats, store


def rows_by_problem(store: TreeStore) -> dict[str, list[dict]]:
    return {t.column("problem_id")[0].as_py(): t.to_pylist() for t in store.iter_trees()}


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory):
    """An undisturbed run with 2 workers: the trees every other run must reproduce."""
    return rollouts(tmp_path_factory.mktemp("reference"), "reference", cfg=make_cfg(workers=2))


# --------------------------------------------------------------------------------------------- without Ray


def test_rollout_config_rejects_bad_values():
    with pytest.raises(ValueError, match=r"groups=0: must be >= 1"):
        RolloutConfig(groups=0)
    with pytest.raises(ValueError, match=r"engine_retries=-1"):
        RolloutConfig(engine_retries=-1)


def test_engine_meters_busy_time_and_counts_in_process():
    class Counting(ScriptedPolicy):
        stats = type("S", (), {"new_tokens": 0})()

        def propose(self, states, k):
            self.stats.new_tokens += 5 * len(states) * k
            return super().propose(states, k)

    engine = PolicyEngine(lambda: Counting(ANSWERS, delay=0.02))
    from mcts.protocols import SearchState

    states = [SearchState("p1", "q", "", 1), SearchState("p2", "q", "", 2)]
    out = engine.propose(states, 3)
    st = engine.stats()
    assert [len(o) for o in out] == [3, 3]
    # one call, 2 states, 2 x 3 = 6 proposals, 5 tokens each = 30 tokens, >= the 20 ms sleep of busy time
    assert (st.calls, st.items, st.outputs, st.tokens) == (1, 2, 6, 30)
    assert st.busy_s >= 0.02, st
    assert (st.decode_ticks, st.parts_s) == (0, {}), "a backend without a running batch reports no batch clock"
    assert (st.prompt_tokens, st.cached_tokens) == (0, 0), "nor prompt-token counts it does not keep"
    scorer = ScorerEngine(FixedScorer)
    assert scorer.score(states) == [0.5, 0.5]
    assert scorer.stats().outputs == 2


class _Answers:
    """An engine actor handle whose ``propose.remote()`` hands ``ray.get`` (patched) the next scripted outcome."""

    def __init__(self, outcomes):
        self.outcomes = list(outcomes)
        self.calls = 0
        self.propose = self

    def remote(self, *args):
        self.calls += 1
        out = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        return out


@pytest.fixture
def scripted_ray_get(monkeypatch):
    import ray

    def get(out, *a, **kw):
        if isinstance(out, BaseException):
            raise out
        return out

    monkeypatch.setattr(ray, "get", get)


def test_a_restarting_engine_is_waited_for_without_using_up_retries(scripted_ray_get):
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    from pipeline.actors import EngineUnavailable, RemotePolicy

    restarting = ActorUnavailableError("The actor is restarting", None)
    # Died once, then unavailable for 8 polls while its model loads again, then answers: one retry, one wait.
    engine = _Answers([ActorDiedError(), *[restarting] * 8, [["ok"]]])
    remote = RemotePolicy([engine], retries=1, backoff_s=0.01, restart_wait_s=60)
    assert remote.propose([], 1) == [["ok"]]
    assert engine.calls == 10 and remote.retried == 2 and len(remote.failures) == 2, remote.failures
    # A restart that takes longer than restart_wait_s ends the request, saying so.
    slow = RemotePolicy([_Answers([restarting])], retries=3, backoff_s=0.01, restart_wait_s=0.2)
    with pytest.raises(EngineUnavailable, match="waiting for restarting"):
        slow.propose([], 1)
    # Deaths use up the retries as before.
    dead = RemotePolicy([_Answers([ActorDiedError()])], retries=2, backoff_s=0.01)
    with pytest.raises(EngineUnavailable, match="failed 3 times"):
        dead.propose([], 1)


# --------------------------------------------------------------------------------------------- on Ray


def test_every_problem_stored_once_and_trees_independent_of_sharding(reference, tmp_path):
    two, store2 = reference
    one, store1 = rollouts(tmp_path, "one", cfg=make_cfg(workers=1))
    assert two.done == one.done == 8 and two.skipped == 0
    # When each stored tree arrived: one time per tree, in order, the median one as half_done_s.
    assert len(one.tree_done_s) == 8 and one.tree_done_s == sorted(one.tree_done_s), one.tree_done_s
    assert 0 < one.half_done_s == one.tree_done_s[3] <= one.wall_s
    assert store2.completed_problem_ids() == {p.id for p in PROBLEMS}
    # Same run seed, round and problem ids: each tree is identical whichever worker searched it.
    assert rows_by_problem(store1) == rows_by_problem(store2)
    assert two.solved == 8  # the scripted policy answers right from depth 1
    assert two.rollouts >= 8 and two.expansions > 0 and two.nodes > 8
    assert two.workers == 2 and two.engines == 1 and two.worker_restarts == 0 and two.engine_retries == 0
    assert 0.0 < two.engine_utilisation <= 1.0, two
    assert two.overhead_per_expansion_s > 0.0


def test_resume_skips_stored_problems_and_adds_the_same_trees(reference, tmp_path):
    _, full_store = reference
    store = TreeStore(tmp_path / "resumed" / "trees")
    first = run_rollouts(
        make_cfg(), 1, make_spec(), PROBLEMS[:3], "fake-policy", None, store, quiet_log(tmp_path), backends=backends()
    )
    again = run_rollouts(
        make_cfg(), 1, make_spec(), PROBLEMS, "fake-policy", None, store, quiet_log(tmp_path), backends=backends()
    )
    assert (first.done, again.skipped, again.done) == (3, 3, 5)
    assert rows_by_problem(store) == rows_by_problem(full_store)
    nothing = run_rollouts(
        make_cfg(), 1, make_spec(), PROBLEMS, "fake-policy", None, store, quiet_log(tmp_path), backends=backends()
    )
    assert (nothing.skipped, nothing.done) == (8, 0)


def test_killed_worker_problems_are_reassigned_and_trees_unchanged(reference, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    # Worker 0's executor marks itself busy after its 3rd batch; this thread then kills it with ray.kill.
    killed: list[str] = []

    def killer():
        deadline = time.time() + 60
        while time.time() < deadline and not killed:
            for f in busy.glob("rollout-worker-*-0-0.busy"):
                ray.kill(ray.get_actor(f.stem))
                killed.append(f.stem)
            time.sleep(0.02)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    be = backends(delay=0.05, executor=functools.partial(OkExecutor, str(busy), 3))
    stats, store = rollouts(tmp_path, "killed", be=be)
    t.join()
    assert killed, "the worker was never seen busy"
    assert stats.worker_restarts == 1 and stats.reassigned >= 1, stats
    assert store.completed_problem_ids() == {p.id for p in PROBLEMS}
    assert stats.done == 8 and stats.duplicates == 0
    assert any("died" in line for line in stats.retry_log), stats.retry_log
    assert rows_by_problem(store) == rows_by_problem(reference[1])


def test_dead_engine_is_restarted_and_its_request_resent(cluster, tmp_path):
    marker = tmp_path / "engine-died"
    be = backends(die_on_call=3, marker=str(marker))
    stats, store = rollouts(tmp_path, "engine", cfg=make_cfg(workers=1), be=be)
    assert marker.exists(), "the engine never died"
    assert stats.engine_retries >= 1, stats
    assert stats.done == 8 and store.completed_problem_ids() == {p.id for p in PROBLEMS}


def test_ppm_round_scores_new_nodes_through_the_scorer_actor(cluster, tmp_path):
    stats, store = rollouts(tmp_path, "ppm", spec=make_spec(q_mode="ppm"), be=backends(scorer=True))
    assert stats.done == 8
    rows = [r for rs in rows_by_problem(store).values() for r in rs if r["record"] == "node" and r["depth"] > 0]
    # A node's prefix is the rendered path root -> node, itself included: a non-final depth-1 node shows one
    # '<end_of_step>', so FixedScorer gives it 0.5 - 0.1 * 1 = 0.4.
    # Only non-terminal nodes are scored (rStar-Math): a graded terminal has no prior, its Q is exactly +1 / -1.
    assert rows and all((r["prior"] is None) == (r["status"] == "terminal") for r in rows if r["status"] != "dead")
    assert all(r["q"] in (1.0, -1.0) for r in rows if r["status"] == "terminal")
    assert {round(r["prior"], 6) for r in rows if r["depth"] == 1 and r["status"] != "terminal"} == {0.4}


def test_unsolved_trees_escalate_through_the_stages(cluster, tmp_path):
    never = {"p0", "p1"}
    spec = make_spec(unsolved_rollouts=(4, 6), rollouts=2)
    stats, store = rollouts(tmp_path, "extra", spec=spec, be=backends(never_solve=never))
    per_tree = {pid: rows[0]["rollouts"] for pid, rows in rows_by_problem(store).items()}
    # Unsolved trees (never exhausted: every expansion leaves open steps) were extended in place to 4, then
    # to 6 rollouts in all; solved ones stopped at 2.
    assert all(per_tree[p] == 6 for p in never), per_tree
    assert all(n <= 2 for p, n in per_tree.items() if p not in never), per_tree
    assert stats.solved == 6


def test_real_tiny_model_with_sandbox_and_grader(cluster, tmp_path):
    """The production backends end to end: tiny random model, sandbox pool, data.grade."""
    import data
    from pipeline.config import RunConfig
    from pipeline.engines.config import EngineConfig, GenerationConfig
    from pipeline.sandbox import SandboxConfig
    from rounds.models import resolve_model

    model = str(resolve_model("tiny-random"))
    problems = data.load_problems("builtin:arithmetic", n=2, seed=0, difficulty=1)
    base = make_cfg(workers=1)
    cfg = RunConfig(
        seed=1,
        storage=base.storage,
        ray=base.ray,
        sandbox=SandboxConfig(workers=1, timeout=5.0),
        engines=EngineConfig(policy_model=model, max_batch_rows=8, generation=GenerationConfig(max_new_tokens_step=12)),
    )
    spec = make_spec(rollouts=1, children=2, gen_mode="step")
    store = TreeStore(tmp_path / "trees")
    stats = run_rollouts(cfg, 1, spec, problems, model, None, store, quiet_log(tmp_path))
    assert stats.done == 2 and store.completed_problem_ids() == {p.id for p in problems}
    assert stats.tokens > 0 and stats.expansions >= 2, stats
    # Every request's prompt starts with the engine's shared prefix, served from its cache.
    assert 0.0 < stats.engine_prefix_hit_rate < 1.0, stats
    table = pa.concat_tables(list(store.iter_trees()))
    assert set(table.column("record").to_pylist()) <= {"node", "failed"}
    assert dataclasses.asdict(stats)["engine_busy_s"] > 0


def test_actors_that_cannot_fit_a_fixed_cluster_fail_fast(cluster, tmp_path):
    from pipeline.config import RayConfig, RunConfig
    from pipeline.rollouts import RolloutError, _Phase

    # The test cluster has 2 CPUs; a PPM round asks for 1 engine + 1 scorer at 1 CPU each + 1 worker at 1 CPU = 3.
    cfg = RunConfig(ray=RayConfig(rollout_workers=1, cpus_per_engine=1.0, cpus_per_worker=1.0))
    log = quiet_log(tmp_path)
    phase = _Phase(cfg, 3, make_spec(q_mode="ppm"), backends(scorer=True), RolloutConfig(), log)
    with pytest.raises(RolloutError, match=r"ray.cpus_per_worker=1: 3 CPU needed, 2 in the cluster"):
        phase.check_fit(n_workers=1, can_grow=False)
    phase.check_fit(n_workers=1, can_grow=True)  # a cluster that may grow: only a warning
    terminal = _Phase(cfg, 1, make_spec(), backends(), RolloutConfig(), log)
    terminal.check_fit(n_workers=1, can_grow=False)  # no scorer: 1 + 1 = 2 CPUs fit
    log.close()
    from pipeline.runlog import read_log

    assert [r["event"] for r in read_log(tmp_path / "log.jsonl")] == ["rollouts.resources"]
