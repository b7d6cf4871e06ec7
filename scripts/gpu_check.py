"""The one-call GPU check (``scripts/gpu_check.sh``): every CUDA path of the project, in one command.

    (a) engine   the transformers policy engine (``pipeline.engines.make_policy``) on the device, decoding batches
                 of 1/8/32/64 rows, tokens/s each; on the tiny random model and on SmolLM2-135M's shape with
                 random weights (its real weights do not fit the carry limit, see gpu_check_prepare.py)
    (b) training ``rounds.train_policy`` (TRL SFT) and ``rounds.train_ppm`` (TRL RewardTrainer) for N steps each,
                 bf16 on a GPU; asserts finite losses and that every weight tensor changed
    (c) scorer   the PPM from (b) scored by ``make_scorer`` on the device (batched, padded) against the CPU scoring
                 each text alone, float32 both: max |difference| <= 1e-3; bf16 on the device reported beside it
    (d) round    one tiny round end to end (``gpu_check_round``): through Ray when it is installed, else in-process

``--cpu`` runs all of it on the CPU with fewer steps and tokens (the test suite runs that mode). The summary is
JSON, written to ``$OUT/gpu_check.json`` when ``OUT`` is set (after each part, so a run cut short keeps what it
measured), else printed to stdout; progress goes to stderr. Exit status 0 only when every part passed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

CARRY = ROOT / ".gpu_check"
BATCHES = (1, 8, 32, 64)  # rows decoded together (distinct prompts, one sample each)
CPU_BATCHES = (1, 4)  # --cpu: the same code, small enough for a loaded 2-core CI machine
SCORE_TOLERANCE = 1e-3


def say(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- data


def problems(n: int, seed: int = 0) -> list:
    """Built-in one-operation arithmetic problems (each carries its expression in ``meta``)."""
    from data import load_problems_config
    from data.loaders import ProblemsConfig

    train, _ = load_problems_config(ProblemsConfig(source="builtin:arithmetic", n=n, difficulty=1, eval_n=1,
                                                   seed=seed))
    return train


def solution(problem, answer: str | None = None) -> str:
    """A two-step solution in the step format: compute the expression in code, then box ``answer``."""
    from mcts.steps import render_steps

    expr = problem.meta["expression"]
    answer = problem.answer if answer is None else answer
    return render_steps([(f"# Compute {expr}.\nx = {expr}\nprint(x)", str(answer), False),
                         (f"# The answer is \\boxed{{{answer}}}", "", True)])


def write_training_data(work: Path, model: Path, probs: list) -> tuple[Path, Path]:
    """sft.parquet (prompt, completion) and ppm_pairs.parquet (prompt, chosen, rejected, problem_id), with prompts
    exactly as the search and the export render them (no few-shot examples)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.engines import prompt_builder

    build = prompt_builder(model, few_shot=False).build
    prompts = [build(p.question, "") for p in probs]
    sft = pa.table({"prompt": prompts, "completion": [solution(p) for p in probs]})
    wrong = [solution(p, str(int(p.answer) + 1)) for p in probs]
    pairs = pa.table({"prompt": prompts, "chosen": [solution(p) for p in probs], "rejected": wrong,
                      "problem_id": [str(p.id) for p in probs]})
    work.mkdir(parents=True, exist_ok=True)
    pq.write_table(sft, work / "sft.parquet")
    pq.write_table(pairs, work / "ppm_pairs.parquet")
    return work / "sft.parquet", work / "ppm_pairs.parquet"


# ----------------------------------------------------------------------------------------------- (a) engine


