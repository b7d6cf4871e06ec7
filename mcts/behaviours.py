"""Cognitive behaviours in a trajectory's steps: verification, backtracking, subgoal setting, backward chaining.

Gandhi et al. (2025, "Cognitive behaviors that enable self-improving reasoners") find these four behaviours in
a base model's outputs predict whether self-improvement works. This module finds them with rules over the two
parts of a step (``mcts.steps``): the reasoning comments and the code. Each tag carries the step it was found
in, a short evidence span (the line that fired, at most ``EVIDENCE_CHARS`` characters) and the rule's name.

    tags = tag_trajectory([StepText("# 11 + 5 is 16, not 19. Try multiplying instead.\\nb = 8 * 3", "24"), ...],
                          question)
    behaviours_of(tags)   # ['verification', 'backtracking'] in BEHAVIOURS order

What each rule looks for (the labelled set in tests/mcts/data/ states the labelling guide they were judged by):

- verification: check words ("verify", "double-check", "check that", "make sure", "confirm that"), judgements
  of a result ("this works", "not equal to", "16, not 19", "too big", "which is the target", "should give"),
  or code that compares (``==`` / ``!=`` / ``assert``; a ``% d == 0`` divisibility test is not a check);
- backtracking: a stated failure or change of course ("does not work", "try another", "instead" but not
  "instead of", "start over", "go back", "redo", "recompute", "wait,", "actually,", "mistake"), or code that
  silently throws a sub-result away: it reassigns a variable an earlier step set, from an expression that uses
  neither the variable nor the value that step printed;
- subgoal_setting: an explicit plan or intermediate objective ("first ...", "step 1:", "plan:", "our goal is",
  "we need to find ...", "get close to", "break the problem into");
- backward_chaining: "work backwards", "start from the target", or - when the question names a target number
  (Countdown's "make N", or "target N") - the target on the left of a decomposition ("54 is 56 - 2",
  "84 / 4 = 21"), "to make N we need", or code that starts from it (``target - 11``, ``120 // 8``).

A trajectory's behaviours are the union of its steps' tags, each step read with the steps before it (the
silent-restart rule needs them). The final ``The answer is \\boxed{}`` line and ``# output:`` lines are never
read as reasoning. Pure functions, no I/O: the export, the report and SFT selection all call them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mcts.tree import Tree

VERIFICATION = "verification"
BACKTRACKING = "backtracking"
SUBGOAL_SETTING = "subgoal_setting"
BACKWARD_CHAINING = "backward_chaining"
BEHAVIOURS: tuple[str, ...] = (VERIFICATION, BACKTRACKING, SUBGOAL_SETTING, BACKWARD_CHAINING)
EVIDENCE_CHARS = 80


@dataclass(frozen=True)
class StepText:
    """What the tagger reads of one step: its text as written (comments + code) and what its code printed."""

    text: str
    output: str = ""


@dataclass(frozen=True)
class Tag:
    behaviour: str  # one of BEHAVIOURS
    step: int  # index of the step in the trajectory
    evidence: str  # the line that fired, trimmed to EVIDENCE_CHARS
    rule: str  # the rule's name, e.g. 'verification.code_compare'


def _rx(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


# (rule name, pattern), matched against one reasoning line at a time, case-insensitively.
_VERIFICATION_WORDS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("check_word", _rx(r"\bverif(?:y|ies|ied|ying|ication)\b|\bdouble[- ]?check|\bsanity\b|\bcross[- ]check"
                       r"|\b(?:let'?s|let me|to) see (?:if|whether)\b")),
    ("check_verb", _rx(r"(?:^|\blet'?s |\blet me |\bwe |\bi |\bto |\bnow,? |\band |\bthen )check\b"
                       r"|\bcheck(?:ing)? (?:that|if|whether|again|it|this|the result|our|my)\b|\bby checking\b")),
    ("confirm", _rx(r"\b(?:to|let'?s|let me|which|this) confirms?\b|\bconfirm(?:s|ed|ing)? (?:that|it|this)\b")),
    ("make_sure", _rx(r"\bmake sure\b|\bensure (?:that|it)\b")),
    ("judgement", _rx(r"\b(?:this|that|it) works\b|\bworks[.!]|\bis (?:not )?equal to\b|\bequals the (?:target|total)\b"
                      r"|\bwhich (?:is|equals|matches) the (?:target|goal|total)\b|\bwhich matches\b"
                      r"|\bmatch(?:es)? the (?:target|total|original|question)\b|\b(?:both|all) (?:ways|methods) give\b"
                      r"|\bgives? the same\b|\b(?:is|are) (?:indeed|correct|right)\b|\btoo (?:big|large|high|small|low)\b"
                      r"|\bshould (?:give|equal|make|get|come to)\b|\bshould be \d|\bis (?:off|wrong) by\b"
                      r"|\bgives? back\b|\b(?:over|under)shoots?\b|\bis \d+ (?:more|less|fewer|bigger|smaller) than \d")),
    # A question the model asks itself about a value ("Is it the target?", "Does 6 * 4 give 24?"), or its answer.
    ("self_question", _rx(r"^(?:is|does|do|did|are|can|will|would|could|was)\b[^?]*\?|(?:^|[.!,] )yes\b"
                          r"|,\s*no[.!]?$")),
)

_BACKTRACKING_WORDS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("failure", _rx(r"\b(?:does ?n[o']t|did ?n[o']t|won'?t|will not|cannot|can'?t|doesn't|does not) work\b"
                    r"|\b(?:path|approach|attempt|idea|way|this|that) (?:fails|failed|is a dead end)\b|\bdead end\b"
                    r"|\bno good\b|\b(?:was|is) (?:a )?(?:mistake|wrong|incorrect)\b|\bmistake\b|\bnot right\b")),
    ("change_course", _rx(r"\btry (?:a different|another|something else|again|the other|other)\b"
                          r"|\b(?:let'?s|let me) (?:try|use) (?:a different|another|something else)\b"
                          r"|\bstart (?:over|again)\b|\bgo(?:ing)? back\b|\bbacktrack|\bre-?do\b|\bre-?comput|\bre-?calculat"
                          r"|\bscrap\b|\babandon|\binstead\b(?! of)|\bscratch that\b|\bnever ?mind\b|\brethink"
                          r"|\breconsider|\bon second thought|\bnot it\b|\b(?:does ?n[o']t|won'?t|can'?t|cannot) "
                          r"(?:give|reach|get|make) (?:it|the target|\d)")),
    ("interjection", _rx(r"^(?:wait|actually|oops|hmm, no|no)[,.!:]|\bwait[,!]|\bactually,")),
)

_SUBGOAL_WORDS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("first", _rx(r"^first\b(?! (?:number|one|day|week|month|year|box|bag|time|person|pen|item)s?\b)|\bfirst,"
                  r"|\b(?:we|i|let'?s) first\b|(?<!at )\bfirst (?:we|i|let'?s|find|compute|calculate|get|make|work out"
                  r"|figure|need)\b")),
    ("plan", _rx(r"\bstep \d+\s*[:.)]|\bplan\s*:|\b(?:our|the|my) goal is\b|\bsub-?goals?\b"
                 r"|\bbreak (?:it|this|the problem|the task) (?:down|into)\b|\bin (?:two|three|2|3) (?:steps|parts)\b"
                 r"|\bgoal\s*:|\b(?:i|we)(?:'ll| will| are going to|'re going to) (?:first )?\w+\b.*\bthen\b"
                 r"|(?<!at )\bfirst\b.*\bthen\b")),
    ("need_to", _rx(r"\b(?:we|i) (?:first )?(?:need|have|want) to (?:find|get|make|compute|calculate|know|work out"
                    r"|figure out|reach|build|take|determine|combine)\b|\b(?:we|i) (?:first )?need (?:the|a|an)\b"
                    r"|\bget (?:close|closer|near) to\b|\baim for\b")),
)

_BACKWARD_WORDS = _rx(r"\bwork(?:ing|s)? backwards?\b|\bbackwards? from\b|\breason(?:ing)? backwards?\b"
                      r"|\b(?:work|working|reason|reasoning|go|going|count|counting) back from\b"
                      r"|\b(?:last|final) (?:operation|step|move) (?:must|should|has to)\b"
                      r"|\bstart(?:ing)? (?:from|with|at) the (?:target|goal|end)\b|\bfrom the target\b")
_TARGET_IN_QUESTION = _rx(r"\bmake (\d+)\s*[.,;]|\btarget (?:number )?(?:is |of )?(\d+)\b|\breach (\d+)\s*[.,;]")
_ANSWER_LINE = _rx(r"\banswer is\b.*\\boxed\{|^\\boxed\{")
_COMPARE = re.compile(r"(?<![=!<>])==(?!=)|!=|\bassert\b|\bmath\.isclose\(")
_DIVISIBILITY = re.compile(r"%\s*[\w.()]+\s*[=!]=")
_ASSIGN = re.compile(r"^\s*([A-Za-z_]\w*)\s*=(?!=)\s*(.+)$")
_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?")


def _evidence(line: str) -> str:
    s = " ".join(line.split())
    return s if len(s) <= EVIDENCE_CHARS else s[: EVIDENCE_CHARS - 3] + "..."


def _split(text: str) -> tuple[list[str], list[str]]:
    """(reasoning lines without '#', code lines) of one step; output lines and the boxed answer line dropped."""
    reasoning: list[str] = []
    code: list[str] = []
    for raw in text.splitlines():
        st = raw.strip()
        if not st or st.startswith("# output:") or st in ("<end_of_step>", "<end_of_answer>"):
            continue
        if st.startswith("#"):
            body = st.lstrip("#").strip()
            if body and not _ANSWER_LINE.search(body):
                reasoning.append(body)
        else:
            code.append(raw)
    return reasoning, code


def question_target(question: str) -> str | None:
    """The target number a question names (Countdown's 'make N.', 'target N'), else None."""
    m = _TARGET_IN_QUESTION.search(question or "")
    return next((g for g in m.groups() if g), None) if m else None


def _first_match(lines: Iterable[str], rules) -> tuple[str, str] | None:
    for line in lines:
        for name, pattern in rules:
            if pattern.search(line):
                return name, line
    return None


def _verification(reasoning: list[str], code: list[str], target: str | None) -> tuple[str, str] | None:
    hit = _first_match(reasoning, _VERIFICATION_WORDS)
    if hit:
        return hit
    if target is not None:  # "16, not 19" contrasts a result with the target (with another value, a correction)
        against = re.compile(rf"\d,? not {re.escape(target)}\b")
        for line in reasoning:
            if against.search(line):
                return "not_the_target", line
    for line in code:
        if _COMPARE.search(line) and not _DIVISIBILITY.search(line):
            return "code_compare", line
    return None


def _assignments(code: list[str]) -> dict[str, str]:
    """Top-level ``name = expression`` lines of a step's code (the last one per name)."""
    out: dict[str, str] = {}
    for line in code:
        if line[:1].isspace():
            continue
        m = _ASSIGN.match(line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def _silent_restart(code: list[str], previous: Sequence[StepText]) -> str | None:
    """The code line that reassigns an earlier step's variable from scratch (see module doc), else None."""
    mine = _assignments(code)
    if not mine:
        return None
    for earlier in reversed(previous):
        theirs = _assignments(_split(earlier.text)[1])
        printed = set(_NUMBER.findall(earlier.output))
        for name, expr in mine.items():
            if name not in theirs or theirs[name].strip() == expr.strip():
                continue
            uses_name = re.search(rf"\b{re.escape(name)}\b", expr)
            uses_value = printed & set(_NUMBER.findall(expr))
            if not uses_name and not uses_value:
                return next(ln for ln in code if _ASSIGN.match(ln) and _ASSIGN.match(ln).group(1) == name)
        for name in theirs:
            mine.pop(name, None)  # the nearest earlier assignment of a name is the one that counts
        if not mine:
            return None
    return None


def _backtracking(reasoning: list[str], code: list[str], previous: Sequence[StepText]) -> tuple[str, str] | None:
    hit = _first_match(reasoning, _BACKTRACKING_WORDS)
    if hit:
        return hit
    line = _silent_restart(code, previous)
    return ("silent_restart", line) if line else None


def _backward(reasoning: list[str], code: list[str], target: str | None) -> tuple[str, str] | None:
    for line in reasoning:
        if _BACKWARD_WORDS.search(line):
            return "words", line
    if target is None:
        return None
    t = re.escape(target)
    from_target = re.compile(rf"(?<![\d.]){t}\s*(?:=|is(?: close to)?|,? (?:which|that) (?:is|equals))\s*\d+"
                             rf"(?:\s*[-+*/x]\s*\d+)?"
                             rf"|(?<![\d.]){t}\s*(?:[-+*/]|//)\s*\d+\s*=")
    # "to reach N" alone is a forward step's purpose; it is backward only when what is needed follows.
    need = _rx(rf"\bto (?:make|get|reach|hit) {t}\b,? (?:we|i|you) (?:need|must|have to|can|could|should)\b"
               rf"|(?<![\d.]){t}\b.*\b(?:we|i) (?:need|must)\b|\b(?:we|i) (?:need|must)\b.*(?<![\d.]){t}\b")
    for line in reasoning:
        if from_target.search(line):
            return "target_decomposed", line
        if need.search(line):
            return "need_from_target", line
    code_from_target = re.compile(rf"(?:\b(?:target|goal)\b|(?<![\w.]){t}(?![\w.]))\s*(?:[-+/]|//)\s*[\w(]")
    for line in code:
        if code_from_target.search(line.split("==")[0]):
            return "code_from_target", line
    return None


def tag_step(steps: Sequence[StepText], index: int, question: str = "") -> list[Tag]:
    """The behaviours step ``index`` of ``steps`` shows, read with the steps before it (at most one tag each)."""
    reasoning, code = _split(steps[index].text)
    target = question_target(question)
    found = (
        (VERIFICATION, _verification(reasoning, code, target)),
        (BACKTRACKING, _backtracking(reasoning, code, steps[:index])),
        (SUBGOAL_SETTING, _first_match(reasoning, _SUBGOAL_WORDS)),
        (BACKWARD_CHAINING, _backward(reasoning, code, target)),
    )
    return [Tag(b, index, _evidence(line), f"{b}.{rule}") for b, hit in found if hit for rule, line in [hit]]


def tag_trajectory(steps: Sequence[StepText], question: str = "") -> list[Tag]:
    """Every step's tags, in step order."""
    return [tag for i in range(len(steps)) for tag in tag_step(steps, i, question)]


def behaviours_of(tags: Iterable[Tag] | Iterable[str]) -> list[str]:
    """The distinct behaviours among ``tags`` (Tag objects or names), in ``BEHAVIOURS`` order."""
    names = {t if isinstance(t, str) else t.behaviour for t in tags}
    return [b for b in BEHAVIOURS if b in names]


def path_behaviours(nodes: Sequence, question: str = "") -> list[str]:
    """The behaviours of a trajectory given as tree nodes (anything with ``.text`` and ``.stdout``)."""
    return behaviours_of(tag_trajectory([StepText(n.text, n.stdout) for n in nodes], question))


def tree_row_behaviours(tree: Tree) -> tuple[dict[int, list[str]], list[list[str]]]:
    """Per-step behaviours of a whole ``mcts.tree.Tree``: (node id -> its step's behaviours read after its
    ancestors' steps, [] for the root; each recorded failure's, read after its parent's path, in order)."""
    steps: dict[int, list[StepText]] = {0: []}  # node id -> the steps root -> node (ids grow with depth)
    nodes: dict[int, list[str]] = {}
    for i in sorted(tree.nodes):
        node = tree.nodes[i]
        if node.parent < 0:
            steps[i], nodes[i] = [], []
            continue
        steps[i] = [*steps[node.parent], StepText(node.text, node.stdout)]
        nodes[i] = behaviours_of(tag_step(steps[i], len(steps[i]) - 1, tree.info.question))
    failures = []
    for f in tree.failures:
        path = [*steps.get(f.parent, []), StepText(f.text)]
        failures.append(behaviours_of(tag_step(path, len(path) - 1, tree.info.question)))
    return nodes, failures


def prefer_behaviours(trajectories: Sequence, behaviours_fn, prefer: Sequence[str]) -> list:
    """``trajectories`` (best first) with those showing any of ``prefer`` moved ahead, each group keeping its
    order: behaviour-aware SFT selection. ``behaviours_fn(t)`` gives a trajectory's behaviours. With ``prefer``
    empty the order is unchanged."""
    if not prefer:
        return list(trajectories)
    wanted = set(prefer)
    shows = [bool(wanted.intersection(behaviours_fn(t))) for t in trajectories]
    return [t for t, s in zip(trajectories, shows, strict=True) if s] + \
        [t for t, s in zip(trajectories, shows, strict=True) if not s]


def check_behaviours(names: Iterable[str], where: str) -> tuple[str, ...]:
    """``names`` as a tuple, or ValueError naming ``where`` and the unknown ones."""
    names = tuple(names)
    unknown = [n for n in names if n not in BEHAVIOURS]
    if unknown:
        raise ValueError(f"{where}={list(names)}: unknown behaviour(s) {unknown}; choose from {', '.join(BEHAVIOURS)}")
    return names


__all__ = ["BEHAVIOURS", "StepText", "Tag", "behaviours_of", "check_behaviours", "path_behaviours",
           "prefer_behaviours", "question_target", "tag_step", "tag_trajectory", "tree_row_behaviours"]
