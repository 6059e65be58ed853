"""Layer mapping tables for stage-2 replacement, their error messages, and the uniform rule's invariants."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from arc_dist.errors import ConfigError
from arc_dist.replace.mapping import layer_mapping


def flat(mapping: list[list[int]]) -> list[int]:
    assert all(len(slot) == 1 for slot in mapping)
    return [slot[0] for slot in mapping]


@pytest.mark.parametrize(
    "teacher, student, expected",
    [
        (12, 6, [1, 3, 5, 7, 9, 11]),
        (24, 6, [3, 7, 11, 15, 19, 23]),
        (6, 3, [1, 3, 5]),
        (6, 4, [1, 2, 4, 5]),  # 1.5 -> 2 and 4.5 -> 5: round half up, not Python's half-to-even
        (12, 12, list(range(12))),
        (12, 1, [11]),
    ],
)
def test_uniform(teacher, student, expected):
    assert flat(layer_mapping("uniform", teacher, student)) == expected


def test_upper():
    assert flat(layer_mapping("upper", 12, 6)) == [6, 7, 8, 9, 10, 11]
    assert flat(layer_mapping("upper", 24, 6)) == [18, 19, 20, 21, 22, 23]
    assert flat(layer_mapping("upper", 6, 4)) == [2, 3, 4, 5]


def test_block():
    assert layer_mapping("block", 12, 6) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]
    assert layer_mapping("block", 24, 6) == [list(range(i, i + 4)) for i in range(0, 24, 4)]
    assert layer_mapping("block", 6, 3) == [[0, 1], [2, 3], [4, 5]]
    assert layer_mapping("block", 6, 6) == [[i] for i in range(6)]


def test_explicit_is_one_based():
    assert flat(layer_mapping("explicit", 12, 3, [1, 6, 12])) == [0, 5, 11]
    assert flat(layer_mapping("explicit", 6, 4, [2, 3, 5, 6])) == [1, 2, 4, 5]


@pytest.mark.parametrize(
    "args, fragments",
    [
        (("diagonal", 12, 6), ["'diagonal'", "uniform", "block"]),
        (("uniform", 6, 12), ["12-layer student", "6-layer teacher", "at most 6"]),
        (("uniform", 0, 0), ["at least one layer"]),
        (("block", 12, 5), ["'block'", "12 layers", "5 blocks", "[1, 2, 3, 4, 6, 12]"]),
        (("uniform", 12, 3, [4, 8, 12]), ["explicit", "'uniform'", "[4, 8, 12]"]),
        (("explicit", 12, 3), ["needs a list of 3", "1..12"]),
        (("explicit", 12, 3, [4, 12]), ["2 entries", "3 layers"]),
        (("explicit", 12, 3, [0, 4, 12]), ["[0]", "1..12"]),
        (("explicit", 12, 3, [4, 8, 13]), ["[13]", "1..12"]),
        (("explicit", 12, 3, [4, 4, 12]), ["repeat [4]"]),
        (("explicit", 12, 3, [8, 4, 12]), ["strictly increasing", "[4, 8, 12]"]),
    ],
)
def test_errors_name_values_and_fix(args, fragments):
    with pytest.raises(ConfigError) as info:
        layer_mapping(*args)
    for fragment in fragments:
        assert fragment in str(info.value)


@given(st.integers(1, 48).flatmap(lambda t: st.tuples(st.just(t), st.integers(1, t))))
def test_uniform_invariants(sizes):
    teacher, student = sizes
    phi = flat(layer_mapping("uniform", teacher, student))
    assert len(phi) == student
    assert all(a < b for a, b in zip(phi, phi[1:]))
    assert 0 <= phi[0] and phi[-1] == teacher - 1
