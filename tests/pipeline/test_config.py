"""Config loading: presets validate, overrides apply, and every kind of bad input is a one-line error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, RunConfig, config_diff, dump_config, load_config

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=[p.name for p in PRESETS])
def test_every_preset_validates(preset):
    cfg = load_config(preset)
    assert isinstance(cfg, RunConfig)
    assert cfg.rounds.count >= 1


def test_presets_exist():
    names = {p.name for p in PRESETS}
    assert {"embedded.yaml", "tiny.yaml"} <= names, names


def test_overrides_apply_and_parse_types(tmp_path):
    cfg = load_config(None, ["search.c_puct=1.5", "seed=7", "rounds.schedule.1.rollouts=3", "eval.enabled=false"])
    assert cfg.search.c_puct == 1.5
    assert cfg.seed == 7
    assert cfg.rounds.schedule[1].rollouts == 3
    assert cfg.eval.enabled is False


def test_dump_then_load_round_trips(tmp_path):
    cfg = load_config(None, ["seed=3", "rounds.schedule.2.children=2"])
    p = tmp_path / "config.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg
    assert config_diff(p.read_text(), cfg) == []
    changed = load_config(p, ["seed=4"])
    assert config_diff(p.read_text(), changed) == ["seed: 3 -> 4"]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["search.nonsense=1"], "search.nonsense: unknown key"),
        (["bogus.x=1"], "bogus: unknown key"),
        (["seed=abc"], "seed='abc': must be an integer"),
        (["eval.enabled=maybe"], "eval.enabled='maybe': must be true or false"),
        (["rounds.schedule.0.rollouts=0"], "rollouts=0: must be >= 1"),
        (["search.c_puct=-1"], "search.c_puct=-1"),
        (["ray.rollout_workers=0"], "ray.rollout_workers=0: must be >= 1"),
        (["eval.chain_lanes=-1"], "chain_lanes=-1: must be an integer >= 0"),
        (["engines.policy_model=./no/such/model"], "engines.policy_model='./no/such/model': no model there"),
        (["rounds.schedule.7.rollouts=3"], "rounds.schedule.7: is a list of 4"),
        (["rounds.schedule.0.q_mode=ppm"], "round 1 has no trained PPM"),
    ],
)
def test_bad_values_are_rejected_with_the_key(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    msg = str(err.value)
    assert expected.split(":")[0] in msg, msg
    assert "\n" not in msg, msg


def test_unknown_key_in_yaml_names_the_file_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"search": {"rolouts": 4}}))
    with pytest.raises(ConfigError, match=r"search\.rolouts: unknown key; allowed keys here: .*rollouts"):
        load_config(p)


@pytest.mark.parametrize(
    "content, expected",
    [
        ("search: {c_puct: [1, 2]}", "search.c_puct=[1, 2]"),
        ("search: {rollouts: 3}", "search.rollouts: set per round, not here; use rounds.schedule.N.rollouts"),
        ("- 1\n- 2\n", "top level must be a mapping"),
        ("search: {rollouts: 4\n", "not valid YAML"),
    ],
)
def test_round_py_rejects_bad_config_with_status_2_and_writes_nothing(tmp_path, content, expected):
    p = tmp_path / "bad.yaml"
    p.write_text(content)
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "round.py"), "--config", str(p), "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert not run_dir.exists()
    assert list(tmp_path.iterdir()) == [p]


def test_round_py_missing_config_file(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "round.py"), "--config", "nope.yaml"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "--config nope.yaml: file not found" in proc.stderr


@pytest.mark.parametrize("entry", [["round.py"], ["-m", "pipeline.resume"], ["-m", "pipeline"]])
def test_entry_points_answer_help_without_heavy_imports(entry):
    code = (
        "import runpy, sys; sys.argv = [sys.argv[0], '--help']\n"
        f"target = {entry!r}\n"
        "try:\n"
        "    runpy.run_module(target[1], run_name='__main__') if target[0] == '-m' else "
        "runpy.run_path(target[0], run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'trl', 'ray', 'vllm') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout
    assert "HEAVY []" in proc.stdout, proc.stdout


def test_a_config_written_before_the_renames_still_loads(tmp_path):
    """A run directory from an earlier version resumes: its config.yaml's renamed keys are read as the new ones."""
    import warnings

    old = {"rounds": {"schedule": [{"policy": "bootstrap", "rollouts": 2, "extra_rollouts_unsolved": 0},
                                   {"policy": "previous", "rollouts": 2, "extra_rollouts_unsolved": 1}]},
           "engines": {"policy_model": "tiny-random", "ppm_max_length": 2048}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_config(path)
    # extra_rollouts_unsolved: N meant N more rollouts once: one stage of rollouts + N = 2 + 1 = 3 in all.
    assert [s.unsolved_rollouts for s in cfg.rounds.schedule] == [(), (3,)]
    said = " ".join(str(w.message) for w in caught)
    assert "extra_rollouts_unsolved=1 read as unsolved_rollouts=[3]" in said and "ppm_max_length=2048 dropped" in said


@pytest.mark.parametrize("key, field", [("rollouts", "rollouts"), ("children", "children"), ("mode", "q_mode")])
def test_a_search_key_the_rounds_own_is_refused_with_the_key_to_use(key, field):
    # Every round spec sets its own rollouts / children / q_mode, so search.<key> would silently do nothing.
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "tiny.yaml", [f"search.{key}=3"])
    # tiny.yaml has 4 rounds: N = 0..3
    assert str(err.value) == (f"search.{key}: set per round, not here; use rounds.schedule.N.{field} (N = 0..3), "
                              f"e.g. --set rounds.schedule.1.{field}=..."), err.value
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"rounds.schedule.1.{field}=" + ("ppm" if key == "mode" else "3")])
    assert getattr(cfg.rounds.schedule[1], field) == ("ppm" if key == "mode" else 3)
    assert f"  {key}:" not in dump_config(cfg).split("search:")[1].split("sandbox:")[0]  # not offered in the dump


