"""Cognitive behaviours across rounds: how often correct and wrong trajectories show each one, table and plot.

Input per round: ``round_N/behaviours.json``, written by the export (``pipeline.export``) from the round's trees:

    {"tagger": "rules",
     "trajectories": {"correct": 12, "wrong": 30},                       # graded paths root -> terminal
     "with_behaviour": {"correct": {"verification": 5, ...}, "wrong": {"verification": 3, ...}}}

A behaviour's frequency is the share of the round's correct (or wrong) trajectories that show it at least once
(``mcts.behaviours``: the union of its steps' tags). ``write_report`` (``rounds.report``) appends
``behaviour_section`` to report.md and writes ``behaviours.png``; ``python -m pipeline info`` prints
``behaviour_lines`` per round. A round without the file (round 0, or exported before behaviours existed) is a
``-`` with the reason, never a zero.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from mcts.behaviours import BEHAVIOURS
from rounds.report import finish_plot

BEHAVIOURS_FILE = "behaviours.json"  # pipeline.export.BEHAVIOURS_FILE (rounds must not import pipeline)
PLOT_FILE = "behaviours.png"
_VERDICTS = ("correct", "wrong")
_SHORT = {"verification": "verif.", "backtracking": "backtr.", "subgoal_setting": "subgoal",
          "backward_chaining": "backw."}


def read_counts(round_path: str | Path) -> tuple[dict | None, str | None]:
    """(counts, None) or (None, why there are none) for one round directory."""
    path = Path(round_path) / BEHAVIOURS_FILE
    if not path.is_file():
        return None, f"no {BEHAVIOURS_FILE} in {Path(round_path).name}/ (not exported, or exported before it existed)"
    try:
        data = json.loads(path.read_text())
        ok = all(isinstance(data["trajectories"][v], int) for v in _VERDICTS) and all(
            isinstance(data["with_behaviour"][v][b], int) for v in _VERDICTS for b in BEHAVIOURS)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"{path.name} unreadable ({type(e).__name__}: {e})"
    return (data, None) if ok else (None, f"{path.name} lacks trajectory or behaviour counts")


def frequency(counts: dict, verdict: str, behaviour: str) -> float | None:
    n = counts["trajectories"][verdict]
    return counts["with_behaviour"][verdict][behaviour] / n if n else None


def _cell(counts: dict, verdict: str, behaviour: str) -> str:
    f = frequency(counts, verdict, behaviour)
    if f is None:
        return "-"
    return f"{100 * f:.0f}% ({counts['with_behaviour'][verdict][behaviour]}/{counts['trajectories'][verdict]})"


def behaviour_table(run_dir: str | Path, rounds: list[int]) -> str:
    """Markdown: per round, the trajectories and each behaviour's frequency in correct / wrong ones."""
    titles = ["round", "correct / wrong trajectories"] + [f"{b} (correct / wrong)" for b in BEHAVIOURS]
    rows, notes = [], []
    for r in rounds:
        counts, reason = read_counts(Path(run_dir) / f"round_{r}")
        if counts is None:
            notes.append(f"round {r}: {reason}")
            rows.append([str(r), f"- [{len(notes)}]"] + ["-"] * len(BEHAVIOURS))
            continue
        t = counts["trajectories"]
        rows.append([str(r), f"{t['correct']} / {t['wrong']}"]
                    + [f"{_cell(counts, 'correct', b)} / {_cell(counts, 'wrong', b)}" for b in BEHAVIOURS])
    widths = [max(len(titles[i]), *(len(row[i]) for row in rows)) for i in range(len(titles))]

    def line(cols: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)) + " |"

    out = [line(titles), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(row) for row in rows]
    return "\n".join(out + ([""] + [f"[{i + 1}] {n}" for i, n in enumerate(notes)] if notes else []))


def plot_behaviours(run_dir: str | Path, rounds: list[int], path: str | Path) -> None:
    """One colour per behaviour; solid / o = share of correct trajectories, dashed / x = of wrong ones; gaps, never
    interpolation, where a round has no such trajectories or no counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_round = {r: read_counts(Path(run_dir) / f"round_{r}")[0] for r in rounds}
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for i, b in enumerate(BEHAVIOURS):
        for verdict, style, marker in zip(_VERDICTS, ("-", "--"), ("o", "x"), strict=True):
            ys = [frequency(c, verdict, b) if c else None for c in per_round.values()]
            if all(y is None for y in ys):
                continue
            ax.plot(rounds, [math.nan if y is None else y for y in ys], style, color=f"C{i}", marker=marker,
                    label=f"{b} ({verdict})")
    ax.set_xticks(rounds)
    ax.set_xlabel("round")
    ax.set_ylabel("share of trajectories showing it")
    finish_plot(fig, ax, path, "cognitive behaviours in correct (solid, o) vs wrong (dashed, x) trajectories",
                empty="no graded trajectories", legend_size=7)


def behaviour_section(run_dir: str | Path, rounds: list[int]) -> str:
    """The report.md section (and ``behaviours.png``); '' when no searched round has counts."""
    searched = [r for r in rounds if r > 0]
    if not any(read_counts(Path(run_dir) / f"round_{r}")[0] for r in searched):
        return ""
    plot_behaviours(run_dir, searched, Path(run_dir) / PLOT_FILE)
    return ("\n## Cognitive behaviours in the search trees\n\n"
            "Share of each round's graded trajectories (root to a correct or wrong final step) that show each\n"
            "behaviour at least once, as tagged by the rules in `mcts/behaviours.py` (their recall on new phrasing\n"
            "is low; see the README). Counts in brackets.\n\n"
            f"{behaviour_table(run_dir, searched)}\n\n![behaviours across rounds]({PLOT_FILE})\n")


def behaviour_lines(round_path: str | Path) -> list[str]:
    """``pipeline info``'s lines for one round ([] when the round has no counts yet)."""
    counts, _ = read_counts(round_path)
    if counts is None:
        return []
    out = []
    for verdict in _VERDICTS:
        cells = [f"{_SHORT[b]} {100 * f:.0f}%" for b in BEHAVIOURS
                 if (f := frequency(counts, verdict, b)) is not None]
        out.append(f"behaviours in {counts['trajectories'][verdict]} {verdict} trajectories: "
                   + (", ".join(cells) if cells else "-"))
    return out


__all__ = ["BEHAVIOURS_FILE", "PLOT_FILE", "behaviour_lines", "behaviour_section", "behaviour_table",
           "plot_behaviours", "read_counts"]
