"""The bounded caches of plans kept per call signature."""

from __future__ import annotations

import threading


class BoundedCache(dict):
    """A dict of at most ``limit`` entries in insertion order, the oldest
    dropped first. Reads are plain dict reads; :meth:`keep` and
    :meth:`get_or_make` insert under a lock, and a thread that planned the
    same key at the same time gets the entry kept."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit
        self._lock = threading.Lock()

    def keep(self, key, value):
        """``self[key]``, set to ``value`` unless another thread set it first."""
        with self._lock:
            if key not in self and len(self) >= self.limit:
                self.pop(next(iter(self)), None)
            return self.setdefault(key, value)

    def get_or_make(self, key, make):
        """``self[key]``, built by ``make()`` (outside the lock) when absent."""
        found = self.get(key)
        return self.keep(key, make()) if found is None else found
