"""The four-round schedule: one list of small round specs, each round's numbers in one place.

Round 1 bootstraps (the base model few-shot prompted writing whole solutions, or a stronger model),
terminal-guided. Round 2 uses the round-1 SFT policy, terminal-guided, more rollouts. Round 3 adds the
round-2 PPM to the search (PPM-augmented Q). Round 4 uses policy and PPM r3 and escalates the rollouts
of problems still unsolved (rStar-Math paper, round 4: 64, then 128 rollouts, with new random seeds). Every number is config; presets change them in YAML.

Model lineage (``Lineage``; every choice is config):
- the policy that searches round n is the bootstrap model in a 'bootstrap' round, else the newest policy trained
  before round n (round n-1's, or earlier if a round trained none); the PPM guiding a 'ppm' round likewise;
- the PPM of round n starts from round n's fine-tuned policy (``training.ppm_init="policy"``, rStar-Math paper,
  training setup: the policy is trained first, then the PPM from it), or from the base PPM backbone (``"base"``);
- a policy is used with the bootstrap round's generation mode and few-shot setting until a round fine-tuned one,
  then with the later rounds' (``policy_settings``, ``search_spec``);
- round 0 is the untrained bootstrap policy, evaluated for comparison.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol


@dataclass(frozen=True)
class RoundSpec:
    # Which policy generates: the bootstrap model (engines.bootstrap_model, or the base model), or the
    # SFT policy trained in the previous round.
    policy: Literal["bootstrap", "previous"] = "previous"
    # Q annotation: terminal-guided (+1/-1 from the grader) or PPM-augmented (Q initialised by the PPM).
    q_mode: Literal["terminal", "ppm"] = "terminal"
    rollouts: int = 16
    children: int = 8
    # Escalation stages for problems that no rollout solved yet: rollout budgets, each larger than the last
    # (rStar-Math round 4: (64, 128)). At stage i an unsolved tree that still has open nodes is extended to
    # unsolved_rollouts[i] rollouts in all; an exhausted one (nothing left to select) is replaced by a fresh
    # tree with a new derived seed and that many rollouts (``mcts.search.escalate``). () = no escalation.
    unsolved_rollouts: tuple[int, ...] = ()
    # "solution": one proposal is a whole solution, cut into steps (a weak bootstrap policy needs it);
    # "step": one proposal is one step (the MCTS way, once SFT has taught the format).
    gen_mode: Literal["step", "solution"] = "step"
    few_shot: bool = False
    # Problems searched this round (0 = all of problems.n); later rounds may add more.
    problems: int = 0
    train_policy: bool = True
    train_ppm: bool = True

    def __post_init__(self) -> None:
        if self.rollouts < 1:
            raise ValueError(f"rollouts={self.rollouts}: must be >= 1")
        if self.children < 1:
            raise ValueError(f"children={self.children}: must be >= 1")
        budgets = (self.rollouts, *self.unsolved_rollouts)
        for prev, nxt in zip(budgets, budgets[1:], strict=False):
            if not isinstance(nxt, int) or isinstance(nxt, bool) or nxt <= prev:
                raise ValueError(f"unsolved_rollouts={list(self.unsolved_rollouts)}: each stage must be an integer "
                                 f"larger than the one before (rollouts={self.rollouts} first), e.g. [64, 128]")
        if self.problems < 0:
            raise ValueError(f"problems={self.problems}: must be >= 0 (0 = all)")


def _default_schedule() -> list[RoundSpec]:
    return [
        RoundSpec(policy="bootstrap", q_mode="terminal", rollouts=8, children=5, gen_mode="solution", few_shot=True),
        RoundSpec(policy="previous", q_mode="terminal", rollouts=16, children=8),
        RoundSpec(policy="previous", q_mode="ppm", rollouts=16, children=8),
        RoundSpec(policy="previous", q_mode="ppm", rollouts=16, children=8, unsolved_rollouts=(64, 128)),
    ]


@dataclass(frozen=True)
class RoundsConfig:
    # Whether each round retrains from the base weights (rStar-Math) or continues: training.from_base.
    schedule: list[RoundSpec] = field(default_factory=_default_schedule)

    def __post_init__(self) -> None:
        if not self.schedule:
            raise ValueError("schedule=[]: must list at least one round")
        if self.schedule[0].policy == "previous":
            raise ValueError("schedule.0.policy='previous': round 1 has no previous policy; use 'bootstrap'")
        if self.schedule[0].q_mode == "ppm":
            raise ValueError("schedule.0.q_mode='ppm': round 1 has no trained PPM yet; use 'terminal'")
        for i, spec in enumerate(self.schedule):
            if spec.q_mode == "ppm" and i > 0 and not self.schedule[i - 1].train_ppm:
                raise ValueError(f"schedule.{i}.q_mode='ppm': round {i} trains no PPM (train_ppm=false)")

    @property
    def count(self) -> int:
        return len(self.schedule)


def parse_round_range(text: str, count: int) -> list[int]:
    """'1-4', '2', '3-' -> 1-based round numbers within 1..count; ValueError naming the problem otherwise."""
    text = text.strip()
    try:
        if "-" in text:
            lo_s, hi_s = text.split("-", 1)
            lo = int(lo_s) if lo_s else 1
            hi = int(hi_s) if hi_s else count
        else:
            lo = hi = int(text)
    except ValueError:
        raise ValueError(f"--rounds {text!r}: expected N or A-B, e.g. 1-4") from None
    if not (1 <= lo <= hi <= count):
        raise ValueError(f"--rounds {text!r}: rounds run 1..{count} in this config")
    return list(range(lo, hi + 1))


# ----------------------------------------------------------------------------------------------- lineage


class Checkpoints(Protocol):
    """Where round N's trained models go (``pipeline.storage.RunDir`` is one): a directory holding config.json."""

    def policy_dir(self, round_no: int) -> Path: ...

    def ppm_dir(self, round_no: int) -> Path: ...


