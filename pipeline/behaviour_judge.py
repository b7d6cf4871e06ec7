"""An LLM judge for the four cognitive behaviours, over any OpenAI-compatible chat endpoint (optional).

The rules in ``mcts.behaviours`` are fast and free but only know the phrasings they were written for (their
held-out recall is low, see tests/mcts/test_behaviours.py). A judge model reads a whole trajectory instead, one
request per behaviour, with the four prompt categories of Gandhi et al. (2025, "Cognitive behaviors that enable
self-improving reasoners", appendix): answer verification, backtracking, subgoal setting and backward chaining.
As there, the judge counts the instances and answers ``<count>N</count>``; here it also quotes one instance in
``<evidence>...</evidence>`` so a tag carries evidence like the rules' tags do. The prompts follow the paper's
(its Countdown wording, with the target and numbers of the question when it is a Countdown problem).

    judge = BehaviourJudge(HttpConfig(endpoints=["http://127.0.0.1:8000"]), model="Qwen/Qwen2.5-7B-Instruct")
    verdicts = judge.judge(question, steps)       # one JudgeVerdict per behaviour
    tags = judge.tags(question, steps)            # mcts.behaviours.Tag for each behaviour counted > 0

Transport is the HTTP policy's (``pipeline.engines.http_policy``): endpoints round-robin, retries with
backoff on connection errors, timeouts and 5xx, a 4xx raised at once, the last failure raised with the
endpoint and the server's message. A reply without a ``<count>`` is not a failure of the transport: its
verdict has ``count=None`` and ``error`` saying what came back, and gives no tag.

``python -m pipeline.behaviour_judge RUN_DIR --round N --endpoint URL --model M [--limit K]`` judges the
round's graded trajectories (from its trees) and prints how often the judge and the rules agree per behaviour.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from mcts.behaviours import BEHAVIOURS, EVIDENCE_CHARS, StepText, Tag, question_target
from mcts.steps import render_steps
from pipeline.engines.common import EngineError
from pipeline.engines.config import HttpConfig
from pipeline.engines.http_policy import post_with_retries

_PREAMBLE = ("Here is a chain of reasoning that a language model generated while {task}. Each step is one or more "
             "'#' comment lines of reasoning, then Python code, then its printed output as '# output:' lines.\n\n"
             "Chain of reasoning:\n{trajectory}\n")
_TASK_COUNTDOWN = "trying to play the game of Countdown with the numbers {numbers}. The goal is to reach the target " \
                  "number {target}"
_TASK_MATH = "solving this problem: {question}"

# The paper's four categories: what to look for, its examples, what to count.
PROMPTS: dict[str, str] = {
    "verification": (
        "Evaluate whether the chain of reasoning contains any answer-verification steps. An example of an "
        "answer-verification step is: 'This sequence results in 1, which is not equal to 22' and 'Since 25 is not "
        "equal to 22' for explicit verification, and 'Too high!' or 'This works!' for implicit verification. We want "
        "to mark instances where the chain of reasoning explicitly checks the current result against the target "
        "number or the question's conditions, in words or in code. If you find any answer-verification steps, "
        "count them and give the count between the tags <count> </count>. If the chain of reasoning does not "
        "contain any answer-verification steps, give a count of 0 as <count>0</count>."),
    "backtracking": (
        "Evaluate whether the chain of reasoning contains any backtracking behavior, where the model realizes a "
        "path won't work and explicitly goes back to try a different approach. An example of backtracking is: "
        "'Let me try again' or 'we need to try a different sequence'. We want to mark instances where the chain of "
        "reasoning is abandoned and the model backtracks to a previous computation. Count the number of distinct "
        "backtracking instances and give the count between the tags <count> </count>. If the chain of reasoning "
        "does not contain any backtracking behavior, give a count of 0 as <count>0</count>."),
    "subgoal_setting": (
        "Evaluate whether the chain of reasoning contains any explicit subgoal setting, where the model breaks "
        "down the problem into smaller, intermediate goals. An example of subgoal setting is: 'First, I'll try to "
        "get close to {half}, then...'. Count the number of distinct subgoals set and give the count between the "
        "tags <count> </count>. If the chain of reasoning does not contain any subgoal setting, give a count of 0 "
        "as <count>0</count>."),
    "backward_chaining": (
        "Evaluate whether the chain of reasoning contains any backward-chaining behavior, where the model starts "
        "from the target and works backwards to the initial numbers or facts. An example of backward-chaining when "
        "the target is 24 and the numbers are 12 and 2 is: 'Let's work backwards from the target. 24/2 = 12. So, "
        "12*2=24.' and if the target is 22 and the numbers are 25 and 3 is: 'Since the target is 22, and 22 + 3 = "
        "25, ...'. Count the number of distinct backward-chaining instances and give the count between the tags "
        "<count> </count>. If the chain of reasoning does not contain any backward-chaining behavior, give a count "
        "of 0 as <count>0</count>."),
}
_EVIDENCE_ASK = ("\nIf the count is above 0, also quote the shortest passage that shows one instance, between the "
                 "tags <evidence> </evidence>.")
_COUNT = re.compile(r"<count>\s*(\d+)\s*</count>", re.IGNORECASE)
_EVIDENCE = re.compile(r"<evidence>\s*(.*?)\s*</evidence>", re.IGNORECASE | re.DOTALL)
_NUMBERS = re.compile(r"Using the numbers ([\d, ]+), make", re.IGNORECASE)


@dataclass(frozen=True)
class JudgeVerdict:
    behaviour: str
    count: int | None  # instances the judge counted; None when its reply held no <count>
    evidence: str  # the quoted passage ('' when none)
    reply: str  # the judge's whole reply, for auditing
    error: str | None = None  # why count is None


def chat_url(endpoint: str) -> str:
    base = endpoint.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    return base + "/chat/completions"


def build_prompt(behaviour: str, question: str, steps: Sequence[StepText]) -> str:
    """The judge's user message for one behaviour (see module doc)."""
    trajectory = render_steps([(s.text, s.output, i == len(steps) - 1) for i, s in enumerate(steps)])
    target = question_target(question)
    numbers = _NUMBERS.search(question)
    if target is not None and numbers:
        task = _TASK_COUNTDOWN.format(numbers="[" + numbers.group(1).strip() + "]", target=target)
    else:
        task = _TASK_MATH.format(question=question.strip())
    half = int(target) // 2 if target is not None else 50
    return _PREAMBLE.format(task=task, trajectory=trajectory) + "\n" + PROMPTS[behaviour].format(half=half) \
        + _EVIDENCE_ASK


