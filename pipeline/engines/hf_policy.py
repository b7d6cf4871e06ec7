"""The transformers policy backend: continuous batching over ``past_key_values``, built for CPU costs.

On the embedded CPU run prompt tokens dominate (~200 tokens/s prefill vs a few ms per decoded row), and
``model.generate`` with ``num_return_sequences=k`` prefills every prompt k times. This backend instead
(``pipeline.engines.batcher`` holds the loop):

1. keeps the KV of prompts it has prefilled in a bounded ``PrefixStore``: the builder's shared prefix
   (instruction + examples, pinned) and every tree node's question + history, so the prompt of a node's
   child prefills only its own new step;
2. prefills each *distinct* prompt once, batched, and copies its KV to its k sample rows, one
   ``torch.Generator`` per row (seeded from the state's seed and the sample index: reproducible, per request);
3. runs every caller's rows in one running batch (the engine actor serves its callers concurrently), drops a
   row as soon as it writes a stop string or EOS, and refills its slot with queued requests;
4. on CPU, holds the shared prefix's KV once instead of once per row, rows' caches starting after it, and
   attends to it once per step for all rows (``pipeline.engines.cascade``; ``shared_prefix_attention``).

At start the engine picks its CPU numeric path (fp32, bf16 or int8 linear layers) by a short probe: the fastest
path whose greedy text equals fp32's, remembered per machine (``pipeline.engines.fastpath``), unless
``cpu_fast_path`` names one.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from mcts.protocols import Proposal, SearchState
from pipeline.engines import compute
from pipeline.engines.common import EngineError, GenStats, cut_at_stop, sample_seed, stop_strings
from pipeline.engines.config import GenerationConfig
from pipeline.engines.prompts import PromptBuilder

_TOPK_FIRST = 256  # candidates tried before a full sort for top-p
# Top-p candidates by blocks: each row's vocabulary is cut into blocks of _BLOCK tokens and only its _BLOCKS blocks
# with the highest maximum are searched for the nucleus (torch's topk over a 49k vocabulary cost 7-10 ms a decode
# step at 56-64 rows, a block maximum ~0.5 ms). Used for vocabularies of at least _BLOCK_MIN_VOCAB tokens.
_BLOCK, _BLOCKS = 64, 8
_BLOCK_MIN_VOCAB = 16 * _BLOCK * _BLOCKS
_PREFIX_FORWARDS = 4  # most forwards of the shared prefix made to get two that agree bit for bit
# The fast-path probe's greedy check decodes this question in the engine's own prompt (pipeline.engines.fastpath).
PROBE_QUESTION = "Tom has 12 apples and buys 30 more. How many apples does he have now?"


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EngineError(f"device={device!r}: no CUDA device is visible here; use device='cpu' or 'auto'")
    return device


def pick_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


class TransformersPolicy:
    """``mcts.protocols.Policy`` on a transformers causal LM (CPU or one GPU)."""

    concurrent_calls = True  # callers on several threads share the running batch (pipeline.actors.PolicyEngine)

    def __init__(
        self,
        model_path: str | Path,
        builder: PromptBuilder,
        gen: GenerationConfig,
        mode: str = "step",
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_batch_rows: int = 64,
        share_prefix: bool = True,
        cpu_fast_path: str = "fp32",
        prefix_cache_mb: int = 1024,
        shared_prefix_attention: bool = True,
        group_attention: bool = False,
        fused_admission: bool = True,
        packed_linears: bool = True,
        fused_kernels: bool = True,
        fused_attention: bool = True,
    ):
        from transformers import AutoModelForCausalLM

        from pipeline.engines import fastpath
        from pipeline.engines.gemm import rows_are_independent
        from pipeline.engines.process import prepare_process

        # Before the running batch's thread (glibc's per-thread arenas would keep freed KV); the gemm setting only
        # takes if this process has not multiplied matrices yet.
        prepare_process()
        from pipeline.engines.batcher import RunningBatch
        from pipeline.engines.kv_cache import PrefixStore
        from pipeline.engines.probe_cache import ProbeCache, cache_dir, reprobe_requested, weights_id

        if max_batch_rows < 1:
            raise ValueError(f"max_batch_rows={max_batch_rows}: must be >= 1")
        self.device = pick_device(device)
        self.model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=pick_dtype(dtype, self.device))
        self.model.to(self.device).eval()
        self.flops_per_token = fastpath.linear_flops(self.model)
        self.probe = fastpath.Probe(cpu_fast_path if self.device == "cpu" else "off")
        if self.device == "cpu" and cpu_fast_path != "fp32":
            if self.model.dtype != fastpath.torch_float32():
                raise EngineError(f"cpu_fast_path={cpu_fast_path!r} converts an fp32 model; dtype={dtype!r} "
                                  f"loads {self.model.dtype}: set dtype: auto or float32, or cpu_fast_path: fp32")
            probe_ids = builder.tokenizer(builder.build(PROBE_QUESTION), add_special_tokens=False)["input_ids"]
            self.model, self.probe = fastpath.choose(self.model, cpu_fast_path, max_batch_rows, probe_ids,
                                                     ProbeCache(cache_dir()), reprobe_requested(),
                                                     weights_id(model_path), pack=packed_linears)
            print(f"transformers engine: {self.probe.summary()}", file=sys.stderr, flush=True)
        elif self.device == "cpu" and packed_linears:  # dtype: bfloat16 named: loaded in bf16, packed the same way
            from pipeline.engines.packed import pack_linears

            pack_linears(self.model)
        if self.device == "cpu" and fused_kernels and self.model.dtype != fastpath.torch_float32():
            from pipeline.engines import fused

            print(f"transformers engine: {fused.install(self.model, fused_attention)}", file=sys.stderr, flush=True)
        if self.device == "cpu" and not rows_are_independent(self.model.dtype):
            if self.model.dtype == fastpath.torch_float32():
                why = ("this process's CPU matrix products depend on the number of rows (MKL_CBWR was unset or not "
                       "strict when MKL started), so a request's text can depend on what else is batched. Start from "
                       "round.py / python -m pipeline, or export MKL_CBWR=AUTO,STRICT (pipeline/engines/gemm.py).")
            else:
                why = (f"{self.model.dtype} linear layers on this CPU give a row other bits when more rows are "
                       f"batched with it (oneDNN picks kernels by row count), so a request's sampled text can depend "
                       f"on what else is batched and a rerun need not repeat it; engines.cpu_fast_path: fp32 keeps "
                       f"requests independent (pipeline/engines/gemm.py).")
            print(f"transformers engine: warning: {why}", file=sys.stderr, flush=True)
        # Cascade attention over the shared prefix (CPU: its kernel returns the log-sum-exp the merge needs).
        self.cascade = shared_prefix_attention and share_prefix and self.device == "cpu"
        if self.cascade:
            from pipeline.engines import cascade

            self.model.config._attn_implementation = cascade.register()
        self.tokenizer = builder.tokenizer
        self.builder = builder
        self.gen = gen
        self.mode = mode
        self.stops = stop_strings(mode)
        self.max_batch_rows = max_batch_rows
        self.share_prefix = share_prefix
        self.stats = GenStats()
        self.prefix_disagreements = 0  # extra forwards the shared prefix's KV took to repeat (_agreed_prefix_kv)
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos_ids)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(eos_ids, default=0)
        # A stop string completed by the newest token starts within the last len(stop) tokens.
        self._tail = max(len(s) for s in self.stops) + 1
        self._tok_lock = threading.Lock()  # fast tokenizers refuse concurrent use ("Already borrowed")
        self.store = PrefixStore(prefix_cache_mb << 20 if share_prefix else 0)
        self.batch = RunningBatch(self.model, self.device, max_batch_rows, self.store, self.pad_id, self.eos_ids,
                                  self._hit_stop, self._sample, self.stats)
        # Group attention rides on cascade attention's kernel: a request's rows attend to one copy of its prompt.
        self.batch.grouped = self.cascade and group_attention
        # So do fused admissions (the flattened forward's attention is cascade.attention's).
        self.batch.fused = self.cascade and fused_admission

    # -- the protocol -------------------------------------------------------------------------------

    def propose(self, states: Sequence[SearchState], k: int) -> list[list[Proposal]]:
        prompts = [self.builder.build(s.question, s.history) for s in states]
        return self.generate(prompts, [s.seed for s in states], k, names=[s.tree_id for s in states])

    def generate(
        self, prompts: Sequence[str], seeds: Sequence[int], k: int, names: Sequence[str] | None = None
    ) -> list[list[Proposal]]:
        """``k`` samples for each prompt (already templated text), reproducible from ``seeds``. Safe to call
        from several threads: their requests share the engine's running batch."""
        import torch

        from pipeline.engines.batcher import Request

        if k < 1:
            raise ValueError(f"k={k}: must be >= 1")
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: need one seed per prompt")
        if not prompts:
            return []
        t0 = time.perf_counter()
        names = list(names) if names is not None else [f"#{i}" for i in range(len(prompts))]
        with self._tok_lock:
            self._prefix()
            ids = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        budget = self.gen.max_new_tokens(self.mode)
        prefix = self.batch.prefix_ids if self.batch.shared is not None else []
        for i, row in enumerate(ids):
            if row[: len(prefix)] != prefix:
                raise EngineError(f"prompt of {names[i]} does not start with the engine's shared prefix tokens, which "
                                  f"its rows attend to once for all (engines.shared_prefix_attention); set that "
                                  f"to false for prompts built otherwise")
            if len(row) + 1 > self.max_positions:
                raise EngineError(f"prompt of {names[i]} is {len(row)} tokens; the model's context is "
                                  f"{self.max_positions}: lower search.max_depth or use a longer-context model")
        # Similar lengths are admitted together (less padding); equal prompts side by side share a prefill.
        order = sorted(range(len(prompts)), key=lambda i: (len(ids[i]), prompts[i]))
        reqs = {i: Request(ids[i], [sample_seed(seeds[i], j) for j in range(k)],
                           min(budget, self.max_positions - len(ids[i])), self.gen.temperature, self.gen.top_p)
                for i in order}
        with torch.inference_mode():
            self.batch.run([reqs[i] for i in order])
        with self._tok_lock:
            texts = [self.tokenizer.batch_decode(reqs[i].tokens, skip_special_tokens=True) for i in range(len(ids))]
        self.stats.calls += 1
        self.stats.seconds += time.perf_counter() - t0
        return [[cut_at_stop(t, self.stops) for t in row] for row in texts]

    # -- internals ----------------------------------------------------------------------------------

    @property
    def _prefix_ids(self) -> list[int] | None:
        return self.batch.prefix_ids

    def _prefix(self) -> list[int]:
        """The builder's shared prefix (instruction + examples) as token ids; its KV is computed on first use
        (every prompt of the engine starts with it) and pinned in the prefix store, or, under cascade attention,
        held once by the running batch (the store then keeps what follows it: an empty pinned entry here)."""
        batch = self.batch  # shared with with_generation's views of this engine
        if batch.prefix_ids is None:
            text = self.builder.shared_prefix if self.share_prefix else ""
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            if ids:
                kv = compute.run(self._agreed_prefix_kv, ids)
                if self.cascade:
                    batch.shared = kv
                    kv = [(k[..., :0, :], v[..., :0, :]) for k, v in kv]
                self.store.add(ids, kv, pinned=True)
                self.stats.prefill_tokens += len(ids)
            batch.prefix_ids = ids
        return batch.prefix_ids

    def _agreed_prefix_kv(self, ids: list[int]) -> list:
        """The shared prefix's per-layer KV, from a forward that an identical second forward reproduces bit for bit.

        Every request of the engine's lifetime attends to this KV, so a wrong bit in it moves every sampled text.
        In the engine actor of a Ray run, the first forward of the prefix gave other KV than the same forward
        repeated right after, in a few starts of a hundred (tiny-random kill-resume test, 2026-12-02; not
        reproduced outside Ray, cause not found). Forwards are repeated until two in a row agree, at most
        ``_PREFIX_FORWARDS``; if none do, the last is used with a warning (a run goes on, less repeatable)."""
        import torch

        from pipeline.engines.kv_cache import cache_kwargs, growing_cache, row_kv

        def forward() -> list:
            cache = growing_cache(self.model.config)
            with torch.inference_mode():
                self.model(input_ids=torch.tensor([ids], device=self.device), **cache_kwargs(self.model, cache),
                           use_cache=True, logits_to_keep=1)
                return row_kv(cache, 0, torch.arange(len(ids)))

        def same(a: list, b: list) -> bool:
            return all(torch.equal(ka, kb) and torch.equal(va, vb) for (ka, va), (kb, vb) in zip(a, b, strict=True))

        kv, n, agreed = forward(), 1, False
        while not agreed and n < _PREFIX_FORWARDS:
            again = forward()
            n += 1
            agreed, kv = same(kv, again), again
        self.prefix_disagreements = n - 2 if agreed else n - 1
        if not agreed:
            print(f"transformers engine: warning: the shared prefix's KV ({len(ids)} tokens) differed in each of {n} "
                  f"identical forwards: this process's numerics do not repeat, so sampled texts need not either; "
                  f"the last is used (README, 'Reproducibility')", file=sys.stderr, flush=True)
        elif n > 2:
            print(f"transformers engine: warning: the shared prefix's KV ({len(ids)} tokens) differed between "
                  f"identical forwards; forwards {n - 1} and {n} agreed and are used", file=sys.stderr, flush=True)
        return kv

    def _hit_stop(self, row: list[int]) -> bool:
        tail = self.tokenizer.decode(row[-self._tail :], skip_special_tokens=True)
        return any(s in tail for s in self.stops)

    @staticmethod
    def _sample(logits, gens, temperature: float, top_p: float, overwrite: bool = False):
        """One token per row: greedy at temperature 0, else top-p sampling driven by that row's generator.
        ``overwrite``: ``logits`` is the caller's scratch (fp32, contiguous) and becomes the probabilities, in place:
        the same bits as computed out of place, without two vocabulary-sized allocations a step (13 MB each at 64
        rows; ``bench/bench_sampling.py``: a replayed step of the top-k search 14.3 ms out of place, 12.1 in place).

        Batched inverse-CDF sampling: each row draws one uniform from its own generator and picks the first
        token whose cumulative probability passes it. (Per-row ``torch.multinomial`` over a 49k vocabulary
        cost ~12 ms a call, and a full sort ~180 ms per step at batch 32: most of the sampling time.) The
        nucleus is looked for in each row's top ``_TOPK_FIRST`` tokens; only a row whose mass there falls short
        of ``top_p`` (a flat distribution) is sorted in full, on its own: sorting the whole batch for it cost
        144-358 ms a call at 52-128 rows of real logits, as much as a decode step (measured 2026-12-02). On a
        large vocabulary the top tokens are first looked for in each row's best blocks (``_top_p_in_blocks``),
        which picks what the top-k search would (tied tokens in token order); the rows it cannot settle take the
        top-k search.
        """
        import torch

        if temperature == 0.0:
            return logits.argmax(-1)
        if overwrite and logits.dtype == torch.float32 and logits.is_contiguous():
            probs = torch.ops.aten._softmax.out(logits.div_(temperature), -1, False, out=logits)  # [rows, vocab]
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
        u = torch.stack([torch.rand((), generator=g, device=g.device) for g in gens]).to(probs.dtype)
        if top_p >= 1.0:
            return _inverse_cdf(probs, u)
        if probs.shape[-1] < _BLOCK_MIN_VOCAB:
            return _top_p_picks(probs, u, top_p)
        picks, ok = _top_p_in_blocks(probs, u, top_p)
        rest = (~ok).nonzero().squeeze(-1)
        if len(rest):
            picks[rest] = _top_p_picks(probs[rest], u[rest], top_p)
        return picks


