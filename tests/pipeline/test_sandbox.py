"""SandboxPool semantics: incremental states (parent visible, siblings not, rebuild-on-miss identical),
the Executor / Future surfaces, LRU and release, and recovery from dead processes. Real processes, no fakes.
"""

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import as_completed

import psutil
import pytest

from mcts.protocols import ExecRequest
from pipeline.sandbox import SandboxConfig, SandboxPool, run_code

# Warm modules trimmed to math: these tests are about state, not imports, and each pool starts faster.
FAST = {"warm_modules": ("math", "fractions"), "timeout": 5.0}


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(SandboxConfig(workers=2, max_live_states=64, **FAST)) as p:
        yield p


def req(tree, node, parent, code, history=()):
    return ExecRequest(tree_id=tree, node_key=node, parent_key=parent, history=tuple(history), code=code)


def _wait_gone(pids, seconds=3.0):
    """Pids still alive (zombies count as gone) after waiting up to ``seconds``."""
    deadline = time.monotonic() + seconds
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _running(p)]
        time.sleep(0.05)
    return alive


def _running(pid: int) -> bool:
    try:  # a process may exit between any two looks at it
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_parent_state_is_visible_to_child(pool):
    a_code = "import math\nx = 3\ndef sq(v):\n    return v * v\nprint(x)"
    a, b = pool.run([req("vis", "a", None, a_code)]) + pool.run(
        [req("vis", "b", "a", "print(sq(x) + math.floor(2.5))", [a_code])]
    )
    assert a.ok and a.stdout == "3\n"
    assert b.ok, b.error
    assert b.stdout == "11\n"  # sq(3) + floor(2.5) = 9 + 2
    assert b.replayed == 0  # forked from a's live state, nothing re-executed


def test_sibling_and_other_tree_names_are_invisible(pool):
    pool.run([req("sib", "root", None, "x = 1")])
    b1, b2 = pool.run([req("sib", "b1", "root", "y = 2", ["x = 1"]), req("sib", "b2", "root", "z = 3", ["x = 1"])])
    assert b1.ok and b2.ok
    [probe] = pool.run([req("sib", "c", "b2", "print('y' in globals(), x, z)", ["x = 1", "z = 3"])])
    assert probe.stdout == "False 1 3\n"  # sibling b1's y is absent; ancestors' x and z are there
    [other] = pool.run([req("other-tree", "r", None, "print([k for k in globals() if not k.startswith('__')])")])
    assert other.stdout == "[]\n"  # a fresh interpreter: no names from any tree, no pre-imported modules


def test_rebuild_on_miss_gives_the_same_result(pool):
    # random draws depend on the interpreter state, so they show whether the rebuilt state is the same one.
    codes = [
        "import random\nr = random.random()",
        "s = [random.randint(0, 10**9) for _ in range(3)]",
        "print(r, s, {'b', 'a', 'c'})",
    ]
    hit = pool.run([req("rb", "n1", None, codes[0])])
    hit += pool.run([req("rb", "n2", "n1", codes[1], codes[:1])])
    hit += pool.run([req("rb", "n3", "n2", codes[2], codes[:2])])
    assert all(r.ok for r in hit) and [r.replayed for r in hit] == [0, 0, 0]
    pool.release("rb")
    [miss] = pool.run([req("rb", "n3", "n2", codes[2], codes[:2])])
    assert miss.ok, miss.error
    assert miss.replayed == 2  # n1 and n2 re-executed in a fresh interpreter, then n3
    assert miss.stdout == hit[2].stdout


def test_failed_step_leaves_no_state(pool):
    [bad] = pool.run([req("fail", "a", None, "x = 1\n1 / 0")])
    assert (bad.ok, bad.error_kind, bad.error) == (False, "runtime", "ZeroDivisionError: division by zero")
    # A child of the failed node cannot fork from it: the pool rebuilds from the history it is given.
    [child] = pool.run([req("fail", "b", "a", "print(x)", ["x = 1"])])
    assert child.ok and child.stdout == "1\n" and child.replayed == 1


