"""The prompt: the model's own chat template around the question, then the steps so far.

    <template: system instruction> [<user: example question> <assistant: example solution>]*
    <user: question> <assistant turn opens> + history

``history`` (``mcts.steps.render_steps``) is appended after the generation prompt, so the model
continues its own assistant turn with the next step. The export builds SFT prompts with this same
class (``build(question, "")`` + the rendered steps as completion), so training and inference see
byte-identical text. Prompts are kept short on purpose: on the embedded CPU run, prompt tokens are
the main cost (~200 tokens/s prefill), and the instruction + examples prefix is computed once per
engine and shared by every prompt (``shared_prefix``).
"""

from __future__ import annotations

from dataclasses import dataclass

from data.generators.countdown import countdown_question
from mcts.steps import ANSWER_END, STEP_END, render_steps

SYSTEM_PROMPT = (
    "Solve the math problem in steps. A step is one or more '# ' comment lines of reasoning, then Python "
    f"code that computes it and prints the result, then {STEP_END}. In the last step write the answer "
    f"as a comment '# The answer is \\boxed{{...}}', then {ANSWER_END}."
)


@dataclass(frozen=True)
class Example:
    question: str
    steps: tuple[tuple[str, str, bool], ...]  # (step text, printed output, final) as mcts.steps.render_steps takes

    @property
    def solution(self) -> str:
        return render_steps(list(self.steps))


# Worked examples of the step format, one set per kind of problem (``engines.examples``). Built with
# render_steps so they can never drift from the parser; tests/pipeline/test_engines.py grades every example's
# boxed answer and runs its code.
ARITHMETIC_EXAMPLES: tuple[Example, ...] = (
    Example(
        question="Tom buys 4 pens at 3 dollars each and pays with a 20 dollar bill. How much change does he get?",
        steps=(
            ("# The pens cost 4 * 3 dollars.\ncost = 4 * 3\nprint(cost)", "12", False),
            ("# The change is 20 minus the cost.\nchange = 20 - cost\nprint(change)", "8", False),
            ("# The answer is \\boxed{8}", "", True),
        ),
    ),
    Example(
        question="A box holds 6 rows of 5 eggs. 7 eggs break. How many eggs are left?",
        steps=(
            ("# Eggs in the box: 6 rows of 5, minus the 7 broken ones.\nleft = 6 * 5 - 7\nprint(left)", "23", False),
            ("# The answer is \\boxed{23}", "", True),
        ),
    ),
)

# Countdown (data/generators/countdown.py's question wording): try a combination in code, check it against the
# target, and box the expression. The second example abandons a first try that misses (backtracking) and
# checks the new one (verification), the behaviours Gandhi et al. (2025) find behind self-improvement.
COUNTDOWN_EXAMPLES: tuple[Example, ...] = (
    Example(
        question=countdown_question([3, 7, 2], 21),
        steps=(
            ("# Try multiplying 3 and 7, and check it against the target 21.\nvalue = 3 * 7\nprint(value, value == 21)",
             "21 True", False),
            ("# The answer is \\boxed{3 * 7}", "", True),
        ),
    ),
    Example(
        question=countdown_question([8, 5, 4], 27),
        steps=(
            ("# Try adding all three numbers.\nvalue = 8 + 5 + 4\nprint(value, value == 27)", "17 False", False),
            ("# 17 is too small, so multiply instead: 8 * 4 is 32, and 32 - 5 should be 27.\nvalue = 8 * 4 - 5\n"
             "print(value, value == 27)", "27 True", False),
            ("# The answer is \\boxed{8 * 4 - 5}", "", True),
        ),
    ),
)

EXAMPLE_SETS: dict[str, tuple[Example, ...]] = {"arithmetic": ARITHMETIC_EXAMPLES, "countdown": COUNTDOWN_EXAMPLES}
EXAMPLES = ARITHMETIC_EXAMPLES  # the default set


def example_set(name: str) -> tuple[Example, ...]:
    """The worked examples named ``name`` (``engines.examples``); a clear error for an unknown name."""
    try:
        return EXAMPLE_SETS[name]
    except KeyError:
        raise ValueError(f"examples={name!r}: unknown example set; use one of {', '.join(EXAMPLE_SETS)} "
                         f"(pipeline/engines/prompts.py)") from None


_QUESTION_MARK = "\x00open-rstar-question\x00"  # placeholder to find where the question starts


class PromptBuilder:
    """Chat-template-aware prompts for one tokenizer. ``few_shot`` shows the first ``n_examples`` worked
    examples of the set named ``examples`` (``EXAMPLE_SETS``)."""

    def __init__(self, tokenizer, few_shot: bool = False, n_examples: int = 1, system: str = SYSTEM_PROMPT,
                 examples: str = "arithmetic"):
        chosen = example_set(examples)
        if n_examples < 0 or n_examples > len(chosen):
            raise ValueError(f"n_examples={n_examples}: must be in 0..{len(chosen)} (example set {examples!r})")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; "
                             f"use an instruct/chat checkpoint or set tokenizer.chat_template")
        self.tokenizer = tokenizer
        self.few_shot = few_shot
        self.examples = chosen[:n_examples] if few_shot else ()
        self.system = system
        self._prefix = self._find_prefix()

    def messages(self, question: str) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system}]
        for ex in self.examples:
            msgs.append({"role": "user", "content": ex.question})
            msgs.append({"role": "assistant", "content": ex.solution})
        msgs.append({"role": "user", "content": question})
        return msgs

    def build(self, question: str, history: str = "") -> str:
        """The full prompt text: template with generation prompt, then the rendered steps so far."""
        text = self.tokenizer.apply_chat_template(self.messages(question), tokenize=False, add_generation_prompt=True)
        return text + history

    @property
    def shared_prefix(self) -> str:
        """Text that starts every prompt of this builder (instruction and examples), '' if the template
        puts question-dependent text first. Engines compute its KV once and reuse it."""
        return self._prefix

    def _find_prefix(self) -> str:
        text = self.build(_QUESTION_MARK)
        cut = text.find(_QUESTION_MARK)
        return text[:cut] if cut > 0 else ""
