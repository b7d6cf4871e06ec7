"""Connect to a Ray cluster, or start a local one, and shut down only what we started.

Three ways a run meets Ray:

* ``ray job submit --working-dir . -- python round.py ...``: the job supervisor sets ``RAY_ADDRESS`` and
  ships the working dir; the driver joins with ``ray.init()`` and must not pass a runtime env of its own
  (Ray refuses to merge a second ``working_dir`` into the job's).
* ``RAY_ADDRESS=... python round.py`` or ``ray.address: auto`` in the config, outside a submitted job: the
  driver joins and ships this repository as the job's ``working_dir`` so workers on other nodes can import it.
* Neither: a local cluster is started in-process (``ray.init(num_cpus=..., include_dashboard=False)``) with
  token auth off (``RAY_AUTH_MODE=disabled``: a throwaway loopback cluster has nobody to keep out, and a
  token would have to be provisioned first). Workers start from this interpreter, and the repository root
  is put on their ``PYTHONPATH`` so they import the same code as the driver wherever it was started from.

The working dir upload skips what a job never needs (``JOB_EXCLUDES``: the virtualenv, run outputs, caches,
git objects); Ray also honours ``.gitignore``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.config import RayConfig

REPO_ROOT = Path(__file__).resolve().parent.parent

# Paths (gitignore syntax, relative to the working dir) never uploaded with a job.
JOB_EXCLUDES: tuple[str, ...] = (
    ".git", ".venv", "runs", ".cache", "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache", "*.egg-info",
)

# Set by Ray's job supervisor in the environment of a submitted job's entrypoint.
_JOB_ENV_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"


class ResourceError(RuntimeError):
    """The cluster cannot hold what the config asks for; the message names the resource, the ask and the supply."""


@dataclass(frozen=True)
class Cluster:
    """The Ray connection a run is using. Also a context manager: ``with connect(cfg.ray) as cluster:``
    disconnects on exit if (and only if) this ``connect`` call made the connection."""

    address: str  # the GCS address of the cluster
    started: bool  # this process started a local cluster (it goes away with the connection)
    joined_job: bool  # inside a ``ray job submit`` job (the job owns the runtime env)
    owned: bool = True  # this connect() call ran ray.init; False when Ray was already initialised

    def describe(self) -> str:
        if self.started:
            return f"local Ray cluster started in-process ({self.address})"
        return f"joined Ray cluster at {self.address}" + (" (submitted job)" if self.joined_job else "")

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        disconnect(self)


# The connection this process made (None: none, or Ray was initialised by someone else).
_CURRENT: Cluster | None = None


def job_runtime_env(working_dir: str | Path = ".") -> dict[str, Any]:
    """The runtime env a job needs: the repository as ``working_dir``, minus what it never needs."""
    return {"working_dir": str(working_dir), "excludes": list(JOB_EXCLUDES)}


def job_submit_command(address: str, entrypoint: list[str], working_dir: str | Path = ".") -> list[str]:
    """argv for ``ray job submit`` of ``entrypoint`` with this repository as the working dir (excludes set)."""
    return ["ray", "job", "submit", "--address", address, "--working-dir", str(working_dir),
            "--runtime-env-json", json.dumps({"excludes": list(JOB_EXCLUDES)}), "--", *entrypoint]


def resolve_address(cfg: RayConfig, env: Mapping[str, str]) -> str:
    """The cluster to join ('' = start a local one): the config's address wins over ``RAY_ADDRESS``."""
    return cfg.address or env.get("RAY_ADDRESS", "")