def test_child_submitted_with_running_parent_forks_from_it(pool):
    fa = pool.submit(req("wait", "a", None, "import time\ntime.sleep(0.3)\nv = 41"))
    fb = pool.submit(req("wait", "b", "a", "print(v + 1)", ["import time\ntime.sleep(0.3)\nv = 41"]))
    assert fa.result().ok
    b = fb.result()
    assert b.stdout == "42\n" and b.replayed == 0  # it waited for a instead of replaying a's sleep


def test_run_returns_results_in_request_order_and_futures_complete(pool):
    codes = [f"import time\ntime.sleep({0.2 if i % 2 == 0 else 0.0})\nprint({i})" for i in range(6)]
    results = pool.run([req("order", f"n{i}", None, c) for i, c in enumerate(codes)])
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(6)]
    futures = [pool.submit(req("order2", f"n{i}", None, c)) for i, c in enumerate(codes)]
    assert sorted(f.result().stdout for f in as_completed(futures, timeout=30)) == sorted(r.stdout for r in results)


def test_arun_for_async_callers(pool):
    results = asyncio.run(pool.arun([req("async", "a", None, "print(1)"), req("async", "b", None, "print(2)")]))
    assert [r.stdout for r in results] == ["1\n", "2\n"]


def test_output_is_captured_and_capped(pool):
    r = pool.run_code("import sys\nprint('x' * 10000)\nprint('warn', file=sys.stderr)")
    assert r.ok
    assert r.stdout.startswith("x" * 4096)
    assert r.stdout.endswith("\n...[truncated 5905 chars]")  # 10000 x's + newline = 10001 written, 4096 kept
    assert r.stderr == "warn\n"


def test_error_kinds_come_from_exceptions(pool):
    assert pool.run_code("x = (").error_kind == "syntax"
    assert pool.run_code("print('error')\nprint('Traceback')").ok  # words in output are not errors
    r = pool.run_code("raise ValueError('bad value')")
    assert (r.error_kind, r.error) == ("runtime", "ValueError: bad value")
    r = pool.run_code("import sys\nsys.exit(2)")
    assert (r.error_kind, r.error) == ("exit", "SystemExit: 2")


def test_replay_failure_is_reported_as_replay(pool):
    [r] = pool.run([req("replay", "b", "gone", "print(1)", ["1 / 0"])])
    assert r.error_kind == "replay" and "history step 1 of 1" in r.error and "ZeroDivisionError" in r.error


def test_oversized_request_is_rejected_without_running():
    with SandboxPool(SandboxConfig(workers=1, max_code_bytes=1024, **FAST)) as p:
        r = p.run_code("x = 1\n" * 400)  # 2400 bytes of code
        assert r.error_kind == "input" and "max_code_bytes is 1024" in r.error


def test_timeout_can_be_set_per_submission(pool):
    r = pool.submit_code("import time\ntime.sleep(5)", timeout=0.3).result()
    assert r.error_kind == "timeout" and r.error == "Timeout: 0.3s"


def test_lru_evicts_and_release_frees_states():
    with SandboxPool(SandboxConfig(workers=1, max_live_states=2, **FAST)) as p:
        p.run([req("t", "a", None, "a = 1"), req("t", "b", None, "b = 2"), req("t", "c", None, "c = 3")])
        s = p.stats()
        assert (s["live_states"], s["evictions"]) == (2, 1)  # a, the least recently used, was killed
        [r] = p.run([req("t", "a2", "a", "print(a)", ["a = 1"])])
        assert r.stdout == "1\n" and r.replayed == 1  # a was rebuilt
        states = p.processes()["states"]
        p.release("t")
        assert p.stats()["live_states"] == 0
        assert _wait_gone(states) == []


