"""A transition table: (from state, event) → Transition. One function changes state."""
from __future__ import annotations

import dataclasses
import enum
from typing import Generic, Iterable, TypeVar

S = TypeVar("S", bound=enum.Enum)
E = TypeVar("E", bound=enum.Enum)


class IllegalTransition(Exception):
    """The table has no edge for (state, event). Maps to FAILED_PRECONDITION."""

    def __init__(self, machine: str, state, event):
        self.machine, self.state, self.event = machine, state, event
        src = state.name if state is not None else "(new)"
        super().__init__(f"{machine}: no transition from {src} on {event.name}")


@dataclasses.dataclass(frozen=True)
class Transition(Generic[S, E]):
    src: S | None          # None: the entity does not exist yet
    event: E
    dst: S
    automatic: bool        # True: the control plane does it; False: an operator (or the client) must
    effects: str = ""      # one line: what else happens on this edge
    billing: object = None  # allocation table only: Billing.START / Billing.STOP


class TransitionTable(Generic[S, E]):
    def __init__(self, name: str, edges: Iterable[Transition]):
        self.name = name
        self.edges: tuple[Transition, ...] = tuple(edges)
        self._index: dict[tuple, Transition] = {}
        for t in self.edges:
            key = (t.src, t.event)
            if key in self._index:
                raise ValueError(f"{name}: duplicate edge {key}")
            self._index[key] = t

    def transition(self, state: S | None, event: E) -> Transition:
        """The edge for (state, event), or IllegalTransition."""
        try:
            return self._index[(state, event)]
        except KeyError:
            raise IllegalTransition(self.name, state, event) from None

    def allowed(self, state: S | None, event: E) -> bool:
        return (state, event) in self._index

    def events_from(self, state: S | None) -> list[E]:
        return [t.event for t in self.edges if t.src == state]