def _newest(dir_of, upto: int) -> str | None:
    for r in range(upto, 0, -1):
        if (dir_of(r) / "config.json").is_file():
            return str(dir_of(r))
    return None


@dataclass(frozen=True)
class Lineage:
    """Which model searches, trains and guides each round: the schedule, the models the run starts from, and
    which rounds left a checkpoint (read when asked, so a resumed run sees what is on disk)."""

    schedule: Sequence[RoundSpec]
    checkpoints: Checkpoints
    base_policy: str  # the weights policy SFT starts from (engines.policy_model)
    bootstrap: str  # round 1's policy and round 0's evaluated model (engines.bootstrap_model, or the base policy)
    base_ppm: str  # the PPM backbone under ppm_init="base" (engines.ppm_model, or the base policy)
    ppm_init: Literal["policy", "base"] = "policy"

    def newest_policy(self, upto: int) -> str | None:
        """The newest trained policy checkpoint of rounds 1..upto, None when none was trained."""
        return _newest(self.checkpoints.policy_dir, upto)

    def newest_ppm(self, upto: int) -> str | None:
        return _newest(self.checkpoints.ppm_dir, upto)

    def search_policy(self, round_no: int) -> str:
        if self.schedule[round_no - 1].policy == "bootstrap":
            return self.bootstrap
        return self.newest_policy(round_no - 1) or self.bootstrap

    def search_ppm(self, round_no: int) -> str | None:
        return self.newest_ppm(round_no - 1) if self.schedule[round_no - 1].q_mode == "ppm" else None

    def ppm_backbone(self, round_no: int) -> str:
        """The model a new PPM head goes on: this round's fine-tuned policy (or the newest before it, or the base
        model when none was trained) under ``ppm_init="policy"``; the base PPM backbone under "base"."""
        if self.ppm_init == "policy":
            return self.newest_policy(round_no) or self.base_policy
        return self.base_ppm


def policy_settings(schedule: Sequence[RoundSpec], trained: bool) -> tuple[str, bool]:
    """(generation mode, few-shot) a policy is used with: the bootstrap round's settings for an untrained
    model, the later rounds' for an SFT policy (it learned the step format)."""
    spec = schedule[min(1, len(schedule) - 1)] if trained else schedule[0]
    return spec.gen_mode, spec.few_shot


def search_spec(schedule: Sequence[RoundSpec], spec: RoundSpec, policy_trained: bool) -> RoundSpec:
    """``spec`` as the round searches with it. A round that continues the previous policy when no earlier round
    fine-tuned one (none found a correct trajectory) searches with the bootstrap round's generation mode and
    few-shot examples: the model has not learned the step format, and without them it rarely writes it."""
    if spec.policy != "previous" or policy_trained:
        return spec
    mode, few_shot = policy_settings(schedule, trained=False)
    return dataclasses.replace(spec, gen_mode=mode, few_shot=few_shot)
