"""The cross-round report: one table and one plot from each round's ``eval.json`` and ``metrics.json``.

    text = write_report(run_dir, rounds=[0, 1, 2, 3, 4])   # writes report.md and rounds.png, returns the table

Inputs per round (round 0 = the base model, evaluation only):

- ``round_N/eval.json``, written by ``rounds.evaluate.evaluate`` (schema there: ``metrics`` holds the
  fractions, ``counts`` the numerators and denominators, ``skipped`` the reason for each metric left out).
- ``round_N/metrics.json``, written by the driver after training (``update_metrics`` below merges keys into
  it atomically). Keys read here, all optional:

  ==================  ==========================================================
  ``ppm_pairwise_acc``  PPM accuracy on held-out pairs, r(chosen) > r(rejected)
  ``ppm_heldout_pairs`` number of held-out pairs behind that accuracy
  ``sft_final_loss``    policy SFT training loss at the last logged step
  ``sft_rows``          SFT rows trained on (the round's ``sft`` export)
  ``ppm_pairs``         PPM pairs trained on (the round's ``ppm_pairs`` export)
  ``coverage_solved``   training problems with a correct trajectory in any round so far
  ``coverage_problems`` training problems searched in any round so far
  ==================  ==========================================================

Every fraction is shown with its count and a 95% Wilson score interval (``wilson_interval``), e.g.
``23.3% (14/60) [14-35]``: with 50-odd held-out problems one problem is ~2 points, and a reader needs the
interval to tell a gain from noise.

Honesty rule: a number that is not there is shown as ``-`` with a footnote that says why (file missing,
metric skipped and the evaluator's reason, no training in round 0). Nothing is interpolated.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.atomic_io import atomic_path, atomic_write_json, atomic_write_text

EVAL_FILE = "eval.json"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
PLOT_FILE = "rounds.png"

# z of a two-sided 95% normal interval
Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (lo, hi) of a binomial proportion ``k`` successes out of ``n``.

    centre = (k + z^2/2) / (n + z^2);  half = z * sqrt(k(n-k)/n + z^2/4) / (n + z^2). Unlike the normal
    approximation it stays inside [0, 1] and is not empty at k = 0 or k = n, which matters for the small
    counts of a CPU run.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"wilson_interval: n={n!r}, must be an integer >= 1")
    if not isinstance(k, int) or not 0 <= k <= n:
        raise ValueError(f"wilson_interval: k={k!r}, must be an integer in [0, n={n}]")
    z2 = z * z
    centre = (k + z2 / 2) / (n + z2)
    half = z * math.sqrt(k * (n - k) / n + z2 / 4) / (n + z2)
    return max(0.0, centre - half), min(1.0, centre + half)


def fraction_text(k: int, n: int) -> str:
    """``k/n`` as the report writes it: percent, count, 95% Wilson interval in whole percent."""
    lo, hi = wilson_interval(k, n)
    return f"{100 * k / n:.1f}% ({k}/{n}) [{100 * lo:.0f}-{100 * hi:.0f}]"


# (key in eval.json "metrics", key of its counts in eval.json "counts", column title, plot label)
_EVAL_COLUMNS = (
    ("greedy_pass1", "greedy", "greedy pass@1", "greedy pass@1"),
    ("maj_at_k", "maj", "maj@{k}", "maj@k"),
    ("ppm_best_of_n", "best_of_n", "PPM best-of-{n}", "PPM best-of-N"),
    ("ppm_mcts", "mcts", "PPM MCTS", "PPM-guided MCTS"),
    ("train_solved", "train", "train solved by search", "train problems solved by search"),
)


def round_dir(run_dir: str | Path, round_idx: int) -> Path:
    return Path(run_dir) / f"round_{round_idx}"


def write_json_atomic(path: str | Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON to a temp file beside ``path`` and rename it into place."""
    atomic_write_json(path, data, indent=2, sort_keys=False, allow_nan=False)


def update_metrics(round_path: str | Path, **values: Any) -> dict[str, Any]:
    """Merge ``values`` into ``round_path/metrics.json`` (created if absent), atomically; returns the result."""
    path = Path(round_path) / METRICS_FILE
    current = read_json(path)[0] or {}
    current.update(values)
    write_json_atomic(path, current)
    return current