def parse_reply(behaviour: str, reply: str) -> JudgeVerdict:
    counts = _COUNT.findall(reply)
    if not counts:
        return JudgeVerdict(behaviour, None, "", reply, f"no <count>N</count> in the judge's reply {reply[:120]!r}")
    evidence = _EVIDENCE.findall(reply)
    return JudgeVerdict(behaviour, int(counts[-1]), " ".join(evidence[-1].split()) if evidence else "", reply)


def _locate(evidence: str, steps: Sequence[StepText]) -> int:
    """The index of the step whose text holds the evidence (whitespace-insensitive), -1 if none does."""
    needle = " ".join(evidence.split()).lower()
    if not needle:
        return -1
    for i, s in enumerate(steps):
        if needle in " ".join(s.text.split()).lower():
            return i
    return -1


class BehaviourJudge:
    """Four chat requests per trajectory, one per behaviour, to an OpenAI-compatible ``/v1/chat/completions``."""

    def __init__(self, cfg: HttpConfig, model: str, max_tokens: int = 512, session=None):
        import requests

        if not cfg.endpoints:
            raise ValueError("behaviour judge: http endpoints is empty; give a server URL, e.g. http://127.0.0.1:8000")
        self.cfg = cfg
        self.model = cfg.served_model or model
        self.max_tokens = max_tokens
        self.urls = [chat_url(e) for e in cfg.endpoints]
        self._next = itertools.count()
        self._session = session or requests.Session()
        self._requests = requests

    def judge(self, question: str, steps: Sequence[StepText],
              behaviours: Sequence[str] = BEHAVIOURS) -> list[JudgeVerdict]:
        out = []
        for b in behaviours:
            body = {"model": self.model, "temperature": 0.0, "max_tokens": self.max_tokens,
                    "messages": [{"role": "user", "content": build_prompt(b, question, steps)}]}
            data = self._post(body, b)
            try:
                reply = data["choices"][0]["message"]["content"] or ""
            except (KeyError, IndexError, TypeError):
                raise EngineError(f"behaviour judge: reply for {b} is not a chat completion (no "
                                  f"choices[0].message.content): {json.dumps(data)[:300]}") from None
            out.append(parse_reply(b, reply))
        return out

    def tags(self, question: str, steps: Sequence[StepText]) -> list[Tag]:
        """A tag per behaviour the judge counted at least once; ``step`` is where its evidence is (-1: not found)."""
        return [Tag(v.behaviour, _locate(v.evidence, steps), v.evidence[:EVIDENCE_CHARS], "judge")
                for v in self.judge(question, steps) if v.count]

    def _post(self, body: dict, what: str) -> dict:
        return post_with_retries(
            self._session, self._requests, lambda: self.urls[next(self._next) % len(self.urls)], body, self.cfg,
            rejected=lambda url, status, text: (f"behaviour judge: {url} rejected the {what} request with {status}: "
                                                f"{text} (check --model and that the server serves chat)"),
            failed=lambda attempts, last: (f"behaviour judge: the {what} request failed {attempts} times; last error "
                                           f"{last}. Check that the judge server is up, or raise --retries / --timeout"),
        )