def connect(cfg: RayConfig, env: Mapping[str, str] | None = None, log: Any = None) -> Cluster:
    """Join or start Ray as described in the module doc; ``log`` (a ``RunLog``) records which.

    Idempotent: when Ray is already initialised (a test fixture, a notebook, an outer ``connect``) that
    connection is used and left alone on exit. The actors' output is forwarded to this process (a run's console
    sends it to RUN_DIR/libraries.log, ``pipeline.console``).
    """
    import ray

    global _CURRENT
    env = os.environ if env is None else env
    in_job = _JOB_ENV_VAR in env
    if ray.is_initialized():
        # One connection per process: reuse it, and keep knowing whether we started it (a cluster we started
        # cannot grow, so an ask it cannot hold fails at once instead of waiting out a timeout).
        if _CURRENT is not None:
            return dataclasses.replace(_CURRENT, owned=False)
        return Cluster(address=_gcs_address(), started=False, joined_job=in_job, owned=False)
    elif address := resolve_address(cfg, env):
        kwargs: dict[str, Any] = {"address": address, "log_to_driver": True}
        if not in_job:
            kwargs["runtime_env"] = job_runtime_env(REPO_ROOT)
        try:
            ray.init(**kwargs)
        except ConnectionError as e:
            raise RuntimeError(
                f"ray.address={address!r}: cannot reach a Ray cluster there ({e}). Start one with "
                f"`ray start --head`, fix ray.address / RAY_ADDRESS, or leave both empty for a local cluster."
            ) from e
        cluster = Cluster(address=_gcs_address(), started=False, joined_job=in_job)
    else:
        # A local cluster's daemons inherit this process's environment: set the auth mode before they start.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(
            num_cpus=cfg.num_cpus or None,
            include_dashboard=cfg.include_dashboard,
            runtime_env={"env_vars": {"PYTHONPATH": _pythonpath_with_repo()}},
            log_to_driver=True,
        )
        cluster = Cluster(address=_gcs_address(), started=True, joined_job=False)
    _CURRENT = cluster
    if log is not None:
        log.info("ray.connect", cluster=cluster.describe(), resources=ray.cluster_resources())
    return cluster


def disconnect(cluster: Cluster) -> None:
    """Undo ``connect``: shut down a local cluster we started, or drop our connection to a joined one.
    A connection this ``connect`` did not make (``owned=False``) is left alone."""
    import ray

    global _CURRENT
    if cluster.owned and ray.is_initialized():
        ray.shutdown()
    if cluster.owned:
        _CURRENT = None


@contextmanager
def ray_cluster(cfg: RayConfig, env: Mapping[str, str] | None = None, log: Any = None) -> Iterator[Cluster]:
    """``with ray_cluster(cfg.ray) as cluster:`` the same as ``with connect(cfg.ray) as cluster:``."""
    cluster = connect(cfg, env, log)
    try:
        yield cluster
    finally:
        disconnect(cluster)


def rollout_needs(cfg: RayConfig, workers: int, scorers: int) -> dict[str, float]:
    """CPUs and GPUs the actors of one rollout phase reserve: engines, PPM scorers and rollout workers."""
    return {"CPU": cfg.policy_engines * cfg.cpus_per_engine + scorers * cfg.cpus_per_scorer
            + workers * cfg.cpus_per_worker,
            "GPU": cfg.policy_engines * cfg.gpus_per_engine + scorers * cfg.gpus_per_scorer}


def shortfall(cfg: RayConfig, workers: int, scorers: int, have: Mapping[str, float]) -> str | None:
    """None when the actors fit in ``have`` (e.g. ``ray.cluster_resources()``); else one sentence naming each
    short resource, the config keys that ask for it, the amount asked and what the cluster has."""
    need = rollout_needs(cfg, workers, scorers)
    short = {k: (v, float(have.get(k, 0.0))) for k, v in need.items() if v > float(have.get(k, 0.0)) + 1e-9}
    if not short:
        return None
    what = ", ".join(f"{v:g} {k} needed, {h:g} in the cluster" for k, (v, h) in short.items())
    scorer = (f" + {scorers} PPM scorer x (ray.cpus_per_scorer={cfg.cpus_per_scorer:g}, "
              f"ray.gpus_per_scorer={cfg.gpus_per_scorer:g})" if scorers else "")
    return (f"{cfg.policy_engines} policy engine(s) x (ray.cpus_per_engine={cfg.cpus_per_engine:g}, "
            f"ray.gpus_per_engine={cfg.gpus_per_engine:g}){scorer} + {workers} rollout worker(s) "
            f"x ray.cpus_per_worker={cfg.cpus_per_worker:g}: {what}")


def check_resources(cfg: RayConfig, cluster: Cluster, workers: int, scorers: int, log: Any = None) -> None:
    """Fail at once (``ResourceError``) when a cluster this process started cannot hold the run's actors: it will
    never grow, and Ray would otherwise leave them pending until ``rollouts.startup_timeout_s``. A joined
    cluster may grow (an autoscaler adds nodes): there the shortfall is logged as a warning."""
    import ray

    why = shortfall(cfg, workers, scorers, ray.cluster_resources())
    if why is None:
        return
    if cluster.started:
        raise ResourceError(f"{why}. Lower those (fractions are fine: they only reserve scheduling slots) or "
                            f"raise ray.num_cpus (0 = all cores of this machine).")
    if log is not None:
        log.warning("ray.resources", reason=why + "; waiting for the cluster to grow")


def _pythonpath_with_repo() -> str:
    parts = [str(REPO_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(parts))


def _gcs_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address