def smollm2_shape(work: Path, tokenizer_from: Path, layers: int | None) -> Path | None:
    """A checkpoint with SmolLM2-135M's config and seeded random weights (bf16), or None without the config."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rounds.models import default_cache_dir

    for src in (CARRY / "models" / "smollm2-135m-shape", default_cache_dir() / "smollm2-135m-instruct-v1"):
        if (src / "config.json").is_file():
            break
    else:
        return None
    config = LlamaConfig.from_pretrained(str(src))
    if layers is not None:
        config.num_hidden_layers = layers
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    out = work / "smollm2-135m-shape"
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(tokenizer_from)).save_pretrained(str(out))
    return out


def throughput(model: Path, device: str, new_tokens: int, batches: tuple[int, ...]) -> dict:
    """Load the policy engine on ``model`` and decode each batch size once (after one warm-up batch)."""
    import torch

    from mcts.protocols import SearchState
    from pipeline.engines import EngineConfig, GenerationConfig, make_policy

    dtype = "bfloat16" if device == "cuda" else "float32"
    gen = GenerationConfig(temperature=0.7, top_p=0.95, max_new_tokens_step=new_tokens)
    cfg = EngineConfig(policy_model=str(model), device=device, dtype=dtype, max_batch_rows=max(batches),
                       generation=gen)
    t0 = time.perf_counter()
    policy = make_policy(cfg, mode="step")
    out: dict = {"model": model.name, "dtype": dtype, "load_s": round(time.perf_counter() - t0, 2),
                 "new_tokens_per_row": new_tokens,
                 "params_m": round(sum(p.numel() for p in policy.model.parameters()) / 1e6, 1), "batches": []}

    def states(n: int, salt: int) -> list:
        # Distinct questions of varied length, so rows prefill different prompts and pad.
        return [SearchState(f"t{salt}-{i}", f"Tom has {i * 7 + salt} apples and buys {i + 3} more. "
                            + "He counts them twice. " * (i % 4) + "How many apples does he have?", "", 1000 * salt + i)
                for i in range(n)]

    policy.propose(states(4, 99), 1)  # warm-up: CUDA context, kernels, the shared-prefix cache
    for b in batches:
        before = policy.stats.new_tokens
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        props = policy.propose(states(b, b), 1)
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        if len(props) != b or any(len(p) != 1 for p in props):
            raise AssertionError(f"batch {b}: got {[len(p) for p in props]} proposals, expected {b} x 1")
        tokens = policy.stats.new_tokens - before
        out["batches"].append({"batch": b, "new_tokens": tokens, "seconds": round(dt, 3),
                               "tokens_per_s": round(tokens / dt, 1)})
        say(f"  {model.name} batch {b}: {tokens} tokens in {dt:.2f} s = {tokens / dt:.0f} tokens/s")
    if device == "cuda":
        out["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del policy
    return out


def check_engine(device: str, work: Path, tiny: Path, new_tokens: int) -> dict:
    batches = BATCHES if device == "cuda" else CPU_BATCHES
    result = {"tiny_random": throughput(tiny, device, new_tokens, batches)}
    # On the CPU a 1-layer version of the shape keeps the mode fast; the code path is the same.
    shape = smollm2_shape(work, tiny, layers=1 if device == "cpu" else None)
    if shape is None:
        result["smollm2_135m_shape"] = {"skipped": "no SmolLM2-135M config found; run scripts/gpu_check.sh --prepare"}
    else:
        result["smollm2_135m_shape"] = throughput(shape, device, new_tokens, batches) | {
            "note": "SmolLM2-135M's architecture with seeded random weights (its real weights do not fit the "
                    "carry limit): tokens/s is the engine's speed on a model of that size, not text quality"
                    + ("; 1 layer instead of 30 in --cpu" if device == "cpu" else "")}
    return result


# ----------------------------------------------------------------------------------------------- (b) training


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    out: dict = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def changed_tensors(base: Path, trained: Path, strip_prefix: str = "") -> tuple[int, list[str]]:
    """(tensors compared, names of those equal to the base) over the weights both checkpoints hold."""
    import torch

    a = _weights(base)
    b = {k.removeprefix(strip_prefix): v for k, v in _weights(trained).items()}
    shared = sorted(set(a) & set(b))
    if not shared:
        raise AssertionError(f"{trained} shares no weight names with {base}: {sorted(b)[:5]} vs {sorted(a)[:5]}")
    same = [k for k in shared if torch.equal(a[k].float(), b[k].float())]
    return len(shared), same


def training_config(device: str, steps: int):
    from rounds.train_config import StageConfig, TrainingConfig

    # SFT at a high rate so 20 steps move the tiny policy towards these solutions (part d searches with it); the
    # PPM at a low one: the fresh head on the tiny model starts near tanh saturation, and a high rate pushes every
    # score to 1.0, which would leave part c comparing constants.
    policy = StageConfig(max_steps=steps, batch_size=4, lr=1e-3, max_length=512, warmup_ratio=0.0,
                         lr_scheduler="constant")
    ppm = dataclasses.replace(policy, lr=1e-5)
    return TrainingConfig(policy=policy, ppm=ppm, precision="bf16" if device == "cuda" else "fp32", device=device,
                          heldout_fraction=0.0, logging_steps=1, save_steps=10_000)


def _check_run(name: str, res, steps: int, base: Path, out: Path, strip_prefix: str) -> dict:
    losses = list(res.losses)
    if res.steps != steps:
        raise AssertionError(f"{name}: trained {res.steps} optimizer steps, expected {steps}")
    if not losses or not all(math.isfinite(x) for x in losses):
        raise AssertionError(f"{name}: losses not all finite: {losses}")
    n, same = changed_tensors(base, out, strip_prefix)
    if same:
        raise AssertionError(f"{name}: {len(same)} of {n} weight tensors equal the base after training: {same[:5]}")
    return {"steps": res.steps, "first_loss": round(losses[0], 4), "final_loss": round(losses[-1], 4),
            "losses_logged": len(losses), "tensors_changed": f"{n}/{n}", "wall_s": res.wall_s}


def check_training(device: str, work: Path, tiny: Path, steps: int, probs: list) -> dict:
    from rounds.train_config import trainer_arguments
    from rounds.train_policy import device_flags, train_policy, work_dir_for
    from rounds.train_ppm import train_ppm

    cfg = training_config(device, steps)
    flags = device_flags()
    args = trainer_arguments(cfg, cfg.policy, work_dir_for(work / "policy"), **flags)
    if device == "cuda" and not args["bf16"]:
        raise AssertionError(f"training on {device} is not bf16: {flags}")
    sft, pairs = write_training_data(work / "data", tiny, probs)
    say(f"  SFT: {steps} steps on {device} ({'bf16' if args['bf16'] else 'fp32'})")
    policy = _check_run("policy SFT", train_policy(tiny, sft, work / "policy", cfg), steps, tiny, work / "policy", "")
    say(f"  PPM: {steps} steps")
    # The PPM checkpoint is LlamaForSequenceClassification: backbone weights under 'model.' as in the policy; its
    # fresh head has no base to compare with (it is checked through the scores in part c).
    ppm = _check_run("PPM", train_ppm(tiny, pairs, work / "ppm", cfg), steps, tiny, work / "ppm", "")
    return {"precision": "bf16" if args["bf16"] else "fp32", "rows": len(probs), "policy": policy, "ppm": ppm,
            "policy_dir": str(work / "policy"), "ppm_dir": str(work / "ppm")}


# ----------------------------------------------------------------------------------------------- (c) scorer


def check_scorer(device: str, ppm_dir: Path, probs: list) -> dict:
    """PPM scores on ``device`` in padded batches vs the CPU scoring each text alone, both float32."""
    from mcts.protocols import SearchState
    from mcts.steps import render_steps
    from pipeline.engines import EngineConfig, make_scorer

    states = []
    for i, p in enumerate(probs):
        expr = p.meta["expression"]
        steps = [(f"# Compute {expr}.\nx = {expr}\nprint(x)", p.answer, False)] * (i % 3)
        states.append(SearchState(str(p.id), p.question, render_steps(steps), i))
    ref = make_scorer(EngineConfig(device="cpu", dtype="float32", ppm_batch_size=1), ppm_dir).score(states)
    out: dict = {"texts": len(states), "cpu_min": round(min(ref), 5), "cpu_max": round(max(ref), 5)}
    for dtype in ("float32", "bfloat16") if device == "cuda" else ("float32",):
        got = make_scorer(EngineConfig(device=device, dtype=dtype, ppm_batch_size=4), ppm_dir).score(states)
        out[f"max_abs_diff_{dtype}"] = max(abs(a - b) for a, b in zip(got, ref, strict=True))
    if max(ref) - min(ref) < 1e-4:
        raise AssertionError(f"PPM scores barely vary ({min(ref)}..{max(ref)}): the comparison would prove nothing")
    if out["max_abs_diff_float32"] > SCORE_TOLERANCE:
        raise AssertionError(f"PPM scores on {device} differ from the CPU's by {out['max_abs_diff_float32']:.2e} "
                             f"> {SCORE_TOLERANCE:g}")
    out["tolerance"] = SCORE_TOLERANCE
    return out


# ----------------------------------------------------------------------------------------------- main


def environment(device: str) -> dict:
    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "device": device, "install": os.environ.get("GPU_CHECK_INSTALL", "none")}
    for name in ("trl", "datasets", "math-verify", "ray"):  # versions without importing (Ray must stay unimported)
        try:
            env[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env[name] = None
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
        env["bf16_supported"] = torch.cuda.is_bf16_supported()
    return env


def emit(summary: dict, out_path: Path | None, stdout_fd: int) -> None:
    text = json.dumps(summary, indent=2) + "\n"
    if out_path is not None:
        out_path.write_text(text)
        say(f"summary written to {out_path}")
    else:
        os.write(stdout_fd, text.encode())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run everything on the CPU, small (the test-suite mode)")
    ap.add_argument("--ray", choices=("auto", "on", "off"), default="auto",
                    help="part d through Ray: 'auto' = when installed; 'off' = in-process (Ray imports refused)")
    ap.add_argument("--steps", type=int, default=0, help="training steps per trainer (default 20; 4 with --cpu)")
    ap.add_argument("--work", default="", help="scratch directory (default: a fresh temporary one)")
    args = ap.parse_args()
    device = "cpu" if args.cpu else "cuda"
    steps = args.steps or (4 if args.cpu else 20)
    new_tokens = 4 if args.cpu else 64
    out_path = Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None
    if (CARRY / "models" / "tiny-random-v2" / "config.json").is_file():
        os.environ.setdefault("OPEN_RSTAR_CACHE", str(CARRY / "models"))  # the carried model cache

    # Libraries print to stdout (the Trainer's loss lines, sandbox workers): stdout keeps only the JSON summary,
    # everything else goes to stderr, at the file-descriptor level so child processes follow.
    sys.stdout.flush()
    json_fd = os.dup(1)
    os.dup2(2, 1)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible; run with --cpu for the CPU mode", file=sys.stderr)
        return 2
    from gpu_check_round import ray_available

    use_ray = {"on": True, "off": False, "auto": ray_available()}[args.ray]
    summary: dict = {"mode": "cpu" if args.cpu else "gpu", "steps": steps, "environment": environment(device),
                     "ray_used": use_ray, "parts": {}}
    if not use_ray:
        sys.modules["ray"] = None  # type: ignore[assignment]  # any `import ray` on the in-process path now fails
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check-"))
    t_all = time.perf_counter()

    def part(name: str, fn) -> dict | None:
        say(f"({name}) ...")
        t = time.perf_counter()
        try:
            result = fn() | {"ok": True}
        except Exception as e:
            result = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            say(f"({name}) FAILED: {type(e).__name__}: {e}")
        result["wall_s"] = round(time.perf_counter() - t, 2)
        summary["parts"][name] = result
        summary["wall_s"] = round(time.perf_counter() - t_all, 2)
        if out_path is not None:
            out_path.write_text(json.dumps(summary, indent=2) + "\n")
        say(f"({name}) {'ok' if result['ok'] else 'FAILED'} in {result['wall_s']} s")
        return result if result["ok"] else None

    from gpu_check_round import run_tiny_round

    from rounds.models import TINY_RANDOM, resolve_model

    try:
        tiny = resolve_model(TINY_RANDOM)  # from the carried cache on the GPU (building it needs the GGUF package)
    except Exception as e:
        summary["ok"] = False
        summary["error"] = f"the tiny random model: {type(e).__name__}: {e}; run scripts/gpu_check.sh --prepare"
        emit(summary, out_path, json_fd)
        return 1
    probs = problems(8)
    part("a_engine", lambda: check_engine(device, work, tiny, new_tokens))
    trained = part("b_training", lambda: check_training(device, work / "train", tiny, steps, probs))
    if trained:
        part("c_scorer", lambda: check_scorer(device, Path(trained["ppm_dir"]), probs))
    else:
        summary["parts"]["c_scorer"] = {"ok": False, "error": "not run: part b trained no PPM"}
    # The round searches with part b's SFT policy when there is one (trained on solutions of these problems).
    sft_policy = Path(trained["policy_dir"]) if trained else None
    part("d_round", lambda: run_tiny_round(device, work / "round", tiny, use_ray, bootstrap=sft_policy))
    summary["ok"] = all(p["ok"] for p in summary["parts"].values())
    summary["wall_s"] = round(time.perf_counter() - t_all, 2)
    summary["within_8_minutes"] = summary["wall_s"] <= 480  # the bound for the GPU run (install excluded)
    emit(summary, out_path, json_fd)
    say(f"{'OK' if summary['ok'] else 'FAILED'}: {summary['wall_s']} s in all")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
