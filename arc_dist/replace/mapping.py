"""Which teacher layers each student slot stands for during stage-2 layer replacement.

A slot `i` of the hybrid runs either student layer `i` or the teacher layers `layer_mapping(...)[i]`. For the
one-to-one kinds (`uniform`, `upper`, `explicit`) each slot stands for exactly one teacher layer; `block` is the
BERT-of-Theseus ablation where a slot stands for a contiguous block of teacher layers.
"""

from __future__ import annotations

from arc_dist.errors import ConfigError

KINDS = ("uniform", "upper", "explicit", "block")


def layer_mapping(
    kind: str, teacher_layers: int, student_layers: int, explicit: list[int] | None = None
) -> list[list[int]]:
    """For each student slot (0-based), the 0-based teacher layers it stands for.

    - `uniform`: phi(i) = floor((i+1) * L_t / L_s + 0.5) - 1, i.e. round half *up* (Python's `round` rounds half
      to even, which would pick 4 instead of 5 for (6, 4), slot 2). The last slot always pairs with the last
      teacher layer, since the top layer is the one the task head was fine-tuned on.
    - `upper`: the top L_s teacher layers.
    - `explicit`: `explicit` holds 1-based teacher layer numbers (like `teacher.layer`), one per slot, strictly
      increasing, so the hybrid keeps the teacher's layer order.
    - `block`: slot i stands for teacher layers [i*k, (i+1)*k) with k = L_t / L_s (needs L_t % L_s == 0).
    """
    if kind not in KINDS:
        raise ConfigError(f"replace.mapping={kind!r} is unknown; choose one of {list(KINDS)}")
    if teacher_layers < 1 or student_layers < 1:
        raise ConfigError(
            f"layer mapping needs at least one layer on each side, got teacher={teacher_layers}, "
            f"student={student_layers}"
        )
    if student_layers > teacher_layers:
        raise ConfigError(
            f"a {student_layers}-layer student cannot be paired one-to-one with a {teacher_layers}-layer teacher: "
            f"use a student of at most {teacher_layers} layers"
        )
    if explicit is not None and kind != "explicit":
        raise ConfigError(
            f"an explicit layer list {explicit} was given with replace.mapping={kind!r}: "
            "set replace.mapping='explicit' to use it, or remove the list"
        )

    if kind == "uniform":
        # Integer form of floor(x + 0.5) with x = (i+1) * L_t / L_s, free of floating-point ties.
        return [[(2 * (i + 1) * teacher_layers + student_layers) // (2 * student_layers) - 1]
                for i in range(student_layers)]
    if kind == "upper":
        return [[teacher_layers - student_layers + i] for i in range(student_layers)]
    if kind == "block":
        if teacher_layers % student_layers:
            raise ConfigError(
                f"replace.mapping='block' needs the teacher's {teacher_layers} layers to split evenly into "
                f"{student_layers} blocks; student layer counts that divide it: "
                f"{[d for d in range(1, teacher_layers + 1) if teacher_layers % d == 0]}"
            )
        k = teacher_layers // student_layers
        return [list(range(i * k, (i + 1) * k)) for i in range(student_layers)]
    return [[layer - 1] for layer in _check_explicit(explicit, teacher_layers, student_layers)]


def _check_explicit(explicit: list[int] | None, teacher_layers: int, student_layers: int) -> list[int]:
    if explicit is None:
        raise ConfigError(
            f"replace.mapping='explicit' needs a list of {student_layers} 1-based teacher layer numbers "
            f"(1..{teacher_layers}), one per student layer"
        )
    if len(explicit) != student_layers:
        raise ConfigError(
            f"the explicit layer list {explicit} has {len(explicit)} entries but the student has "
            f"{student_layers} layers: give exactly one teacher layer per student layer"
        )
    bad = [layer for layer in explicit if not 1 <= layer <= teacher_layers]
    if bad:
        raise ConfigError(
            f"explicit teacher layers {bad} are out of range: use 1-based numbers 1..{teacher_layers}"
        )
    if len(set(explicit)) != len(explicit):
        dupes = sorted({layer for layer in explicit if explicit.count(layer) > 1})
        raise ConfigError(
            f"explicit teacher layers {explicit} repeat {dupes}: each teacher layer can stand in for one slot only"
        )
    if any(a >= b for a, b in zip(explicit, explicit[1:])):
        raise ConfigError(
            f"explicit teacher layers {explicit} must be strictly increasing so the hybrid keeps the teacher's "
            f"layer order; did you mean {sorted(explicit)}?"
        )
    return explicit
