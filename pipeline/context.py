"""What every phase of a round is given (``RoundContext``) and the few helpers the phases, the evaluation and the
CLI share: the run's model lineage, its problems, the prompt builders, where heavy work runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rounds.schedule import Lineage, RoundSpec

if TYPE_CHECKING:
    from pipeline.config import RunConfig
    from pipeline.runlog import RunLog
    from pipeline.storage import RunDir


@dataclass
class RoundContext:
    cfg: RunConfig
    run: RunDir
    round_no: int  # 1-based
    log: RunLog
    problems: list  # the round's training problems (data.Problem)
    eval_problems: list  # held-out, never trained on
    console: Any = None  # pipeline.console.Console: the phase's live display (None: none)

    @property
    def spec(self) -> RoundSpec:
        return self.cfg.rounds.schedule[self.round_no - 1]

    @property
    def dir(self) -> Path:
        return self.run.round_dir(self.round_no)

    @property
    def lineage(self) -> Lineage:
        return run_lineage(self.cfg, self.run)


def run_lineage(cfg: RunConfig, run: RunDir) -> Lineage:
    """The run's ``rounds.schedule.Lineage``: its schedule, the models it starts from, its checkpoints."""
    e = cfg.engines
    return Lineage(cfg.rounds.schedule, run, base_policy=e.policy_model, bootstrap=e.bootstrap_model or e.policy_model,
                   base_ppm=e.ppm_model or e.policy_model, ppm_init=cfg.training.ppm_init)


def load_run_problems(cfg: RunConfig, run: RunDir, log: RunLog) -> tuple[list, list]:
    """(training problems, held-out problems) of the run; rejected rows are reported in the run directory."""
    from data import load_problems_config

    train, held_out = load_problems_config(cfg.problems, rejected_dir=run.root)
    log.info("problems_loaded", train=len(train), held_out=len(held_out), source=cfg.problems.source)
    return train, held_out


def cache_dir(cfg: RunConfig) -> Path | None:
    return Path(cfg.storage.cache_dir).expanduser() if cfg.storage.cache_dir else None


def prompt_builder(cfg: RunConfig, few_shot: bool):
    from pipeline.engines import prompt_builder as build

    return build(cfg.engines.policy_model, few_shot=few_shot, n_examples=cfg.engines.few_shot_examples,
                 cache_dir=cache_dir(cfg), examples=cfg.engines.examples)


def prompt_fn(model: str, few_shot: bool) -> Callable[[str, str], str]:
    from pipeline.engines import prompt_builder as build

    return build(model, few_shot=few_shot).build


def on_accelerators(cfg: RunConfig, run: RunDir, fn: Callable, *args: Any, writes: Path | None = None,
                    compute_thread: bool = False, **kwargs: Any) -> Any:
    """Run a training or evaluation function where the accelerators are: in-process on a CPU-only run, as a Ray
    task with a GPU otherwise (the driver of a cluster job usually sits on a CPU-only head node). ``writes``: the
    directory of the run ``fn`` writes (a checkpoint). The task may run on another node: on object storage its
    paths of the run travel through the store (``RunDir.ship``), and ``writes`` is fetched when it returns.
    ``compute_thread``: in-process, ``fn`` runs on the engines' compute thread (``pipeline.engines.compute``), for
    work that is all model compute (training): computed on the main thread instead, it would leave an OpenMP team
    there that makes every later engine of the process (the round's evaluation) 1.4-1.7x slower. Not for
    functions that call engines and wait for them (evaluation): those would wait on their own thread."""
    gpus = cfg.ray.gpus_per_engine
    if not gpus:
        if compute_thread:
            from pipeline.engines import compute

            return compute.run(fn, *args, **kwargs)
        return fn(*args, **kwargs)
    import ray

    from pipeline.storage.shipping import call_shipped

    task = ray.remote(num_gpus=max(1.0, gpus), num_cpus=1)(call_shipped).options(name=getattr(fn, "__name__", "task"))
    result = ray.get(task.remote(run.ship(fn, *args, writes=writes, **kwargs)))
    if writes is not None:
        run.fetch(writes)
    return result


def parquet_rows(path: Path) -> int:
    if not path.is_file():
        return 0
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows
