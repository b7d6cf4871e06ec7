"""SandboxConfig validation, the ExecResult record, and how a wait status reads as an error (no processes)."""

import signal

import pytest

from pipeline.sandbox.config import SandboxConfig
from pipeline.sandbox.result import ERROR_KINDS, ExecResult, describe_exit, failure, truncation_marker


def test_defaults_are_valid():
    c = SandboxConfig()
    assert c.workers >= 1 and c.timeout > 0 and c.output_limit_bytes >= c.stdout_bytes


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"workers": 0}, "workers=0: must be >= 1"),
        ({"timeout": 0.0}, "timeout=0.0: must be a positive finite"),
        ({"timeout": float("inf")}, "timeout=inf"),
        ({"timeout": float("nan")}, "timeout=nan"),
        ({"memory_mb": 100}, "memory_mb=100: must be >= 256"),
        ({"file_size_mb": 0}, "file_size_mb=0"),
        ({"stdout_bytes": 10}, "stdout_bytes=10"),
        ({"stdout_bytes": 4096, "output_limit_bytes": 100}, "output_limit_bytes=100: must be >= stdout_bytes (4096)"),
        ({"max_live_states": -1}, "max_live_states=-1"),
        ({"max_code_bytes": 10}, "max_code_bytes=10"),
        ({"user": " "}, "user=' '"),
        ({"warm_modules": ("math", "")}, "warm_modules="),
        ({"startup_timeout": 0}, "startup_timeout=0"),
        ({"isolation": "none"}, "isolation='none': must be 'kernel' or 'process'"),
        ({"scratch_mb": 0}, "scratch_mb=0"),
        ({"memory_budget_mb": -1}, "memory_budget_mb=-1"),
    ],
)
def test_bad_values_name_the_field_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SandboxConfig(**kwargs)


def test_result_ok_and_error_must_agree():
    with pytest.raises(ValueError, match="ok=True with error="):
        ExecResult(ok=True, error="ZeroDivisionError: division by zero", error_kind="runtime")
    with pytest.raises(ValueError, match="error_kind='bogus'"):
        ExecResult(ok=False, error="x", error_kind="bogus")
    r = failure("timeout", "Timeout: 1s", duration=1.5, replayed=2)
    assert (r.ok, r.error_kind, r.duration, r.replayed) == (False, "timeout", 1.5, 2)
    assert r.error_kind in ERROR_KINDS


def test_describe_exit_reads_wait_statuses():
    # waitpid status: signal number in the low 7 bits, exit code in bits 8-15.
    assert describe_exit(signal.SIGSEGV) == ("killed", "Killed: signal 11 (SIGSEGV)")
    assert describe_exit(signal.SIGKILL) == ("killed", "Killed: signal 9 (SIGKILL)")
    assert describe_exit(3 << 8) == ("killed", "Killed: exited with status 3 without a result")  # 768
    assert describe_exit(signal.SIGXCPU)[0] == "timeout"  # the CPU rlimit
    assert describe_exit(None)[0] == "killed"


def test_truncation_marker_counts_dropped_chars():
    assert truncation_marker(10) == "\n...[truncated 10 chars]"


def test_lone_surrogates_become_replacement_characters():
    # print(chr(0xD800)) in a step: a str Python holds but UTF-8 cannot encode. Each surrogate -> U+FFFD.
    r = ExecResult(
        ok=False, error="ValueError: \ud800", error_kind="runtime", stdout="a\ud800b\udfff\n", stderr="\udc80"
    )
    assert (r.stdout, r.stderr, r.error) == ("a\ufffdb\ufffd\n", "\ufffd", "ValueError: \ufffd")
    r.stdout.encode("utf-8")  # strict: raises if anything unencodable is left
    assert ExecResult(ok=True, stdout="é \U0001f600").stdout == "é \U0001f600"  # valid text is untouched
