"""The console (issue 18): one live display per phase, a summary line when it ends, library output in the run's
log files. Both modes are captured: a terminal (tqdm bars) and a pipe (plain lines at most every 10 s)."""

from __future__ import annotations

import io
import logging
import warnings

from pipeline.console import Console, duration, phase_summary
from pipeline.runlog import RunLog, read_log


class FakeClock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def plain(clock: FakeClock, verbose: bool = False) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(out, interactive=False, verbose=verbose, clock=clock, timestamps=lambda: "12:00:00", tick_s=None), out


def test_plain_mode_prints_a_bar_at_most_every_10_s_and_one_line_at_the_end():
    clock = FakeClock()
    console, out = plain(clock)
    bar = console.bar("round 1 rollouts", total=4, solved=True)
    clock.t = 4.0
    bar.update(solved=1, tokens=400)  # 4 s after the start: too soon for a line
    assert out.getvalue() == ""
    clock.t = 10.0
    bar.update(tokens=600)
    # 2 of 4 done in 10 s -> ETA 10 s / 2 x 2 left = 10 s; 1000 tokens / 10 s = 100 tok/s
    assert out.getvalue().splitlines() == [
        "12:00:00 round 1 rollouts: 2/4 problems, 1 solved, 100 tok/s, 10s elapsed, ETA 10s"]
    clock.t = 15.0
    bar.tick()  # 5 s after the last line: nothing
    clock.t = 20.0
    bar.tick()  # nothing new, but 10 s passed: a line (a phase busy for minutes is never silent)
    assert len(out.getvalue().splitlines()) == 2
    clock.t = 62.0
    bar.update(2, solved=1)
    bar.close()
    bar.close()  # once only
    lines = out.getvalue().splitlines()
    # the update at 62 s printed its line, then the summary: 4/4, 2 solved, 1000 tokens / 62 s = 16 tok/s
    assert lines[-1] == "12:00:00 round 1 rollouts done in 1m02s: 4/4 problems, 2 solved, 16 tok/s", lines
    assert len(lines) == 4


def test_terminal_mode_draws_a_tqdm_bar_and_ends_with_the_summary():
    out = io.StringIO()
    console = Console(out, interactive=True, min_redraw_s=0, tick_s=None)
    bar = console.bar("round 2 train policy", total=None, unit="step")
    bar.set_total(8, done=2)  # a resumed trainer: 2 of 8 steps already taken
    bar.update(1, loss=0.6931)
    text = out.getvalue()
    assert "round 2 train policy" in text and "3/8" in text and "loss 0.6931" in text, text
    bar.close("3 steps, final loss 0.6931")
    assert out.getvalue().rstrip().splitlines()[-1].startswith("round 2 train policy done in ")
    assert out.getvalue().rstrip().endswith(": 3 steps, final loss 0.6931")


def test_library_output_goes_to_the_log_file_unless_verbose(tmp_path):
    clock = FakeClock()
    console, out = plain(clock)
    path = tmp_path / "libraries.log"
    before = logging.getLogger("transformers").handlers[:]
    with console.quiet_libraries(path):
        warnings.warn("`past_key_values` is deprecated", FutureWarning, stacklevel=1)
        print({"loss": "0.6925", "grad_norm": "1.2"})  # what transformers' PrinterCallback does
        logging.getLogger("transformers.modeling_utils").warning("Loading weights took long")
        console.line("round 1 export done in 1s: sft 3 rows")
    kept = path.read_text()
    assert "past_key_values" in kept and "'loss': '0.6925'" in kept and "Loading weights took long" in kept, kept
    assert out.getvalue() == "12:00:00 round 1 export done in 1s: sft 3 rows\n"
    assert logging.getLogger("transformers").handlers == before  # after the block everything is as it was

    loud, loud_out = plain(clock, verbose=True)
    with loud.quiet_libraries(tmp_path / "verbose.log"):
        print("trainer dict", file=loud.stream)
    assert "trainer dict" in loud_out.getvalue() and not (tmp_path / "verbose.log").exists()


