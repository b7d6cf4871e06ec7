"""What one evaluation measures and when: the ``eval:`` section of the run config, and the parameter type of
``rounds.evaluate.evaluate`` itself (one type for both, so a budget is named once)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EvalConfig:
    enabled: bool = True
    base_model: bool = True  # evaluate the untrained bootstrap policy as round 0
    maj_k: int = 8  # samples for maj@k
    best_of_n: int = 8  # samples scored by the PPM for best-of-N
    mcts_rollouts: int = 8  # PPM-guided test-time MCTS rollouts per problem
    mcts_children: int = 4
    # Rounds (0 = the base model) that get the full evaluation (maj@k, PPM best-of-N, PPM-guided MCTS);
    # every other round measures greedy pass@1 only. None: every round. A CPU preset sets [0, 4].
    full_rounds: list[int] | None = None
    # Extra test-time strategies from the registry (rounds.strategies), 'NAME@BUDGET', e.g. [beam@8, dvts@8]:
    # measured in the full evaluations beside the four metrics, exactly as `python -m pipeline solve` runs them.
    strategies: tuple[str, ...] = ()
    # Chains (greedy and sampled) in flight at once, each on its own (mcts.wave.run_lanes) instead of in waves
    # that wait for their slowest chain; 0: waves. Only where the engine batches concurrent callers (the
    # transformers backend, vllm_async). Faster where one chain's steps are the critical path, but under bf16 a row's bits
    # depend on what it is batched with, and lanes batch by timing: a rerun need not repeat (README, "Evaluation
    # in lanes"). Waves batch alike every run.
    chain_lanes: int = 0

    def __post_init__(self) -> None:
        for name in ("maj_k", "best_of_n", "mcts_rollouts", "mcts_children"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}: must be an integer >= 1")
        if not isinstance(self.chain_lanes, int) or isinstance(self.chain_lanes, bool) or self.chain_lanes < 0:
            raise ValueError(f"chain_lanes={self.chain_lanes!r}: must be an integer >= 0 (0: chains advance in waves)")
        from rounds.solve import parse_spec

        for spec in self.strategies:
            try:
                parse_spec(spec)
            except ValueError as e:
                raise ValueError(f"strategies={list(self.strategies)}: {e}") from None
        if self.full_rounds is not None and any(r < 0 for r in self.full_rounds):
            raise ValueError(f"full_rounds={self.full_rounds}: round numbers must be >= 0 (0 = the base model)")

    def budgets(self) -> dict:
        """The sample and search budgets as ``eval.json`` stores them (``strategies`` only when some are asked)."""
        out = {"maj_k": self.maj_k, "best_of_n": self.best_of_n, "mcts_rollouts": self.mcts_rollouts,
               "mcts_children": self.mcts_children}
        if self.strategies:
            out["strategies"] = list(self.strategies)
        return out
