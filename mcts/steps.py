"""The step format: the one text format that the policy writes, the search parses and SFT trains on.

A step is one or more natural-language reasoning lines written as Python comments, followed by
Python code, closed by a delimiter:

    # Tom starts with 3 apples and buys 5 more.
    apples = 3 + 5
    print(apples)
    <end_of_step>

The final step states the answer as ``\\boxed{...}`` (in a comment, usually after computing it) and
is closed by the answer delimiter instead:

    # The answer is \\boxed{8}
    <end_of_answer>

When a step's code printed something, the rendered history shows it to the model as comment lines
``# output: ...`` right after the code, so the next step (and the final answer) can use the value.
Generation stops at either delimiter, and also where the model starts writing an ``# output:`` line
itself: that is the moment it needs the real value, so the step ends there, the code runs, and the next
proposal continues from the true output instead of a guessed one. Engines return the text *without*
the stop string and report which one was hit (``None`` when the token budget ran out or at EOS).

A weak model often states its answer as ``# The answer is 12`` without the box. A final comment of that
shape whose value is a plain number is accepted as the answer and rewritten to the canonical
``# The answer is \\boxed{12}``, so stored trees and SFT data always carry the boxed form.

A weak model also writes its reasoning as plain prose lines without the ``#``. ``prose_to_comments``
turns a line into a comment only when it breaks compilation of the code around it *and* reads as prose
(it opens with words, not code), so broken code still fails in the sandbox as it should; the stored step
and the SFT data get the canonical ``# ...`` form.

A weak bootstrap policy may write a whole solution in one go (``mode="solution"``): ``split_steps``
cuts such text into steps at delimiters when the model wrote them, else at each comment line that
follows a code line.
"""

from __future__ import annotations

import keyword
import re
from dataclasses import dataclass

from data.answers import last_boxed

STEP_END = "<end_of_step>"
ANSWER_END = "<end_of_answer>"
OUTPUT_PREFIX = "# output: "
OUTPUT_STOP = OUTPUT_PREFIX.rstrip()  # the model starting to write an output line itself
STOP_STRINGS: tuple[str, ...] = (STEP_END, ANSWER_END, OUTPUT_STOP)
# A whole solution runs on past step delimiters, but still stops where the model wants to see an output, and at
# the end of the line that closes a brace: after '\\boxed{8}' a weak model mostly repeats its answer until the
# token budget runs out, and everything after the first answer is dropped anyway (``mcts.expand``). The engines
# cut the stop string off, so ``mcts.expand`` puts the '}' back (the same text either way: a code line that
# closes a dict just ends the proposal there, and the next expansion continues from it).
BRACE_STOP = "}\n"
SOLUTION_STOP_STRINGS: tuple[str, ...] = (ANSWER_END, OUTPUT_STOP, BRACE_STOP)
MAX_OUTPUT_LINES = 4  # rendered output lines per step; longer output is cut with a marker


@dataclass(frozen=True)
class Step:
    """One parsed step. ``text`` is the step's source as the model wrote it, without delimiter."""

    text: str  # comments + code, stripped of surrounding blank lines
    reasoning: str  # the comment lines joined, without '#'
    code: str  # the non-comment lines (may be empty for a pure answer step)
    answer: str | None  # content of the last \boxed{} in the step, if any

    @property
    def is_final(self) -> bool:
        return self.answer is not None


