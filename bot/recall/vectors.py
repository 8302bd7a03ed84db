"""Per-conversation embedding vectors in memory: numpy float32, LRU, bounded in bytes.

Rows come from the database (float32 blobs); the cache only ever asks for the
rows newer than what it holds, so a turn's refresh costs its new messages, not
the history. Vectors are normalised on the way in, so a dot product is the
cosine similarity. When the bound is reached the least recently used
conversations go first; a single conversation larger than the bound keeps
its newest rows (its oldest are then not searched: `covers_from` says where
coverage starts).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

DEFAULT_MAX_BYTES = 64 * 2**20
FloatArray = npt.NDArray[np.float32]

Loader = Callable[[int], Awaitable[Sequence[tuple[int, bytes]]]]


def to_blob(vector: Sequence[float] | FloatArray) -> bytes:
    """A vector as stored: little-endian float32."""
    return np.asarray(vector, dtype="<f4").tobytes()


def from_blob(blob: bytes) -> FloatArray:
    return np.frombuffer(blob, dtype="<f4").astype(np.float32, copy=False)


def normalised(matrix: FloatArray) -> FloatArray:
    norms = np.linalg.norm(matrix, axis=-1, keepdims=True)
    norms[norms == 0] = 1.0
    return (matrix / norms).astype(np.float32, copy=False)


MIN_BACKGROUND = 16  # fewer similarities than this say nothing about the background


def outlier_floor(scores: FloatArray) -> float:
    """The similarity a message needs to count as evidence, not noise.

    Raw cosine floors don't carry across models or languages: all-MiniLM
    puts unrelated English pairs near 0.05 but any two Chinese sentences near
    0.6 (it was trained on English), so a fixed floor is either useless or
    blind. Measured against the conversation's own similarities instead, a
    match must beat the background mean by as many standard deviations as the
    largest of n unrelated similarities would reach (√(2 ln n), the expected
    maximum of n normal draws): near-random top hits then fall below it, and
    a real paraphrase stands well above (z ≈ 4–10 in the memory benchmark).
    """
    n = len(scores)
    if n < MIN_BACKGROUND:
        return -np.inf
    mean, std = float(scores.mean()), float(scores.std())
    return mean + math.sqrt(2 * math.log(n)) * std


@dataclass(slots=True)
class _Entry:
    model: str
    ids: npt.NDArray[np.int64]  # capacity-sized; the first `rows` are live
    matrix: FloatArray  # capacity × dim
    rows: int = 0
    covers_from: int = 0  # ids below this were dropped for the bound

    @property
    def newest_id(self) -> int:
        return int(self.ids[self.rows - 1]) if self.rows else 0

    @property
    def nbytes(self) -> int:
        return int(self.ids.nbytes + self.matrix.nbytes)


class VectorCache:
    """Vectors per conversation; not thread-safe (one event loop owns it)."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __contains__(self, conversation_id: object) -> bool:
        return conversation_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def newest_id(self, conversation_id: int, model: str) -> int:
        """The newest message id held for this conversation and model (0: none)."""
        entry = self._entries.get(conversation_id)
        return entry.newest_id if entry is not None and entry.model == model else 0

    def rows(self, conversation_id: int) -> int:
        entry = self._entries.get(conversation_id)
        return entry.rows if entry is not None else 0

    def covers_from(self, conversation_id: int) -> int:
        entry = self._entries.get(conversation_id)
        return entry.covers_from if entry is not None else 0

    def drop(self, conversation_id: int) -> None:
        """Forget a conversation (after /reset, forget, or a deleted message)."""
        entry = self._entries.pop(conversation_id, None)
        if entry is not None:
            self._bytes -= entry.nbytes

    def add(self, conversation_id: int, model: str, ids: Sequence[int],
            vectors: Iterable[bytes] | FloatArray) -> int:
        """Append rows newer than the cache (older or repeated ids are skipped).

        A different model's vectors replace the conversation's entry (they
        are not comparable). Returns the rows added.
        """
        matrix = (np.asarray(vectors, dtype=np.float32) if isinstance(vectors, np.ndarray)
                  else np.stack([from_blob(b) for b in vectors]) if ids
                  else np.zeros((0, 0), np.float32))
        if len(ids) != len(matrix):
            raise ValueError("one vector per id")
        if not len(ids):
            return 0
        id_array = np.asarray(ids, dtype=np.int64)
        entry = self._entries.get(conversation_id)
        if entry is not None and (entry.model != model or entry.matrix.shape[1]
                                  != matrix.shape[1]):
            self.drop(conversation_id)
            entry = None
        keep = id_array > (entry.newest_id if entry else 0)
        if not keep.all():
            id_array, matrix = id_array[keep], matrix[keep]
        order = np.argsort(id_array, kind="stable")
        id_array, matrix = id_array[order], normalised(matrix[order])
        if not len(id_array):
            return 0
        if entry is None:
            entry = _Entry(model, np.zeros(0, np.int64), np.zeros((0, matrix.shape[1]),
                                                                  np.float32))
            self._entries[conversation_id] = entry
        self._append(entry, id_array, matrix)
        self._entries.move_to_end(conversation_id)
        self._evict(conversation_id)
        return len(id_array)

    def _append(self, entry: _Entry, ids: npt.NDArray[np.int64], matrix: FloatArray) -> None:
        need = entry.rows + len(ids)
        if need > len(entry.ids):  # grow by doubling: appends stay amortised O(new rows)
            capacity = max(need, 2 * len(entry.ids), 16)
            new_ids = np.zeros(capacity, np.int64)
            new_matrix = np.zeros((capacity, matrix.shape[1]), np.float32)
            new_ids[:entry.rows] = entry.ids[:entry.rows]
            new_matrix[:entry.rows] = entry.matrix[:entry.rows]
            self._bytes -= entry.nbytes
            entry.ids, entry.matrix = new_ids, new_matrix
            self._bytes += entry.nbytes
        entry.ids[entry.rows:need] = ids
        entry.matrix[entry.rows:need] = matrix
        entry.rows = need

    def _evict(self, current: int) -> None:
        while self._bytes > self.max_bytes and len(self._entries) > 1:
            oldest = next(iter(self._entries))
            if oldest == current:
                break
            self.drop(oldest)
        entry = self._entries.get(current)
        if entry is None or self._bytes <= self.max_bytes:
            return
        # One conversation alone is over the bound: keep its newest rows, compacted.
        row_bytes = entry.matrix.shape[1] * 4 + 8
        keep = max(1, min(entry.rows, self.max_bytes // row_bytes))
        start = entry.rows - keep
        ids = entry.ids[start:entry.rows].copy()
        matrix = entry.matrix[start:entry.rows].copy()
        self._bytes -= entry.nbytes
        entry.ids, entry.matrix, entry.rows = ids, matrix, keep
        entry.covers_from = int(ids[0])
        self._bytes += entry.nbytes

    def search(self, conversation_id: int, query: Sequence[float] | FloatArray,
               before_id: int, limit: int, model: str | None = None,
               *, outliers_only: bool = False) -> list[tuple[int, float]]:
        """The `limit` most similar messages with id < before_id: (id, cosine), best first.

        With `outliers_only`, only messages whose similarity stands out from the
        conversation's own background (see `outlier_floor`) are returned.
        """
        entry = self._entries.get(conversation_id)
        if entry is None or not entry.rows or limit <= 0 or (model and entry.model != model):
            return []
        self._entries.move_to_end(conversation_id)
        q = np.asarray(query, dtype=np.float32)
        if q.shape != (entry.matrix.shape[1],):
            return []
        q = normalised(q[None, :])[0]
        # ids are sorted: the rows below the bound are a prefix.
        n = int(np.searchsorted(entry.ids[:entry.rows], before_id, side="left"))
        if n == 0:
            return []
        scores = entry.matrix[:n] @ q
        if outliers_only:
            floor = outlier_floor(scores)
            n_above = int((scores >= floor).sum())
            if n_above == 0:
                return []
            limit = min(limit, n_above)
        k = min(limit, n)
        top = np.argpartition(-scores, k - 1)[:k] if k < n else np.arange(n)
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(int(entry.ids[i]), float(scores[i])) for i in top]

    async def refresh(self, conversation_id: int, model: str, load: Loader) -> int:
        """Add the rows newer than the cache, as `load(after_id)` returns them."""
        rows = await load(self.newest_id(conversation_id, model))
        if not rows:
            return 0
        return self.add(conversation_id, model, [r[0] for r in rows], [r[1] for r in rows])