def main(argv: list[str] | None = None) -> int:
    from mcts.behaviours import behaviours_of, tag_trajectory
    from mcts.serialize import tree_from_rows
    from pipeline.storage import RunDir

    p = argparse.ArgumentParser(prog="python -m pipeline.behaviour_judge", description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--round", type=int, required=True)
    p.add_argument("--endpoint", action="append", required=True, help="OpenAI-compatible server URL (repeatable)")
    p.add_argument("--model", required=True, help="the judge model's name on the server")
    p.add_argument("--limit", type=int, default=50, help="graded trajectories to judge (default 50)")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--retries", type=int, default=4)
    a = p.parse_args(argv)
    judge = BehaviourJudge(HttpConfig(endpoints=a.endpoint, timeout_s=a.timeout, max_retries=a.retries), a.model)
    agree = {b: 0 for b in BEHAVIOURS}
    judged = 0
    for table in RunDir(a.run_dir).trees(a.round).iter_trees():
        tree = tree_from_rows(table.to_pylist())
        for leaf in tree.terminals():
            if judged >= a.limit or leaf.verdict not in ("correct", "wrong"):
                continue
            steps = [StepText(n.text, n.stdout) for n in tree.path(leaf.id)]
            rules = set(behaviours_of(tag_trajectory(steps, tree.info.question)))
            llm = set(behaviours_of(judge.tags(tree.info.question, steps)))
            judged += 1
            for b in BEHAVIOURS:
                agree[b] += (b in rules) == (b in llm)
            print(json.dumps({"problem_id": tree.info.problem_id, "leaf_id": leaf.id, "verdict": leaf.verdict,
                              "rules": sorted(rules), "judge": sorted(llm)}))
        if judged >= a.limit:
            break
    if not judged:
        print(f"error: {a.run_dir} round {a.round}: no graded trajectories to judge", file=sys.stderr)
        return 2
    for b in BEHAVIOURS:
        print(f"{b:18s} judge and rules agree on {agree[b]}/{judged} trajectories", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