def read_json(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(content, None) or (None, reason it could not be read)."""
    if not path.is_file():
        return None, f"no {path.name}"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return None, f"{path.name} unreadable ({type(e).__name__}: {e})"
    if not isinstance(data, dict):
        return None, f"{path.name} is not a JSON object"
    return data, None


@dataclass
class _Cell:
    value: float | None  # what the plot uses
    text: str  # what the table shows
    note: str | None = None  # footnote reason when value is missing


def _fraction_cell(metrics: dict, counts: dict, skipped: dict, key: str, counts_key: str) -> _Cell:
    value = metrics.get(key)
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        c = counts.get(counts_key) or {}
        num, den = c.get("correct", c.get("solved")), c.get("problems")
        if isinstance(num, int) and isinstance(den, int) and 0 <= num <= den and den > 0:
            return _Cell(float(value), fraction_text(num, den))
        return _Cell(float(value), f"{100 * value:.1f}%")
    return _Cell(None, "-", skipped.get(key) or "not in eval.json")


def _number_cell(metrics: dict | None, reason: str | None, key: str, fmt: str) -> _Cell:
    if metrics is None:
        return _Cell(None, "-", reason)
    value = metrics.get(key)
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return _Cell(float(value), format(value, fmt))
    return _Cell(None, "-", f"{key} not recorded in {METRICS_FILE}")


def _no_accuracy_reason(tm: dict) -> str | None:
    """Why a round has no held-out PPM accuracy, when metrics.json tells."""
    pairs = tm.get("ppm_pairs")
    if isinstance(pairs, int) and pairs < 2:
        return f"no PPM trained ({pairs} preference pairs)"
    if tm.get("ppm_heldout_pairs") == 0:
        return (f"no pair held out - pairs are held out by whole problem, and this round's "
                f"{pairs if isinstance(pairs, int) else 'few'} pairs come from one problem "
                f"(or training.ppm.heldout_fraction is 0)")
    return None


def _coverage_cell(tm: dict | None, reason: str | None) -> _Cell:
    if tm is None:
        return _Cell(None, "-", reason)
    k, n = tm.get("coverage_solved"), tm.get("coverage_problems")
    if isinstance(k, int) and isinstance(n, int) and 0 <= k <= n and n > 0:
        return _Cell(k / n, fraction_text(k, n))
    return _Cell(None, "-", f"coverage_solved/coverage_problems not recorded in {METRICS_FILE}")


def _round_cells(run_dir: Path, r: int) -> tuple[dict[str, _Cell], dict[str, Any]]:
    rd = round_dir(run_dir, r)
    ev, ev_reason = read_json(rd / EVAL_FILE)
    cells: dict[str, _Cell] = {}
    for key, counts_key, _, _ in _EVAL_COLUMNS:
        if ev is None:
            cells[key] = _Cell(None, "-", f"{ev_reason} in {rd.name}/")
        else:
            cells[key] = _fraction_cell(ev.get("metrics") or {}, ev.get("counts") or {}, ev.get("skipped") or {},
                                        key, counts_key)
    tm, tm_reason = read_json(rd / METRICS_FILE)
    if tm is None:
        tm_reason = "round 0 is the base model: nothing is trained" if r == 0 else f"{tm_reason} in {rd.name}/"
    cells["ppm_pairwise_acc"] = _number_cell(tm, tm_reason, "ppm_pairwise_acc", ".3f")
    pairs = tm.get("ppm_heldout_pairs") if tm is not None else None
    if cells["ppm_pairwise_acc"].value is not None and isinstance(pairs, int) and pairs > 0:
        # accuracy = right/pairs, so the count is recovered exactly by rounding
        right = round(cells["ppm_pairwise_acc"].value * pairs)
        cells["ppm_pairwise_acc"].text = fraction_text(right, pairs)
    elif tm is not None and cells["ppm_pairwise_acc"].value is None:
        cells["ppm_pairwise_acc"].note = _no_accuracy_reason(tm) or cells["ppm_pairwise_acc"].note
    cells["train_coverage"] = _coverage_cell(tm, tm_reason)
    cells["sft_final_loss"] = _number_cell(tm, tm_reason, "sft_final_loss", ".4f")
    cells["sft_rows"] = _number_cell(tm, tm_reason, "sft_rows", "d")
    cells["ppm_pairs"] = _number_cell(tm, tm_reason, "ppm_pairs", "d")
    return cells, ev or {}


def _budget_title(evals: list[dict], counts_key: str, field: str, template: str, generic: str) -> str:
    """``template`` with ``{field}`` filled from ``counts[counts_key][field]`` when every round that has it
    agrees, else the ``generic`` title (the per-round values are in each eval.json)."""
    values = {(e.get("counts") or {}).get(counts_key, {}).get(field) for e in evals if e}
    values.discard(None)
    return template.format(**{field: values.pop()}) if len(values) == 1 else generic


def build_table(run_dir: str | Path, rounds: list[int]) -> tuple[str, dict[int, dict[str, _Cell]]]:
    """The markdown table (with footnotes) and the parsed cells per round."""
    run_dir = Path(run_dir)
    per_round: dict[int, dict[str, _Cell]] = {}
    evals: list[dict] = []
    reused: dict[int, int] = {}  # round -> the earlier round whose held-out numbers it carries
    for r in rounds:
        per_round[r], ev = _round_cells(run_dir, r)
        evals.append(ev)
        if isinstance(ev.get("same_as_round"), int):
            reused[r] = ev["same_as_round"]
    titles = ["round"]
    for _, counts_key, title, label in _EVAL_COLUMNS:
        if "{" in title:  # maj@{k}, best-of-{n}: the budget goes into the title when all rounds share it
            title = _budget_title(evals, counts_key, title[title.index("{") + 1 : title.index("}")], title, label)
        titles.append(title)
    titles += ["train coverage", "PPM pairwise acc", "SFT final loss", "SFT rows", "PPM pairs"]
    keys = [c[0] for c in _EVAL_COLUMNS] + ["train_coverage", "ppm_pairwise_acc", "sft_final_loss", "sft_rows",
                                            "ppm_pairs"]

    notes: list[str] = []  # one footnote per distinct (round, reason)
    rows = []
    for r, ev in zip(rounds, evals, strict=True):
        row = [f"{r} (base)" if r == 0 else str(r)]
        # the round whose greedy chains this full evaluation took (counts.greedy.same_as_round), if any
        greedy_from = None if r in reused else ((ev.get("counts") or {}).get("greedy") or {}).get("same_as_round")
        if r in reused:
            what = ("the policy and PPM" if ev.get("full", True)
                    else "the policy (a greedy-only evaluation, which uses no PPM)")
            note = (f"round {r}: evaluates {what} that round {reused[r]} evaluated, so its held-out numbers are "
                    f"round {reused[r]}'s (not measured again)")
            notes.append(note)
            row[0] += f" [{len(notes)}]"
        for key in keys:
            cell = per_round[r][key]
            if cell.value is None:
                note = f"round {r}: {cell.note}"
                if note not in notes:
                    notes.append(note)
                row.append(f"- [{notes.index(note) + 1}]")
            elif key == "greedy_pass1" and isinstance(greedy_from, int):
                notes.append(f"round {r}: greedy pass@1 is round {greedy_from}'s, which evaluated the same policy "
                             f"(greedy chains use no PPM; not decoded again)")
                row.append(f"{cell.text} [{len(notes)}]")
            else:
                row.append(cell.text)
        rows.append(row)
    widths = [max(len(titles[i]), *(len(row[i]) for row in rows)) if rows else len(titles[i])
              for i in range(len(titles))]

    def line(cols: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)) + " |"

    out = [line(titles), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in rows]
    if notes:
        out.append("")
        out += [f"[{i + 1}] {n}" for i, n in enumerate(notes)]
    return "\n".join(out), per_round


def plot_rounds(per_round: dict[int, dict[str, _Cell]], path: str | Path) -> None:
    """Lines across rounds for every accuracy-like metric; a missing value is a gap, never interpolated."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a server; must precede pyplot
    import matplotlib.pyplot as plt

    rounds = sorted(per_round)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    series = [(key, label, "-") for key, _, _, label in _EVAL_COLUMNS]
    series.append(("train_coverage", "train coverage (any round so far)", ":"))
    series.append(("ppm_pairwise_acc", "PPM pairwise acc (held-out)", "--"))
    for key, label, style in series:
        ys = [per_round[r][key].value for r in rounds]
        if all(y is None for y in ys):
            continue
        ax.plot(rounds, [math.nan if y is None else y for y in ys], style, marker="o", label=label)
    ax.set_xticks(rounds)
    ax.set_xticklabels([f"{r}\n(base)" if r == 0 else str(r) for r in rounds])
    ax.set_xlabel("round")
    ax.set_ylabel("fraction correct")
    finish_plot(fig, ax, path, "open-rstar: evaluation across rounds", empty="no metrics recorded", legend_size=8)


def finish_plot(fig, ax, path: str | Path, title: str, empty: str, legend_size: int) -> None:
    """The shared end of the report's plots: a 0-1 y axis, grid, legend (or ``empty`` when nothing was
    plotted), title; then ``path`` written atomically (a temp file renamed over it) and the figure closed."""
    import matplotlib.pyplot as plt

    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(loc="best", fontsize=legend_size)
    else:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_report(run_dir: str | Path, rounds: list[int]) -> str:
    """Write ``report.md`` and ``rounds.png`` into ``run_dir`` and return the table for the console."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"write_report: run directory {run_dir} does not exist")
    if not rounds:
        raise ValueError("write_report: rounds=[]: give at least one round number (0 = the base model)")
    rounds = sorted(set(rounds))
    table, per_round = build_table(run_dir, rounds)
    md = (f"# open-rstar report: {run_dir.name}\n\n"
          "Held-out evaluation per round (round 0 = the base model before any training) and the training\n"
          "numbers of each round. Percentages are fractions of the held-out problems, with the count in\n"
          "parentheses and the 95% Wilson interval in square brackets (whole percent). 'train solved by\n"
          "search' is the fraction of that round's training problems with at least one correct rollout;\n"
          "'train coverage' counts training problems with a correct trajectory in any round so far.\n"
          "'-' marks a number that was not measured; the footnote says why.\n\n"
          f"{table}\n\n![metrics across rounds]({PLOT_FILE})\n")
    from rounds.behaviour_report import behaviour_section  # behaviours.json per round -> table + behaviours.png

    md += behaviour_section(run_dir, rounds)
    atomic_write_text(run_dir / REPORT_FILE, md)
    plot_rounds(per_round, run_dir / PLOT_FILE)
    return table
