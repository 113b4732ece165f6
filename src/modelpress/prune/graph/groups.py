"""Channel spaces and how tensors hold them: the bookkeeping behind dependency groups.

A *space* is a set of channels that must be cut with one index set. Spaces merge (union-find)
when an op couples them (a residual addition); a blocked space is kept whole. A tensor's
channel dim is described by a `ChannelMap`: the spaces laid side by side along that dim
(`Segment`s), each channel possibly spread over `repeat` consecutive positions.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """Positions `offset + c * repeat + r` (c < size, r < repeat) of a dim hold channel c of `space`."""

    space: int
    offset: int
    size: int
    repeat: int = 1


@dataclass(frozen=True)
class ChannelMap:
    """Which dim of a tensor holds channels, and which spaces it holds."""

    dim: int
    segments: tuple[Segment, ...]

    @property
    def width(self) -> int:
        return sum(s.size * s.repeat for s in self.segments)


class SpaceTable:
    """Union-find over channel spaces, with their sizes and the reasons they are blocked."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self._size: list[int] = []
        self._reasons: dict[int, list[str]] = {}

    def new(self, size: int) -> int:
        self._parent.append(len(self._parent))
        self._size.append(size)
        return len(self._parent) - 1

    def find(self, s: int) -> int:
        while self._parent[s] != s:
            self._parent[s] = self._parent[self._parent[s]]
            s = self._parent[s]
        return s

    def size(self, s: int) -> int:
        return self._size[self.find(s)]

    def union(self, a: int, b: int) -> bool:
        """Merge two spaces of equal size; False (nothing merged) if the sizes differ."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return True
        if self._size[ra] != self._size[rb]:
            return False
        self._parent[rb] = ra
        reasons = self._reasons.pop(rb, [])
        if reasons:
            self._reasons.setdefault(ra, []).extend(r for r in reasons if r not in self._reasons.get(ra, []))
        return True

    def unify(self, a: ChannelMap, b: ChannelMap) -> bool:
        """Merge two maps segment by segment; False if they are laid out differently."""
        if len(a.segments) != len(b.segments):
            return False
        for sa, sb in zip(a.segments, b.segments, strict=True):
            if (sa.offset, sa.size, sa.repeat) != (sb.offset, sb.size, sb.repeat):
                return False
        return all(self.union(sa.space, sb.space) for sa, sb in zip(a.segments, b.segments, strict=True))

    def block(self, s: int, reason: str) -> None:
        reasons = self._reasons.setdefault(self.find(s), [])
        if reason not in reasons:
            reasons.append(reason)

    def reasons(self, s: int) -> list[str]:
        return list(self._reasons.get(self.find(s), []))