def test_the_run_log_prints_warnings_only_and_keeps_every_event_in_the_file(tmp_path):
    clock = FakeClock()
    console, out = plain(clock)
    log = RunLog(tmp_path / "log.jsonl", console=console)
    log.info("rollouts_start", round=1, problems=3)
    log.warning("ppm_not_trained", round=1, pairs=0)
    with log.progress("rollouts", total=3, round=1) as p:
        clock.t = 11.0
        p.update(problems=1, solved=1)
    log.close()
    lines = out.getvalue().splitlines()
    assert [ln for ln in lines if "rollouts_start" in ln] == []  # info: the file only
    assert any("warning ppm_not_trained round=1 pairs=0" in ln for ln in lines), lines
    assert any(ln.endswith("round 1 rollouts: 1/3 problems, 1 solved, 11s elapsed, ETA 22s") for ln in lines), lines
    events = [r["event"] for r in read_log(tmp_path / "log.jsonl")]
    assert events[:2] == ["rollouts_start", "ppm_not_trained"] and events[-1] == "rollouts.done", events

    loud, loud_out = plain(clock, verbose=True)
    RunLog(None, console=loud).info("rollouts_start", round=1)
    assert "info    rollouts_start round=1" in loud_out.getvalue()


def test_phase_summaries_and_durations():
    assert [duration(s) for s in (4.4, 62, 3725)] == ["4s", "1m02s", "1h02m"]
    assert phase_summary("rollouts", {"stored": 3, "solved": 2, "stats": {"tokens": 1200, "wall_s": 60.0}}) == \
        "3 trees stored, 2 solved, 20 tok/s"  # 1200 / 60
    assert phase_summary("train_policy", {"steps": 2, "final_loss": 0.69251}) == "2 steps, final loss 0.6925"
    assert phase_summary("train_ppm", {"skipped": "1 preference pairs"}) == "skipped (1 preference pairs)"
    assert phase_summary("eval", {"metrics": {"greedy_pass1": 0.5, "maj_at_k": None, "train_solved": 1 / 3},
                                  "skipped": {"maj_at_k": "greedy only"}}) == "greedy 50.0%, train solved 33.3%"


def test_an_open_bar_is_ticked_by_a_thread_that_ends_with_it():
    import threading
    import time

    out = io.StringIO()
    console = Console(out, interactive=False, interval_s=0.05, tick_s=0.02, timestamps=lambda: "t")
    bar = console.bar("round 1 eval greedy", total=2)
    time.sleep(0.3)  # nothing finishes, yet lines appear: time passing is shown
    assert out.getvalue().count("round 1 eval greedy: 0/2 problems") >= 2, out.getvalue()
    bar.close()
    time.sleep(0.1)
    assert not [t for t in threading.enumerate() if t.name == "console-ticker"]


def test_training_shows_a_step_bar_with_the_loss_and_the_trainer_dicts_go_to_the_file(tmp_path):
    # The tiny random model, 3 real optimizer steps: the console (a terminal here) gets the bar with steps and
    # loss; the trainer's own {'loss': ...} lines and the library warnings land in libraries.log.
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "rounds"))
    from test_train_policy import tiny_cfg, write_sft

    from pipeline.training import bar_callback
    from rounds.train_config import StageConfig
    from rounds.train_policy import train_policy

    out = io.StringIO()
    console = Console(out, interactive=True, min_redraw_s=0, tick_s=None)
    cfg = tiny_cfg(policy=StageConfig(epochs=1, lr=1e-3, batch_size=4, max_steps=3, max_length=128, warmup_ratio=0.0))
    bar = console.bar("round 1 train policy", None, unit="step")
    with console.quiet_libraries(tmp_path / "libraries.log"):
        result = train_policy("tiny-random", write_sft(tmp_path / "sft.parquet"), tmp_path / "policy", cfg,
                              callbacks=[bar_callback(bar)])
    bar.close(f"{result.steps} steps, final loss {result.final_loss:.4g}")
    shown = out.getvalue()
    assert "3/3" in shown and f"loss {result.losses[-1]:.4g}" in shown, shown
    assert shown.rstrip().endswith(f"3 steps, final loss {result.final_loss:.4g}")
    assert "{'loss'" not in shown and "'train_runtime'" not in shown, shown
    kept = (tmp_path / "libraries.log").read_text()
    assert "'loss'" in kept, kept[-2000:]  # transformers' PrinterCallback printed each logged dict, into the file
