"""Interrupts the CLI raised, remembered so that one Python swallowed is raised again.

A ``KeyboardInterrupt`` that lands while the garbage collector runs a weakref callback is
printed as "Exception ignored" and lost (seen once in the SIGINT test: the run then
finished); remembered, it is raised again at the next chunk of training
(``raise_pending_interrupt``, called by the trainer's callback in ``training.trainer``).
"""

from __future__ import annotations

from typing import Any

#: Signals the CLI turned into ``KeyboardInterrupt`` (``note_interrupt``).
_INTERRUPTS: list[str] = []


def note_interrupt(reason: str) -> KeyboardInterrupt:
    """Remember an interrupt before raising it (``raise note_interrupt(...)``)."""
    _INTERRUPTS.append(reason)
    return KeyboardInterrupt(reason)


def raise_pending_interrupt(*_: Any) -> None:
    """Raise again the last interrupt remembered, if any (it was swallowed)."""
    if _INTERRUPTS:
        raise KeyboardInterrupt(f"{_INTERRUPTS[-1]} (raised again: it was swallowed)")
