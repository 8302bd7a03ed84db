"""What differs between SQLite and PostgreSQL SQL: placeholders, types, limits."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Dialect:
    """One backend's spelling of the few things the shared SQL cannot say alike."""

    name: str  # "sqlite" or "postgresql"
    bigint: str  # a 64-bit integer column (SQLite's INTEGER is 64-bit)
    real: str  # a double column
    boolean: str
    false: str
    serial: str  # an id column whose values are never reused
    numbered: bool  # placeholders are $1, $2… rather than ?

    @property
    def is_sqlite(self) -> bool:
        return self.name == "sqlite"

    def sql(self, text: str) -> str:
        """Shared SQL, written with `?` placeholders, in this dialect."""
        if not self.numbered:
            return text
        count = iter(range(1, text.count("?") + 1))
        return re.sub(r"\?", lambda _: f"${next(count)}", text)

    def limit(self, n: int) -> int | None:
        # SQLite reads a negative LIMIT as "no limit"; PostgreSQL wants NULL.
        return n if self.is_sqlite or n >= 0 else None


SQLITE = Dialect(
    name="sqlite", bigint="INTEGER", real="REAL", boolean="INTEGER", false="0",
    serial="INTEGER PRIMARY KEY AUTOINCREMENT", numbered=False,
)
POSTGRES = Dialect(
    name="postgresql", bigint="BIGINT", real="DOUBLE PRECISION", boolean="BOOLEAN",
    false="false", serial="BIGSERIAL PRIMARY KEY", numbered=True,
)
