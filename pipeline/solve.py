"""``python -m pipeline solve``: the trained policy and PPM as a solver, with any registered strategy.

    python -m pipeline solve --run runs/emb --round 4 --strategy beam --budget 8 --out out/
    python -m pipeline solve --policy MODEL --ppm PPM --problems test.jsonl --sweep 1,2,4,8,16 --out out/
    python -m pipeline solve --run runs/emb --round 4 --strategy auto --budget 4 --calibration cal.jsonl --out out/
    python -m pipeline solve --list-strategies

Writes ``OUT/results.parquet`` (``rounds.solve.COLUMNS``; rewritten after every strategy x budget, so an
interrupted sweep keeps what finished), prints a summary table, and with ``--sweep`` draws accuracy against
generated tokens per problem (``OUT/scaling.png``). Engines are the pipeline's own: the run's config (or
``--config`` / ``--set`` with ``--policy``) picks transformers, vLLM or an HTTP server.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.storage import atomic_path


def add_parser(sub: Any) -> None:
    p = sub.add_parser("solve", help="solve problems with the policy + PPM and a test-time strategy")
    p.add_argument("--list-strategies", action="store_true", help="print the registered strategies and exit")
    p.add_argument("--run", metavar="RUN_DIR", help="a run directory; its round's policy and PPM are used")
    p.add_argument("--round", type=int, help="with --run: the round whose (newest) policy and PPM to use")
    p.add_argument("--policy", metavar="MODEL", help="a policy checkpoint or model spec (instead of --run)")
    p.add_argument("--ppm", metavar="MODEL", help="with --policy: a PPM checkpoint")
    p.add_argument("--config", metavar="PRESET", help="with --policy: engine settings (default: built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. engines.backend=http")
    p.add_argument("--few-shot", action="store_true", help="with --policy: show worked examples (untrained model)")
    p.add_argument("--problems", metavar="FILE", help="jsonl/json/parquet/csv problems (default with --run: its "
                                                      "held-out set)")
    p.add_argument("--limit", type=int, help="only the first N problems")
    p.add_argument("--strategy", default="majority", help="a registered strategy, or 'auto' (default majority)")
    p.add_argument("--strategies", help="with --sweep: comma-separated strategies (default: every usable one)")
    p.add_argument("--budget", default="4", help="generations per problem (default 4)")
    p.add_argument("--sweep", metavar="B1,B2,...", help="run every strategy at each budget; draws scaling.png")
    p.add_argument("--verify", action="store_true", help="sandbox-verify candidates before ranking")
    p.add_argument("--no-check-program", action="store_true", help="with --verify: re-run only, no policy-"
                                                                  "written check program")
    p.add_argument("--aggregate", default="last", choices=("last", "min", "prod"), help="best_of_n step scores")
    p.add_argument("--expansion", type=int, default=4, help="beam / dvts: expansion factor M (default 4)")
    p.add_argument("--calibration", metavar="FILE", help="auto: problems to build the choice table on")
    p.add_argument("--choices", metavar="FILE", help="auto: a stored choice table (choice_table.json)")
    p.add_argument("--probe", type=int, default=4, help="auto: samples that estimate difficulty (default 4)")
    p.add_argument("--batch", type=int, default=8, help="problems per strategy call (default 8)")
    p.add_argument("--out", metavar="DIR", help="output directory")
    p.set_defaults(func=solve_cli)


def _budgets(text: str, flag: str) -> list[int]:
    why = ("must be integers >= 1, comma-separated (e.g. 1,2,4)" if flag == "--sweep" else
           "must be an integer >= 1 (generations per problem; --sweep B1,B2,... for several)")
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: {why}") from None
    if not values or any(v < 1 for v in values) or (flag == "--budget" and len(values) != 1):
        raise ValueError(f"{flag} {text!r}: {why}")
    return values


def _plan(args: argparse.Namespace) -> tuple[list[str], list[int]]:
    """(strategies, budgets) from the flags, or ValueError with the one-line reason."""
    from rounds.strategies import AUTO, STRATEGIES, get_strategy

    budgets = _budgets(args.sweep, "--sweep") if args.sweep else _budgets(args.budget, "--budget")
    if args.sweep:
        names = [s.strip() for s in args.strategies.split(",")] if args.strategies else list(STRATEGIES)
    else:
        names = [args.strategy]
    for n in names:
        if n != AUTO:
            get_strategy(n)
    if AUTO in names and not (args.calibration or args.choices):
        raise ValueError("--strategy auto needs --calibration FILE (to build the choice table) or --choices FILE")
    if args.run and args.round is None:
        raise ValueError("--run needs --round N")
    if not args.run and not args.policy:
        raise ValueError("give --run RUN_DIR --round N, or --policy MODEL")
    if args.run and args.policy:
        raise ValueError("give either --run or --policy, not both")
    if not args.out:
        raise ValueError("--out DIR is required")
    if args.expansion < 1 or args.batch < 1 or args.probe < 1:
        raise ValueError("--expansion, --batch and --probe must be >= 1")
    return names, budgets


def solve_cli(args: argparse.Namespace) -> int:
    from rounds.strategies import STRATEGIES

    if args.list_strategies:
        for s in STRATEGIES.values():
            print(f"{s.name:18s} {'PPM ' if s.needs_ppm else '    '} {s.summary}")
        print(f"{'auto':18s}      per difficulty bin, the best strategy at the budget on a calibration split")
        return 0
    try:
        names, budgets = _plan(args)
        return _solve(args, names, budgets)
    except ValueError as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2


def _models(args: argparse.Namespace):
    """(config, policy path, ppm path or None, trained?, problems)."""
    from pipeline.cli import read_problems_file, stored_run
    from pipeline.config import ConfigError, load_config
    from pipeline.context import run_lineage

    problems = None
    if args.problems:
        problems, error = read_problems_file(Path(args.problems))
        if error:
            raise ValueError(f"--problems {args.problems}: {error}")
    if args.run:
        if not (Path(args.run) / "config.yaml").is_file():
            raise ValueError(f"--run {args.run}: not a run directory (no config.yaml)")
        cfg, run = stored_run(Path(args.run))
        lineage = run_lineage(cfg, run)
        if args.round and not run.round_dir(args.round).is_dir():
            raise ValueError(f"--run {args.run}: round {args.round} was never run; rounds present: {run.rounds()}")
        trained = lineage.newest_policy(args.round) if args.round else None
        policy = trained or lineage.bootstrap
        ppm = lineage.newest_ppm(args.round) if args.round else None
        if problems is None:
            from data import load_problems_config

            # The run's held-out split, rebuilt from its config; skipped rows are reported under OUT, so the
            # run directory is only read.
            _, problems = load_problems_config(cfg.problems, rejected_dir=Path(args.out))
        return cfg, policy, ppm, trained is not None, problems
    if problems is None:
        raise ValueError("--policy needs --problems FILE")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        raise ValueError(str(e)) from None
    return cfg, args.policy, args.ppm, not args.few_shot, problems


def _solve(args: argparse.Namespace, names: list[str], budgets: list[int]) -> int:
    import data
    from pipeline.cli import read_problems_file
    from pipeline.context import cache_dir
    from pipeline.engines import make_policy, make_scorer, with_generation
    from pipeline.sandbox import SandboxPool
    from rounds.schedule import policy_settings
    from rounds.strategies import AUTO, STRATEGIES
    from rounds.strategies.auto import ChoiceTable
    from rounds.strategies.base import ScoreMemo, SolveContext, TokenMeter
    from rounds.strategies.verify import Verifier

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg, policy_path, ppm_path, trained, problems = _models(args)
    problems = problems[: args.limit] if args.limit else problems
    if not problems:
        raise ValueError("no problems to solve")
    calibration = None
    if args.calibration:
        calibration, error = read_problems_file(Path(args.calibration))
        if error:
            raise ValueError(f"--calibration {args.calibration}: {error}")
    choices = ChoiceTable.load(args.choices) if args.choices else None
    needs = [n for n in names if n != AUTO and STRATEGIES[n].needs_ppm]
    if needs and not ppm_path:
        if args.sweep and not args.strategies:
            names = [n for n in names if n not in needs]
            print(f"no PPM: skipping {', '.join(needs)}", file=sys.stderr)
        else:
            raise ValueError(f"strategy {needs[0]!r} needs a PPM; give --ppm MODEL or a run round with a PPM")

    mode, few_shot = policy_settings(cfg.rounds.schedule, trained) if args.run else ("step", args.few_shot)
    sampler = make_policy(cfg.engines, model=policy_path, mode=mode, few_shot=few_shot, seed=cfg.seed,
                          cache_dir=cache_dir(cfg))
    greedy = with_generation(sampler, dataclasses.replace(cfg.engines.generation, temperature=0.0))
    tok = sampler.builder.tokenizer  # type: ignore[attr-defined]
    meter = TokenMeter(sampler, lambda t: len(tok.encode(t, add_special_tokens=False)))
    greedy_meter = TokenMeter(greedy, meter.count).share(meter)  # one tally, whichever decoding spent it
    # Scores are remembered across strategies and budgets: the same chain is ranked by several strategies.
    scorer = ScoreMemo(make_scorer(cfg.engines, ppm_path)) if ppm_path else None
    print(f"policy {policy_path} ({mode} mode{', few-shot' if few_shot else ''}); ppm {ppm_path or '-'}; "
          f"{len(problems)} problems; backend {cfg.engines.backend}", file=sys.stderr)

    rows: list[dict] = []
    with SandboxPool(cfg.sandbox) as pool:
        ctx = SolveContext(meter, pool, scorer, greedy=greedy_meter, search=cfg.search, seed=cfg.seed,
                           aggregate=args.aggregate, expansion=args.expansion, mcts_children=cfg.eval.mcts_children,
                           equivalent=data.is_equivalent, chain_cache={})
        verifier = (Verifier(pool, None if args.no_check_program else greedy_meter, cfg.seed)
                    if args.verify else None)
        if AUTO in names and choices is None:
            choices = _calibrate(calibration, [n for n in names if n != AUTO] or list(STRATEGIES), budgets, ctx,
                                 meter, verifier, args, out)
        runs = [(n, b) for b in budgets for n in names if not (n == "greedy" and b != budgets[0])]
        for name, budget in runs:
            rows += _one(problems, name, budget, ctx, meter, verifier, choices, args)
            _write(out / "results.parquet", rows)
    _report(rows, out, args.sweep is not None)
    return 0


def _one(problems, name, budget, ctx, meter, verifier, choices, args, what: str = "") -> list[dict]:
    from tqdm import tqdm

    import data
    from rounds.solve import solve

    t0 = time.perf_counter()
    with tqdm(total=len(problems), desc=f"{what}{name}@{budget}", unit="problem", file=sys.stderr,
              mininterval=2.0) as bar:
        rows = solve(problems, name, budget, ctx, meter=meter, grade=data.grade, verifier=verifier,
                     choices=choices, batch=args.batch, on_batch=bar.update)
    graded = [r for r in rows if r["correct"] is not None]
    print(f"{what}{name}@{budget}: {sum(bool(r['correct']) for r in graded)}/{len(graded)} correct, "
          f"{sum(r['tokens'] for r in rows)} tokens, {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return rows


def _calibrate(calibration, names, budgets, ctx, meter, verifier, args, out: Path):
    """Run every strategy at every budget on the calibration problems, bin them by the probe's agreement and
    store the choice table (``OUT/choice_table.json``)."""
    from rounds.strategies.auto import build_choice_table, difficulty_bin, probe

    if not calibration:
        raise ValueError("--strategy auto needs --calibration FILE or --choices FILE")
    agreement = probe(calibration, args.probe, ctx)
    for p in calibration:
        meter.take(str(p.id))
    bins = {str(p.id): difficulty_bin(a) for p, a in zip(calibration, agreement, strict=True)}
    rows: list[dict] = []
    for b in budgets:
        for n in names:
            if n == "greedy" and b != budgets[0]:
                continue
            if n != "greedy" and getattr(ctx, "scorer", None) is None and _needs_ppm(n):
                continue
            rows += _one(calibration, n, b, ctx, meter, verifier, None, args, what="calibration ")
    table = build_choice_table(rows, bins, args.probe, names)
    table.save(out / "choice_table.json")
    print(f"choice table: {table.choice} -> {out / 'choice_table.json'}", file=sys.stderr)
    return table


def _needs_ppm(name: str) -> bool:
    from rounds.strategies import STRATEGIES

    return STRATEGIES[name].needs_ppm


def _write(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rounds.solve import COLUMNS

    schema = pa.schema([("problem_id", pa.string()), ("strategy", pa.string()), ("budget", pa.int64()),
                        ("answer", pa.string()), ("correct", pa.bool_()), ("tokens", pa.int64()),
                        ("wall_s", pa.float64()), ("candidates", pa.int64()), ("verified", pa.int64()),
                        ("verify_removed_wrong", pa.int64()), ("verify_removed_right", pa.int64()),
                        ("verify_fallback", pa.bool_()), ("chosen", pa.string()), ("difficulty", pa.string())])
    assert tuple(schema.names) == COLUMNS, (schema.names, COLUMNS)
    table = pa.Table.from_pylist(rows, schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _report(rows: list[dict], out: Path, sweep: bool) -> None:
    from rounds.solve import format_summary, summarise

    lines = summarise(rows)
    print(format_summary(lines))
    print(f"results: {out / 'results.parquet'}")
    if sweep:
        plot_scaling(lines, out / "scaling.png")
        print(f"plot: {out / 'scaling.png'}")


def plot_scaling(lines: list[dict], path: Path) -> None:
    """Accuracy against mean generated tokens per problem, one line per strategy, points labelled by budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(ln["strategy"] for ln in lines):
        pts = sorted((ln["tokens_mean"], ln["accuracy"], ln["budget"]) for ln in lines
                     if ln["strategy"] == name and ln["accuracy"] is not None)
        if not pts:
            continue
        ax.plot([max(p[0], 1.0) for p in pts], [100 * p[1] for p in pts], marker="o", label=name)
        for x, y, b in pts:
            ax.annotate(str(b), (max(x, 1.0), 100 * y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("generated tokens per problem (mean)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("test-time scaling (labels: budget)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