def test_round_py_exits_2_on_a_round_owned_key(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "round.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
         "--run-dir", str(tmp_path / "run"), "--set", "search.rollouts=3"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "use rounds.schedule.N.rollouts" in proc.stderr and not (tmp_path / "run").exists()


def test_a_run_config_written_with_the_search_defaults_still_loads_and_matches(tmp_path):
    # Earlier versions dumped search.mode/rollouts/children (always their defaults: the rounds overrode them).
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    old = yaml.safe_load(dump_config(cfg))
    old["search"].update(mode="terminal", rollouts=16, children=8)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old))
    assert load_config(path) == cfg
    assert config_diff(path.read_text(), cfg) == []


def test_round_py_names_missing_dependencies_and_what_to_do():
    sys.path.insert(0, str(ROOT))
    import round as entry

    assert entry.missing_dependencies(find=lambda name: None if name in ("ray", "trl") else object()) == ["ray", "trl"]
    assert entry.missing_dependencies() == []  # this interpreter is the project's environment
    msg = entry.dependency_error(["ray"])
    assert "cannot import ray" in msg and "ray start --head" in msg and "venv" in msg, msg


def test_round_py_under_a_python_without_the_project_exits_2_at_once(tmp_path):
    # The job of `ray job submit` runs the `python` on the head's PATH: a bare system Python here.
    bare = "/usr/bin/python3"
    if not Path(bare).is_file():
        pytest.skip(f"{bare}: no system Python to play the head's interpreter")
    proc = subprocess.run([bare, "-I", str(ROOT / "round.py"), "--config", "configs/tiny.yaml"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=60)
    if proc.returncode == 0 or "cannot import" not in proc.stderr:
        pytest.skip(f"{bare} has the project's dependencies installed")
    assert proc.returncode == 2 and proc.stderr.startswith("round.py: error: this Python"), proc.stderr
    assert "ray start --head" in proc.stderr
