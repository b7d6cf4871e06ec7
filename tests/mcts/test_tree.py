import pytest

from mcts.steps import parse_step
from mcts.tree import Tree, TreeInfo, step_key


def _tree():
    return Tree(TreeInfo("p", "q?", "1", 1, "terminal", 1.0, 0))


def test_ids_children_and_merge_index():
    t = _tree()
    a = t.add_child(t.new_id(), 0, parse_step("# a\nx = 1"), "", "open")
    b = t.add_child(t.new_id(), 0, parse_step("# b\n\\boxed{1}"), "", "terminal", "correct")
    assert (a.id, b.id, t.root.children, t.root.open_children) == (1, 2, [1, 2], 1)  # b is created closed
    assert b.closed and not a.closed
    assert t.find_child(0, step_key("# a\nx = 1  ", False)) == 1  # trailing spaces do not make a new step
    assert t.find_child(0, step_key("# a\nx = 1", True)) is None  # the same text as a final step would
    with pytest.raises(ValueError, match="node id 1 is already taken"):
        t.add_child(1, 0, parse_step("# c\ny = 2"), "", "open")


def test_closing_propagates_up_through_expanded_nodes_only():
    t = _tree()
    a = t.add_child(t.new_id(), 0, parse_step("# a\nx = 1"), "", "open")
    a1 = t.add_child(t.new_id(), a.id, parse_step("# a1\ny = 2"), "", "open")
    t.mark_expanded(0)
    t.make_dead(a1.id, -1.0)
    assert not a.closed  # a was never expanded (a chain node): it can still be expanded
    t.mark_expanded(a.id)  # expanded with every child closed -> closed, and so the root
    assert a.closed and t.root.closed and t.root.open_children == 0
    # A terminal child under the closed node keeps everything closed...
    t.add_child(t.new_id(), a.id, parse_step("# z\n\\boxed{0}"), "", "terminal", "wrong")
    assert a.closed and t.root.closed
    # ...an open one (a multi-step proposal continuing below an exhausted node) re-opens it and the root.
    t.add_child(t.new_id(), a.id, parse_step("# y\ny = 0"), "", "open")
    assert (a.closed, a.open_children, t.root.closed, t.root.open_children) == (False, 1, False, 1)
    dead = t.nodes[a1.id]
    with pytest.raises(ValueError, match="node 2 is dead; it cannot get a child"):
        t.add_child(t.new_id(), dead.id, parse_step("# w\nw = 0"), "", "open")


def test_render_path_and_code_history():
    t = _tree()
    a = t.add_child(t.new_id(), 0, parse_step("# a\nx = 1\nprint(x)"), "1\n", "open")
    b = t.add_child(t.new_id(), a.id, parse_step("# so \\boxed{1}"), "", "terminal", "correct")
    assert t.render_path(b.id) == "# a\nx = 1\nprint(x)\n# output: 1\n<end_of_step>\n# so \\boxed{1}\n<end_of_answer>\n"
    assert t.code_history(b.id) == ("x = 1\nprint(x)", "") and t.code_history(0) == ()
    assert [n.id for n in t.path(b.id)] == [1, 2] and t.path(0) == []