class StepFormatError(ValueError):
    """Model output that is not a usable step; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


_ANSWER_PHRASE = re.compile(r"^(\s*#\s*)(?:so,?\s+)?the (?:final )?answer is\s*:?\s*(.+?)\s*$", re.IGNORECASE)
_PLAIN_NUMBER = re.compile(r"^-?\d[\d,]*(?:\.\d+)?(?:/\d+)?$")


def _answer_phrase(lines: list[str]) -> tuple[int, str] | None:
    """(line index, value) of the last '# The answer is N' comment whose N is a plain number."""
    for i in range(len(lines) - 1, -1, -1):
        m = _ANSWER_PHRASE.match(lines[i])
        if not m:
            continue
        value = m.group(2).split("=")[-1].strip().rstrip(".").strip().lstrip("$").strip()
        if _PLAIN_NUMBER.match(value):
            return i, value.replace(",", "")
        return None
    return None


def _strip_model_outputs(lines: list[str]) -> list[str]:
    # The model may imitate the rendered '# output:' lines; they are ours to write, never its.
    return [ln for ln in lines if not ln.lstrip().startswith(OUTPUT_PREFIX.strip())]


def parse_step(raw: str) -> Step:
    """Turn one step of model output (delimiter already removed) into a ``Step`` or raise StepFormatError."""
    text = raw.replace(STEP_END, "").replace(ANSWER_END, "")
    lines = _strip_model_outputs(text.strip("\n").splitlines())
    while lines and not lines[-1].strip():
        lines.pop()
    while lines and not lines[0].strip():
        lines.pop(0)
    if not lines:
        raise StepFormatError("empty step")
    comments = [ln.strip()[1:].strip() for ln in lines if ln.strip().startswith("#")]
    code_lines = [ln for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not comments:
        raise StepFormatError("no reasoning comment: a step starts with a '# ...' line")
    body = "\n".join(lines)
    if "\\boxed{" not in body and (found := _answer_phrase(lines)) is not None:
        i, value = found
        lines[i] = f"{_ANSWER_PHRASE.match(lines[i]).group(1)}The answer is \\boxed{{{value}}}"
        body = "\n".join(lines)
    answer = last_boxed(body)
    if "\\boxed{" in body and answer is None:
        raise StepFormatError("unclosed \\boxed{")
    if answer is not None and not answer:
        raise StepFormatError("empty \\boxed{}")
    return Step(text=body, reasoning="\n".join(comments), code="\n".join(code_lines), answer=answer)


# A line that reads as prose: two words ("Maya has", "So, after", "If 4"), a numbered item or a bullet.
_PROSE = re.compile(r"^(?:[A-Za-z][A-Za-z']*[,:]?\s+[A-Za-z0-9$]|\d+[.)]\s+[A-Za-z]|[-*]\s+[A-Za-z])")


def _reads_as_prose(line: str) -> bool:
    st = line.strip()
    return bool(_PROSE.match(st)) and not keyword.iskeyword(st.split(None, 1)[0].rstrip(",:"))


def prose_to_comments(text: str, max_lines: int = 64) -> str:
    """``text`` with each prose line that breaks the code's compilation rewritten as a ``# `` comment.

    The code (every line that is not a comment or a delimiter) is compiled as one program; where it fails
    on a line that reads as prose, that line becomes a comment and compilation is tried again. It stops at
    the first syntax error on a line that looks like code (the sandbox reports that one) or after
    ``max_lines`` rewrites. Text that compiles is returned unchanged.
    """
    lines = text.split("\n")
    for _ in range(max_lines):
        code = "\n".join("" if _not_code(ln) else ln for ln in lines)  # same line numbers as ``lines``
        try:
            compile(code, "<step>", "exec", dont_inherit=True)
            break
        except SyntaxError as e:
            i = (e.lineno or 0) - 1
            if not (0 <= i < len(lines)) or not _reads_as_prose(lines[i]):
                break
            lines[i] = "# " + lines[i].strip()
        except (ValueError, OverflowError, MemoryError, RecursionError):  # e.g. a NUL byte in the text
            break
    return "\n".join(lines)


def _not_code(line: str) -> bool:
    st = line.strip()
    return not st or st.startswith("#") or st in (STEP_END, ANSWER_END)


def split_steps(text: str) -> list[str]:
    """Cut a whole generated solution into raw step texts (see module doc). Never drops content."""
    if STEP_END in text or ANSWER_END in text:
        parts = text.replace(ANSWER_END, STEP_END).split(STEP_END)
        return [p.strip("\n") for p in parts if p.strip()]
    steps: list[list[str]] = []
    prev_was_code = True  # so the first line opens a step
    for ln in text.strip("\n").splitlines():
        is_comment = ln.strip().startswith("#") and not ln.strip().startswith(OUTPUT_PREFIX.strip())
        if is_comment and prev_was_code:
            steps.append([])
        if not steps:
            steps.append([])
        steps[-1].append(ln)
        if ln.strip():
            prev_was_code = not is_comment
    return ["\n".join(s).strip("\n") for s in steps if "".join(s).strip()]


def render_output(stdout: str) -> str:
    """The '# output: ...' lines shown after a step's code ('' when the code printed nothing)."""
    out = stdout.strip("\n")
    if not out.strip():
        return ""
    lines = out.splitlines()
    if len(lines) > MAX_OUTPUT_LINES:
        lines = lines[:MAX_OUTPUT_LINES] + ["..."]
    return "\n".join(OUTPUT_PREFIX + ln for ln in lines)


def render_step(step_text: str, stdout: str = "", final: bool = False) -> str:
    """One step as it appears in a prompt or an SFT completion, delimiter included, ending in a newline."""
    parts = [step_text.strip("\n")]
    shown = render_output(stdout)
    if shown:
        parts.append(shown)
    parts.append(ANSWER_END if final else STEP_END)
    return "\n".join(parts) + "\n"


def render_steps(steps: list[tuple[str, str, bool]]) -> str:
    """A sequence of (step_text, stdout, final) rendered back to back."""
    return "".join(render_step(t, o, f) for t, o, f in steps)
