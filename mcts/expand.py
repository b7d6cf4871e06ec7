"""From one policy proposal to a chain of candidate steps (pure parsing, no tree, no execution).

A proposal holds one step (step mode: generation stopped at <end_of_step>) or a whole solution (solution
mode: several steps, stopped at <end_of_answer> or by the token limit). Both go through the same path:
``prose_to_comments`` (prose reasoning lines written without ``#`` become comments), ``split_steps``, then
``parse_step`` on each piece. The chain is cut

- at the first piece that does not parse (the rejected piece is kept with its reason),
- after the first final step (a ``\\boxed{}`` answer): anything after it is dropped and recorded,
- where it would pass ``max_depth`` (the excess is dropped and recorded),
- with ``require_code`` (the default), at the first non-final step whose non-comment part is empty: such a step
  computes nothing, "executes" trivially and teaches SFT to reason in prose, so it is rejected like code that
  failed (stage "exec", nothing ran). The final step may be comment-only: '# The answer is \\boxed{8}'.

The chain's last step is final when it holds an answer, or when the model stopped at <end_of_answer>
without one (it declared itself done; the grader then sees answer None and marks it wrong). A proposal
cut by the token limit (stop None) and without an answer keeps its steps, none of them terminal.
"""

from __future__ import annotations

from dataclasses import dataclass

from mcts.node import FailureStage
from mcts.protocols import Proposal
from mcts.steps import ANSWER_END, BRACE_STOP, Step, StepFormatError, parse_step, prose_to_comments, split_steps


@dataclass(frozen=True)
class Rejected:
    """The part of a proposal that is not kept: the first bad piece and everything after it."""

    text: str
    stage: FailureStage
    error: str


@dataclass(frozen=True)
class Chain:
    steps: tuple[Step, ...]  # kept in order; step i attaches at depth (expanded node's depth + 1 + i)
    final: bool  # the last step is terminal
    rejected: Rejected | None  # recorded under the node after the last kept step


COMMENT_ONLY = "comment-only step: a non-final step needs Python code that computes something"


def parse_proposal(proposal: Proposal, room: int, require_code: bool = True) -> Chain:
    """Cut ``proposal`` into a chain of at most ``room`` (>= 1) steps, as described in the module doc."""
    if room < 1:
        raise ValueError(f"room={room}: a node at max_depth cannot be expanded")
    text = proposal.text + "}" if proposal.stop == BRACE_STOP else proposal.text  # the engine cut the '}' off
    pieces = split_steps(prose_to_comments(text))
    if not pieces:
        return Chain((), False, Rejected(proposal.text, "parse", "empty proposal"))
    steps: list[Step] = []
    rejected: Rejected | None = None
    for i, piece in enumerate(pieces):
        rest = pieces[i:]
        if len(steps) == room:
            rejected = Rejected(_join(rest), "depth", f"{len(rest)} step(s) past max_depth dropped")
            break
        try:
            step = parse_step(piece)
        except StepFormatError as e:
            later = f" ({len(rest) - 1} later step(s) dropped)" if len(rest) > 1 else ""
            rejected = Rejected(_join(rest), "parse", e.reason + later)
            break
        if require_code and not step.is_final and not step.code.strip() and not _declared_final(proposal, i, pieces):
            later = f" ({len(rest) - 1} later step(s) dropped)" if len(rest) > 1 else ""
            rejected = Rejected(_join(rest), "exec", COMMENT_ONLY + later)
            break
        steps.append(step)
        if step.is_final:
            after = pieces[i + 1 :]
            if after:
                rejected = Rejected(_join(after), "after_answer", f"{len(after)} step(s) after the final answer dropped")
            break
    final = bool(steps) and (
        steps[-1].is_final or (proposal.stop == ANSWER_END and rejected is None and len(steps) == len(pieces))
    )
    return Chain(tuple(steps), final, rejected)


def _declared_final(proposal: Proposal, i: int, pieces: list[str]) -> bool:
    """The model closed the whole proposal with <end_of_answer> at piece ``i``: a final step without an answer
    (graded wrong as it is, never a step to execute)."""
    return proposal.stop == ANSWER_END and i == len(pieces) - 1


def _join(pieces: list[str]) -> str:
    return "\n".join(pieces)
