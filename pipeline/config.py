"""The run config: one typed object composed of per-concept parts, loaded from a YAML preset plus overrides.

    cfg = load_config("configs/embedded.yaml", ["search.c_puct=1.5", "rounds.schedule.0.rollouts=4"])

The search's mode, rollouts and children are set per round (``rounds.schedule.N.q_mode / rollouts / children``)
and nowhere else: ``search.rollouts`` in a preset or ``--set`` is rejected with the key to use (``ROUND_OWNED``).

Each part is a frozen dataclass owned by the code it configures (problems -> ``data``, search -> ``mcts``,
sandbox / engines -> ``pipeline``, training / rounds -> ``rounds``); the parts that belong to orchestration
(storage, ray) are defined here; eval is ``rounds.eval_config``. ``load_config`` validates everything once, before any work starts,
and raises ``ConfigError`` with a one-line message naming the key, the value and what is allowed. It also
checks that local paths named by the config exist (the one I/O step, kept out of the dataclasses).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data import ProblemsConfig
from mcts.config import SearchConfig
from pipeline.confload import ConfigError, apply_override, build, diff, to_plain
from pipeline.engines.config import EngineConfig
from pipeline.sandbox import SandboxConfig
from rounds.eval_config import EvalConfig
from rounds.schedule import RoundsConfig, RoundSpec
from rounds.train_config import TrainingConfig


@dataclass(frozen=True)
class StorageConfig:
    runs_dir: str = "runs"  # a fresh run without --run-dir goes to runs_dir/<name>-<timestamp>
    # Finished trees are buffered and written as one shard when this many problems are done (and at the end
    # of a worker's batch): small shards bound what a crash can lose, large ones keep the file count down.
    shard_problems: int = 8
    cache_dir: str = ""  # model cache ('' = $OPEN_RSTAR_CACHE or ~/.cache/open-rstar)

    def __post_init__(self) -> None:
        if not self.runs_dir:
            raise ValueError("runs_dir='': must name a directory")
        if self.shard_problems < 1:
            raise ValueError(f"shard_problems={self.shard_problems}: must be >= 1")


@dataclass(frozen=True)
class RayConfig:
    # '' = start a local cluster in-process unless RAY_ADDRESS is set (as under `ray job submit`);
    # 'auto' or 'ray://host:port' joins an existing cluster.
    address: str = ""
    num_cpus: int = 0  # for a local cluster; 0 = all cores
    rollout_workers: int = 1  # rollout worker actors; problems are sharded across them
    policy_engines: int = 1  # policy engine actors (one per GPU, or per CPU slot)
    gpus_per_engine: float = 0.0
    cpus_per_engine: float = 1.0
    cpus_per_worker: float = 1.0
    # The PPM scorer actor of a PPM-guided round (one per round).
    cpus_per_scorer: float = 1.0
    gpus_per_scorer: float = 0.0
    max_restarts: int = 2  # actor restarts before a failure is final
    include_dashboard: bool = False

    def __post_init__(self) -> None:
        for name in ("rollout_workers", "policy_engines"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        for name in ("num_cpus", "max_restarts"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0")
        for name in ("gpus_per_engine", "cpus_per_engine", "cpus_per_worker", "cpus_per_scorer", "gpus_per_scorer"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0")


@dataclass(frozen=True)
class RolloutConfig:
    """Tunables of the rollout phase that are not resources (those are ``RayConfig``)."""

    # Tree groups per worker, each advanced by its own thread: while one group's generation batch is with
    # the engine, another group's code executes. 1 = strict alternation (no overlap); 2 is enough when
    # executing a wave takes no longer than generating one.
    groups: int = 2
    engine_retries: int = 3  # re-sends of a request whose engine actor died, before the phase fails
    retry_backoff_s: float = 0.5  # wait before the first re-send; doubles per attempt
    # For actors to start and load their models (a cold GPU model takes minutes); also how long a worker's requests
    # wait, in all, for an engine actor that Ray is restarting (not counted in engine_retries).
    startup_timeout_s: float = 900.0

    def __post_init__(self) -> None:
        if self.groups < 1:
            raise ValueError(f"groups={self.groups}: must be >= 1")
        if self.engine_retries < 0:
            raise ValueError(f"engine_retries={self.engine_retries}: must be >= 0")
        if self.retry_backoff_s < 0:
            raise ValueError(f"retry_backoff_s={self.retry_backoff_s}: must be >= 0")
        if not self.startup_timeout_s > 0:
            raise ValueError(f"startup_timeout_s={self.startup_timeout_s}: must be > 0")


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    seed: int = 0  # every seed in the run derives from this (mcts.seeds)
    problems: ProblemsConfig = field(default_factory=ProblemsConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    engines: EngineConfig = field(default_factory=EngineConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    rounds: RoundsConfig = field(default_factory=RoundsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    rollouts: RolloutConfig = field(default_factory=RolloutConfig)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"name={self.name!r}: must be a non-empty name without '/'")


# Search settings each round sets for itself: search.<key> -> rounds.schedule.N.<field>. The run config does not
# offer them at top level (one place per number: a round spec always overrode them, silently).
ROUND_OWNED: dict[str, str] = {"mode": "q_mode", "rollouts": "rollouts", "children": "children"}


def _round_owned_error(key: str, rounds: int) -> ConfigError:
    field_ = ROUND_OWNED[key]
    return ConfigError(f"search.{key}: set per round, not here; use rounds.schedule.N.{field_} "
                       f"(N = 0..{rounds - 1}), e.g. --set rounds.schedule.1.{field_}=...")


def _drop_round_owned(data: dict[str, Any], rounds: int) -> dict[str, Any]:
    """``data`` without search.mode / rollouts / children. A value equal to the search default is what earlier
    versions wrote into every run's config.yaml (it never took effect): dropped. Any other value: ConfigError."""
    search = data.get("search")
    if not isinstance(search, dict):
        return data
    defaults = SearchConfig()
    for key in ROUND_OWNED:
        if key in search:
            if search[key] != getattr(defaults, key):
                raise _round_owned_error(key, rounds)
            search = {k: v for k, v in search.items() if k != key}
    return {**data, "search": search}