def test_dead_state_is_rebuilt_and_dead_zygote_replaced():
    with SandboxPool(SandboxConfig(workers=1, **FAST)) as p:
        p.run([req("t", "a", None, "v = 7")])
        [state_pid] = p.processes()["states"]
        os.kill(state_pid, signal.SIGKILL)
        [r] = p.run([req("t", "b", "a", "print(v)", ["v = 7"])])
        assert r.stdout == "7\n" and r.replayed == 1
        zygote = p.processes()["zygote"]
        os.kill(zygote, signal.SIGKILL)
        r = p.run_code("print('still serving')")
        assert r.stdout == "still serving\n"
        assert p.stats()["restarts"] == 1 and p.processes()["zygote"] != zygote


def test_close_kills_every_process_and_removes_scratch():
    p = SandboxPool(SandboxConfig(workers=1, **FAST))
    p.run([req("t", "a", None, "x = 1"), req("t", "b", "a", "y = 2", ["x = 1"])])
    procs = p.processes()
    p.close()
    assert _wait_gone([procs["zygote"], *procs["states"]]) == []
    assert not os.path.exists(procs["scratch"])
    with pytest.raises(RuntimeError, match="closed"):
        p.submit_code("print(1)")
    p.close()  # idempotent


def test_scratch_directory_is_private_and_writable(pool):
    r = pool.run_code("import os\nopen('note.txt', 'w').write('hi')\nprint(open('note.txt').read(), os.listdir('.'))")
    assert r.ok and r.stdout == "hi ['note.txt']\n"
    r2 = pool.run_code("import os\nprint(os.listdir('.'))")
    assert r2.stdout == "[]\n"  # another execution does not see it


def test_module_level_run_code():
    r = run_code("print(2 + 3)")
    assert (r.ok, r.stdout) == (True, "5\n")
    assert run_code("1/0").error == "ZeroDivisionError: division by zero"


def test_unencodable_output_is_stored_as_replacement_characters(pool):
    # Issue 14: a lone surrogate in stdout made trees_to_table raise UnicodeEncodeError and failed the worker.
    from mcts.serialize import table_to_trees, trees_to_table
    from mcts.steps import Step
    from mcts.tree import Tree, TreeInfo

    r = pool.run_code(
        "import sys\nprint(chr(0xD800), 'x')\nprint(chr(0xDFFF), file=sys.stderr)\nraise ValueError(chr(0xDC00))"
    )
    assert (r.stdout, r.stderr, r.error) == ("\ufffd x\n", "\ufffd\n", "ValueError: \ufffd")
    tree = Tree(TreeInfo("p", "q?", "1", 1, "terminal", 1.0, 0))
    tree.add_child(1, 0, Step(text="t", reasoning="", code="print(1)", answer=None), r.stdout, "open")
    [back] = table_to_trees(trees_to_table([tree]))
    assert back.nodes[1].stdout == "\ufffd x\n"


def test_scratch_of_a_killed_pool_is_swept_by_the_next(tmp_path):
    from pipeline.sandbox import procs as sandbox_procs

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", "from pipeline.sandbox import procs; print(procs.scratch_prefix())"],
                         cwd=root, capture_output=True, text=True, check=True)
    dead = tempfile.mkdtemp(prefix=out.stdout.strip(), dir=tmp_path)  # its process has exited
    os.makedirs(os.path.join(dead, "root"))
    alive = tempfile.mkdtemp(prefix=sandbox_procs.scratch_prefix(), dir=tmp_path)
    legacy = tempfile.mkdtemp(prefix="open-rstar-sandbox-", dir=tmp_path)  # named before pids were in names
    pid = os.path.basename(dead).split("-")[4]
    elsewhere = tmp_path / f"open-rstar-sandbox-1-{pid}-7-abc"  # another PID namespace: its pids are not ours
    elsewhere.mkdir()
    assert sandbox_procs.sweep_stale_scratch(str(tmp_path)) == [dead]
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in (alive, legacy, elsewhere))


def test_pool_names_its_scratch_after_its_process(pool):
    from pipeline.sandbox import procs as sandbox_procs

    assert os.path.basename(pool.processes()["scratch"]).startswith(sandbox_procs.scratch_prefix())
