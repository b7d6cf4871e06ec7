"""The transformers policy backend: a sampling loop over ``past_key_values``, built for CPU prefill costs.

On the embedded CPU run prompt tokens dominate (~200 tokens/s prefill vs a few ms per decoded row), and
``model.generate`` with ``num_return_sequences=k`` prefills every prompt k times. This loop instead:

1. computes the KV of the builder's shared prefix (instruction + examples) once per engine;
2. prefills each *distinct* prompt's remaining tokens once, batched, on top of that prefix;
3. copies each prompt's KV to its k sample rows and decodes them together, one ``torch.Generator``
   per row (seeded from the state's seed and the sample index: reproducible, per request);
4. drops a row from the batch as soon as it writes a stop string or EOS, so finished rows cost nothing.

Row layout in the cache: ``[shared prefix | left padding | prompt suffix | generated]``; the attention
mask zeroes the padding and position ids skip it, so every row sees the same positions it would alone.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mcts.protocols import Proposal, SearchState
from pipeline.engines.common import EngineError, cut_at_stop, sample_seed, stop_strings
from pipeline.engines.config import GenerationConfig
from pipeline.engines.prompts import PromptBuilder

_TOPK_FIRST = 256  # candidates tried before a full sort for top-p


@dataclass
class GenStats:
    """Cumulative work of one engine: what the benchmark and the logs report."""

    calls: int = 0
    prefill_tokens: int = 0  # prompt tokens actually run through the model (shared prefix counted once)
    new_tokens: int = 0  # sampled tokens, stop/EOS tokens included
    seconds: float = 0.0


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
    ):
        from transformers import AutoModelForCausalLM

        if max_batch_rows < 1:
            raise ValueError(f"max_batch_rows={max_batch_rows}: must be >= 1")
        self.device = pick_device(device)
        self.model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=pick_dtype(dtype, self.device))
        self.model.to(self.device).eval()
        self.tokenizer = builder.tokenizer
        self.builder = builder
        self.gen = gen
        self.mode = mode
        self.stops = stop_strings(mode)
        self.max_batch_rows = max_batch_rows
        self.share_prefix = share_prefix
        self.stats = GenStats()
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos_ids)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(eos_ids, default=0)
        # A stop string completed by the newest token starts within the last len(stop) tokens.
        self._tail = max(len(s) for s in self.stops) + 1
        self._prefix_ids: list[int] | None = None
        self._prefix_cache = None

    # -- the protocol -------------------------------------------------------------------------------

    def propose(self, states: Sequence[SearchState], k: int) -> list[list[Proposal]]:
        prompts = [self.builder.build(s.question, s.history) for s in states]
        return self.generate(prompts, [s.seed for s in states], k, names=[s.tree_id for s in states])

    def generate(
        self, prompts: Sequence[str], seeds: Sequence[int], k: int, names: Sequence[str] | None = None
    ) -> list[list[Proposal]]:
        """``k`` samples for each prompt (already templated text), reproducible from ``seeds``."""
        import torch

        if k < 1:
            raise ValueError(f"k={k}: must be >= 1")
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: need one seed per prompt")
        if not prompts:
            return []
        t0 = time.perf_counter()
        names = list(names) if names is not None else [f"#{i}" for i in range(len(prompts))]
        ids = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        budget = self.gen.max_new_tokens(self.mode)
        for i, row in enumerate(ids):
            if len(row) + 1 > self.max_positions:
                raise EngineError(f"prompt of {names[i]} is {len(row)} tokens; the model's context is "
                                  f"{self.max_positions}: lower search.max_depth or use a longer-context model")
        # Similar lengths batch together (less padding); equal prompts end up side by side and share a prefill.
        order = sorted(range(len(prompts)), key=lambda i: (len(ids[i]), prompts[i]))
        per_chunk = max(1, self.max_batch_rows // k)
        out: list[list[Proposal]] = [[] for _ in prompts]
        with torch.inference_mode():
            for start in range(0, len(order), per_chunk):
                chunk = order[start : start + per_chunk]
                results = self._generate_chunk([ids[i] for i in chunk], [seeds[i] for i in chunk], k, budget)
                for i, res in zip(chunk, results, strict=True):
                    out[i] = res
        self.stats.calls += 1
        self.stats.seconds += time.perf_counter() - t0
        return out

    # -- internals ----------------------------------------------------------------------------------

    def _prefix(self):
        """(prefix token ids, KV cache of the prefix for batch 1); computed on first use."""
        import torch

        from pipeline.engines.kv_cache import growing_cache

        if self._prefix_ids is None:
            text = self.builder.shared_prefix if self.share_prefix else ""
            self._prefix_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            if self._prefix_ids:
                cache = growing_cache(self.model.config)
                ids = torch.tensor([self._prefix_ids], device=self.device)
                self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                self._prefix_cache = cache
                self.stats.prefill_tokens += len(self._prefix_ids)
        return self._prefix_ids, self._prefix_cache

    def _generate_chunk(self, ids: list[list[int]], seeds: list[int], k: int, budget: int) -> list[list[Proposal]]:
        import torch

        from pipeline.engines.kv_cache import growing_cache

        prefix_ids, prefix_cache = self._prefix()
        p = len(prefix_ids)
        if p and not all(row[:p] == prefix_ids for row in ids):
            p = 0  # a template that tokenizes the boundary differently: run whole prompts (correct, slower)
        # Distinct prompts, each prefilled once.
        uniq: dict[tuple[int, ...], int] = {}
        req_to_uniq = [uniq.setdefault(tuple(row), len(uniq)) for row in ids]
        suffixes = [list(u[p:]) for u in uniq]
        width = max(len(s) for s in suffixes)
        n_u = len(suffixes)
        dev = self.device
        input_ids = torch.full((n_u, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n_u, p + width), dtype=torch.long)
        mask[:, :p] = 1
        for i, s in enumerate(suffixes):
            input_ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, p + width - len(s) :] = 1
        # Positions continue after the prefix and skip the padding: row i's suffix sits at p .. p+len-1.
        positions = (p + mask[:, p:].cumsum(-1) - 1).clamp(min=p)
        if p:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(n_u)
        else:
            cache = growing_cache(self.model.config)
        out = self.model(
            input_ids=input_ids.to(dev), attention_mask=mask.to(dev), position_ids=positions.to(dev),
            past_key_values=cache, use_cache=True, logits_to_keep=1,
        )
        self.stats.prefill_tokens += sum(len(s) for s in suffixes)

        # k rows per request, each pointing at its distinct prompt's KV.
        row_src = torch.tensor([req_to_uniq[r] for r in range(len(ids)) for _ in range(k)], device=dev)
        cache.batch_select_indices(row_src)
        logits = out.logits[:, -1, :].float()[row_src]
        mask = mask.to(dev)[row_src]
        next_pos = torch.tensor([p + len(suffixes[req_to_uniq[r]]) for r in range(len(ids)) for _ in range(k)],
                                device=dev)
        gens = []
        for r in range(len(ids)):
            for j in range(k):
                g = torch.Generator(device=dev)
                g.manual_seed(sample_seed(seeds[r], j))
                gens.append(g)
        n_rows = len(gens)
        budgets = [min(budget, self.max_positions - len(ids[r // k])) for r in range(n_rows)]
        tokens: list[list[int]] = [[] for _ in range(n_rows)]
        active = list(range(n_rows))  # row ids still decoding, in batch order
        while True:
            chosen = self._sample(logits, [gens[r] for r in active]).tolist()
            keep: list[int] = []
            for pos, (r, tok) in enumerate(zip(active, chosen, strict=True)):
                self.stats.new_tokens += 1
                if tok in self.eos_ids:
                    continue
                tokens[r].append(tok)
                if len(tokens[r]) >= budgets[r] or self._hit_stop(tokens[r]):
                    continue
                keep.append(pos)
            if not keep:
                break
            if len(keep) < len(active):
                sel = torch.tensor(keep, device=dev)
                cache.batch_select_indices(sel)
                mask, next_pos = mask[sel], next_pos[sel]
                chosen = [chosen[i] for i in keep]
                active = [active[i] for i in keep]
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=-1)
            step = self.model(
                input_ids=torch.tensor(chosen, device=dev).unsqueeze(-1), attention_mask=mask,
                position_ids=next_pos.unsqueeze(-1), past_key_values=cache, use_cache=True,
            )
            logits = step.logits[:, -1, :].float()
            next_pos = next_pos + 1
        texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return [[cut_at_stop(texts[r * k + j], self.stops) for j in range(k)] for r in range(len(ids))]

    def _hit_stop(self, row: list[int]) -> bool:
        tail = self.tokenizer.decode(row[-self._tail :], skip_special_tokens=True)
        return any(s in tail for s in self.stops)

    def _sample(self, logits, gens):
        """One token per row: greedy at temperature 0, else top-p sampling driven by that row's generator.

        Batched inverse-CDF sampling: each row draws one uniform from its own generator and picks the first
        token whose cumulative probability passes it. (Per-row ``torch.multinomial`` over a 49k vocabulary
        cost ~12 ms a call, and a full sort ~180 ms per step at batch 32: most of the sampling time.)
        """
        import torch

        if self.gen.temperature == 0.0:
            return logits.argmax(-1)
        probs = torch.softmax(logits / self.gen.temperature, dim=-1)  # [rows, vocab]
        if self.gen.top_p < 1.0:
            # The nucleus almost always lies in the top few hundred tokens; sort everything only when not.
            vals, idx = probs.topk(min(_TOPK_FIRST, probs.shape[-1]), dim=-1)
            if bool((vals.sum(-1) < self.gen.top_p).any()):
                vals, idx = probs.sort(dim=-1, descending=True)
            # Keep the smallest head whose mass reaches top_p (the token that crosses it stays in).
            vals = vals.masked_fill((vals.cumsum(-1) - vals) >= self.gen.top_p, 0.0)
        else:
            vals, idx = probs, None
        u = torch.stack([torch.rand((), generator=g, device=g.device) for g in gens]).to(vals.dtype)
        cdf = vals.cumsum(-1)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).clamp(max=vals.shape[-1] - 1)
        return pick.squeeze(-1) if idx is None else idx.gather(-1, pick).squeeze(-1)