def _top_p_picks(probs, u, top_p: float):
    """Top-p picks by inverse CDF over each row's descending probabilities: the nucleus is looked for in the top
    ``_TOPK_FIRST``; a row whose mass there falls short of ``top_p`` is sorted in full, on its own."""
    vals, idx = probs.topk(min(_TOPK_FIRST, probs.shape[-1]), dim=-1)
    picks = idx.gather(-1, _inverse_cdf(_nucleus(vals, top_p), u).unsqueeze(-1)).squeeze(-1)
    flat = (vals.sum(-1) < top_p).nonzero().squeeze(-1)
    if len(flat):
        vals, idx = probs[flat].sort(dim=-1, descending=True)
        picks[flat] = idx.gather(-1, _inverse_cdf(_nucleus(vals, top_p), u[flat]).unsqueeze(-1)).squeeze(-1)
    return picks


def _top_p_in_blocks(probs, u, top_p: float):
    """``_top_p_picks`` for the rows whose nucleus lies in their ``_BLOCKS`` blocks of highest maximum: ``(picks,
    ok)``, ``ok`` false for the other rows (their picks are not valid). A row is ok when its candidates' mass
    reaches ``top_p`` and the last token its nucleus keeps is likelier than every token outside the candidates
    (all are <= the best block left out), so its sorted nucleus is the one the whole row's would be. Candidates
    are taken in token order and sorted stably, so tied tokens are ordered by token id, whatever the other rows."""
    import torch

    rows, vocab = probs.shape
    if vocab % _BLOCK:
        probs = torch.nn.functional.pad(probs, (0, _BLOCK - vocab % _BLOCK))  # zeros: never picked, never kept
    best, blocks = probs.view(rows, -1, _BLOCK).amax(-1).topk(_BLOCKS + 1, dim=-1)
    blocks = blocks[:, :_BLOCKS].sort(dim=-1).values
    cols = (blocks.unsqueeze(-1) * _BLOCK + torch.arange(_BLOCK, device=probs.device)).reshape(rows, -1)
    vals, order = probs.gather(1, cols).sort(dim=-1, descending=True, stable=True)
    kept = _nucleus(vals, top_p)
    last = torch.where(kept > 0, vals, torch.full_like(vals, float("inf"))).amin(-1)
    ok = (vals.sum(-1) >= top_p) & (last > best[:, _BLOCKS])
    picks = cols.gather(1, order.gather(1, _inverse_cdf(kept, u).unsqueeze(-1))).squeeze(-1)
    return picks, ok


def _nucleus(vals, top_p: float):
    """``vals`` (each row's probabilities, descending) with everything past the smallest head whose mass reaches
    ``top_p`` zeroed (the token that crosses it stays in)."""
    return vals.masked_fill((vals.cumsum(-1) - vals) >= top_p, 0.0)


def _inverse_cdf(weights, u):
    """Per row, the first column whose cumulative weight passes ``u`` (in [0, 1)) times the row's total."""
    import torch

    cdf = weights.cumsum(-1)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).clamp(max=weights.shape[-1] - 1)
    return pick.squeeze(-1)
