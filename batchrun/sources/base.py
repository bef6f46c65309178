from __future__ import annotations

from abc import ABC, abstractmethod

import pyarrow as pa

from batchrun.plan import Fragment


class Source(ABC):
    #: shards must not span units (a unit is a stream that is read from its start)
    per_unit: bool = False

    @abstractmethod
    def describe(self) -> tuple[list[str], list[int], list[str]]:
        """(units in a fixed order, rows per unit, column names). Raises SpecError on unreadable input."""

    @abstractmethod
    def read_fragment(self, unit: str, fragment: Fragment, columns: list[str]) -> pa.Table:
        """The fragment's rows, only the named columns, in input order."""

    def read(self, units: tuple[str, ...], fragments: tuple[Fragment, ...], columns: list[str]) -> pa.Table:
        tables = [self.read_fragment(units[f.unit], f, columns) for f in fragments]
        return pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
