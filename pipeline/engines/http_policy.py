"""The HTTP policy backend: an OpenAI-compatible completions endpoint (`vllm serve`, SGLang), or several.

One request per search state asks for ``n=k`` samples of the templated prompt (the server does no
templating: the completions API takes raw text, so prompts are byte-identical to the other backends).
Requests go round-robin over the endpoints, several in flight at once; a connection error, timeout or
5xx is retried on the next endpoint after an exponential backoff, and the last failure is raised with
the endpoint, the attempt count and the server's message. A 4xx is the request's fault: raised at once.

Which stop string ended a sample: vLLM reports it as ``stop_reason``, SGLang as ``matched_stop``; a server
that reports neither gives ``stop=None`` even when a stop string ended the text.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from mcts.protocols import Proposal, SearchState
from pipeline.engines.common import EngineError, stop_strings
from pipeline.engines.config import GenerationConfig, HttpConfig
from pipeline.engines.prompts import PromptBuilder


def completions_url(endpoint: str) -> str:
    base = endpoint.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    return base + "/completions"


class HttpPolicy:
    """``mcts.protocols.Policy`` over OpenAI-compatible ``/v1/completions`` servers."""

    def __init__(self, cfg: HttpConfig, served_model: str, builder: PromptBuilder, gen: GenerationConfig,
                 mode: str = "step", session=None):
        import requests

        if not cfg.endpoints:
            raise ValueError("http.endpoints is empty: list at least one server URL, e.g. http://127.0.0.1:8000")
        self.cfg = cfg
        self.model = cfg.served_model or served_model
        self.builder = builder
        self.gen = gen
        self.mode = mode
        self.stops = stop_strings(mode)
        self.urls = [completions_url(e) for e in cfg.endpoints]
        self._next = itertools.count()
        self._lock = threading.Lock()
        self._session = session or requests.Session()
        self._requests = requests

    def propose(self, states: Sequence[SearchState], k: int) -> list[list[Proposal]]:
        if k < 1:
            raise ValueError(f"k={k}: must be >= 1")
        if not states:
            return []
        with ThreadPoolExecutor(max_workers=min(self.cfg.concurrency, len(states))) as pool:
            return list(pool.map(lambda s: self._one(s, k), states))

    def _endpoint(self) -> str:
        with self._lock:
            return self.urls[next(self._next) % len(self.urls)]

    def _one(self, state: SearchState, k: int) -> list[Proposal]:
        body = {
            "model": self.model,
            "prompt": self.builder.build(state.question, state.history),
            "n": k,
            "max_tokens": self.gen.max_new_tokens(self.mode),
            "temperature": self.gen.temperature,
            "top_p": self.gen.top_p,
            "stop": list(self.stops),
            "seed": state.seed,
        }
        data = self._post(body, f"tree {state.tree_id}")
        choices = sorted(data.get("choices", []), key=lambda c: c.get("index", 0))
        if len(choices) != k:
            raise EngineError(f"HTTP policy: asked {self.model!r} for n={k} samples (tree {state.tree_id}), got "
                              f"{len(choices)}; the server must support 'n' in /v1/completions")
        return [self._proposal(c) for c in choices]

    def _proposal(self, choice: dict) -> Proposal:
        text = choice.get("text", "")
        matched = choice.get("stop_reason", choice.get("matched_stop"))
        stop = matched if isinstance(matched, str) and matched in self.stops else None
        # Servers strip the stop string; one that echoes it (include_stop_str_in_output) is cut here too.
        if stop is not None and text.endswith(stop):
            text = text[: -len(stop)]
        return Proposal(text=text, stop=stop)

    def _post(self, body: dict, what: str) -> dict:
        return post_with_retries(
            self._session, self._requests, self._endpoint, body, self.cfg,
            rejected=lambda url, status, text: (f"HTTP policy: {url} rejected the request for {what} with {status}: "
                                                f"{text} (check http.served_model and the sampling settings)"),
            failed=lambda attempts, last: (f"HTTP policy: request for {what} failed {attempts} times; last error "
                                           f"{last}. Check that the servers in http.endpoints are up, or raise "
                                           f"http.max_retries / http.timeout_s"),
        )


def post_with_retries(session, requests_module, next_url: Callable[[], str], body: dict, cfg: HttpConfig, *,
                      rejected: Callable[[str, int, str], str], failed: Callable[[int, str], str]) -> dict:
    """POST ``body`` as JSON to ``next_url()`` (a fresh endpoint per attempt) and return the reply's JSON.

    Connection errors, timeouts and 5xx replies are retried up to ``cfg.max_retries`` times with exponential
    backoff (``cfg.backoff_s`` x 2^attempt); a 4xx reply is the caller's mistake and raises at once with
    ``rejected(url, status, first 300 chars of the body)``; running out of attempts raises with
    ``failed(attempts, last error)``."""
    attempts = cfg.max_retries + 1
    last = ""
    for attempt in range(attempts):
        url = next_url()
        try:
            resp = session.post(url, json=body, timeout=cfg.timeout_s)
        except (requests_module.ConnectionError, requests_module.Timeout) as e:
            last = f"{url}: {type(e).__name__}: {e}"
        else:
            if resp.status_code < 400:
                return resp.json()
            if resp.status_code < 500:
                raise EngineError(rejected(url, resp.status_code, resp.text[:300]))
            last = f"{url}: HTTP {resp.status_code}: {resp.text[:300]}"
        if attempt + 1 < attempts:
            time.sleep(cfg.backoff_s * (2**attempt))
    raise EngineError(failed(attempts, last))
