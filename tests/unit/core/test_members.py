"""The members of a fan-out group: an ordered set that keeps its first member alone."""

from __future__ import annotations

import pytest

from sockdrawer.core.members import Members


class Member:
    """A member as groups have them: no __eq__ or __hash__ of its own."""


def test_members_behave_as_the_dict_they_replace() -> None:
    """Adding (twice is once), membership, length, order, and pop (None for a member, the default or KeyError
    otherwise) read as with a dict of members, alone, several, and back to one and none."""
    a, b, c = Member(), Member(), Member()
    members: Members[Member] = Members()
    assert not members and len(members) == 0 and list(members) == [] and a not in members
    members[a] = None
    members[a] = None
    assert len(members) == 1 and list(members) == [a] and a in members and b not in members
    assert members.pop(b, 0) == 0
    members[b] = None
    members[c] = None
    assert list(members) == [a, b, c] and len(members) == 3
    assert members.pop(b, 0) is None and list(members) == [a, c]
    assert members.pop(a) is None and members.pop(c) is None
    assert not members and list(members) == []
    with pytest.raises(KeyError):
        members.pop(a)
    members[c] = None
    assert list(members) == [c]


def test_iterating_a_copy_allows_leaving_during_the_fan_out() -> None:
    """A group iterates tuple(members): a member that leaves meanwhile does not disturb the rest."""
    members: Members[Member] = Members()
    group = [Member() for _ in range(3)]
    for m in group:
        members[m] = None
    seen = []
    for m in tuple(members):
        seen.append(m)
        members.pop(group[2], None)
    assert seen == group and list(members) == group[:2]
