"""Memoisation of pure functions of short header texts, bounded in entries *and* size.

The SIP layer parses the same few texts over and over (header names, From/To/Via/CSeq
values: docs/decisions.md §16), so their results are cached by text. The texts come
from the network, so a cache keyed by them is an attack surface: with only an entry
count as bound, 2,100 datagrams carrying unique 30 KB values pinned 252 MB. Here a text
longer than ``max_text`` is computed and never stored, and a full table is emptied
rather than evicted entry by entry (cheap, and the working set of a call refills it in
a few messages). The worst case is thus ``max_entries`` x (``max_text`` + one result).

A plain closure over a dict, not ``functools.lru_cache`` nor a class with ``__call__``:
it runs for every header of every lookup, and this is as fast as the C ``lru_cache``
(~70 ns per hit) while the size check stays possible.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["TextMemo", "forget_all", "memoise_text"]

_T = TypeVar("_T")


class TextMemo(Generic[_T]):
    """The table behind one memoised function, for tests and ``/status``."""

    def __init__(self, max_entries: int, max_text: int) -> None:
        self.max_entries = max_entries
        self.max_text = max_text
        self.table: dict[str, _T] = {}

    def __len__(self) -> int:
        return len(self.table)

    def text_chars(self) -> int:
        """Characters held in keys (what the size bound is about)."""
        return sum(map(len, self.table))

    def snapshot(self) -> dict[str, int]:
        """For ``/status``."""
        return {"entries": len(self.table), "text_chars": self.text_chars()}


_ALL: list[TextMemo[object]] = []


def forget_all() -> None:
    """Empty every memo table: after a flood they hold the flood's values, allocated all
    through it, which keep otherwise empty allocator pages resident. The edge calls
    this before a full collection (:func:`proxy.runtime.start_heap_trimming`); the
    working set refills in a few messages."""
    for memo in _ALL:
        memo.table.clear()


def memoise_text(
    compute: Callable[[str], _T], *, max_entries: int, max_text: int
) -> tuple[Callable[[str], _T], TextMemo[_T]]:
    """``compute`` memoised by its text argument; returns the function and its table.

    ``compute`` must be pure and its results immutable (or never mutated by callers);
    exceptions are not cached.
    """
    memo: TextMemo[_T] = TextMemo(max_entries, max_text)
    _ALL.append(memo)  # type: ignore[arg-type]  # only its table is touched
    table = memo.table

    def cached(text: str) -> _T:
        hit = table.get(text)
        if hit is None:
            hit = compute(text)
            if len(text) <= max_text:
                if len(table) >= max_entries:
                    table.clear()
                table[text] = hit
        return hit

    return cached, memo