def _plain(cfg: RunConfig) -> dict[str, Any]:
    """The config as YAML data, without the search keys the rounds own."""
    data = to_plain(cfg)
    data["search"] = {k: v for k, v in data["search"].items() if k not in ROUND_OWNED}
    return data


def _check_override_key(assignment: str, rounds: int) -> None:
    key = assignment.split("=", 1)[0].strip()
    parts = key.split(".")
    if len(parts) >= 2 and parts[0] == "search" and parts[1] in ROUND_OWNED:
        raise _round_owned_error(parts[1], rounds)


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~"))


def check_paths(cfg: RunConfig) -> None:
    """Local files and model directories named by the config must exist (hub ids and built-ins are not checked)."""
    models = {"engines.policy_model": cfg.engines.policy_model}
    for key in ("bootstrap_model", "ppm_model"):
        if hasattr(cfg.engines, key) and getattr(cfg.engines, key):
            models[f"engines.{key}"] = getattr(cfg.engines, key)
    for key, spec in models.items():
        if _looks_like_path(spec) and not (Path(spec).expanduser() / "config.json").is_file():
            raise ConfigError(f"{key}={spec!r}: no model there (expected a directory with config.json)")
    for key in ("source", "eval_source"):
        spec = getattr(cfg.problems, key, "")
        if spec and not spec.startswith("builtin:") and (_looks_like_path(spec) or Path(spec).suffix):
            if not Path(spec).expanduser().exists():
                raise ConfigError(f"problems.{key}={spec!r}: file not found")


def upgrade_legacy_keys(data: dict[str, Any], where: str) -> dict[str, Any]:
    """Rewrite keys that earlier versions wrote into a run's config.yaml, so an old run still resumes.

    - ``rounds.schedule[i].extra_rollouts_unsolved: N`` (N more rollouts for an unsolved problem, once) is the
      one-stage escalation ``unsolved_rollouts: [rollouts + N]`` (nothing when N is 0);
    - ``engines.ppm_max_length`` (the scorers' own truncation) is gone: the PPM's training length, recorded in
      its checkpoint, is the one truncation both training and scoring use now.
    Each rewrite is reported as a warning naming the file.
    """
    import warnings

    schedule = (data.get("rounds") or {}).get("schedule") or []
    for i, spec in enumerate(schedule):
        if isinstance(spec, dict) and "extra_rollouts_unsolved" in spec and "unsolved_rollouts" not in spec:
            extra = spec.pop("extra_rollouts_unsolved")
            base = spec.get("rollouts", RoundSpec.__dataclass_fields__["rollouts"].default)
            if isinstance(extra, int) and isinstance(base, int):
                spec["unsolved_rollouts"] = [base + extra] if extra > 0 else []
                warnings.warn(f"{where}: rounds.schedule[{i}].extra_rollouts_unsolved={extra} read as "
                              f"unsolved_rollouts={spec['unsolved_rollouts']} (the key was renamed)", stacklevel=2)
            else:  # not a number: leave it for validation to name
                spec["extra_rollouts_unsolved"] = extra
    engines = data.get("engines")
    if isinstance(engines, dict) and "ppm_max_length" in engines:
        old = engines.pop("ppm_max_length")
        warnings.warn(f"{where}: engines.ppm_max_length={old} dropped: the PPM scores with the length it was "
                      "trained with (training.ppm.max_length)", stacklevel=2)
    return data


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML preset (None = defaults), apply ``KEY=VALUE`` overrides, validate, check paths."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config {path}: file not found")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"--config {path}: the top level must be a mapping of sections")
        data = upgrade_legacy_keys(loaded or {}, str(path))
    data = _drop_round_owned(data, _rounds_in(data))
    if overrides:
        # Overrides address the resolved tree so list items that only exist as defaults can be set.
        data = _merge(_plain(build(RunConfig, data)), data)
        for assignment in overrides:
            _check_override_key(assignment, _rounds_in(data))
            apply_override(data, assignment)
    cfg = build(RunConfig, data)
    check_paths(cfg)
    return cfg


def _rounds_in(data: dict[str, Any]) -> int:
    schedule = (data.get("rounds") or {}).get("schedule") if isinstance(data.get("rounds"), dict) else None
    return len(schedule) if isinstance(schedule, list) and schedule else RoundsConfig().count


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def dump_config(cfg: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(_plain(cfg), sort_keys=False)


def config_diff(stored_yaml: str, cfg: RunConfig) -> list[str]:
    import yaml

    stored = yaml.safe_load(stored_yaml) or {}
    try:
        stored = _drop_round_owned(stored, _rounds_in(stored))  # an earlier version's config.yaml holds them
    except ConfigError:
        pass  # a stored value that never took effect: shown in the diff as it is
    return diff(stored, _plain(cfg))


__all__ = ["RunConfig", "StorageConfig", "RayConfig", "RolloutConfig", "EvalConfig", "ConfigError", "load_config", "dump_config",
           "config_diff", "check_paths", "ROUND_OWNED"]
