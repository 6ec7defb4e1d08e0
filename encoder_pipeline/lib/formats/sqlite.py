"""A table of a SQLite database file: `corpus.path = "docs.db"` when it holds one table, else
`"docs.db#table"`; columns map through `id_field` / `title_field` / `text_field` like any table.
Read through Daft's SQL reader over a SQLAlchemy engine (streamed; SQLAlchemy comes with Dagster)."""

from __future__ import annotations

import sqlite3

import daft
import sqlalchemy

from encoder_pipeline.lib.formats.base import (
    CorpusError,
    CorpusFormat,
    Fields,
    Skipped,
    mapped,
    register,
    require_exists,
)


def _tables(path: str) -> list[str]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
        try:
            rows = connection.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view') "
                                      "AND name NOT LIKE 'sqlite_%' ORDER BY name").fetchall()
        except sqlite3.DatabaseError as error:
            raise CorpusError(f"cannot read {path} as a SQLite database: {error}") from error
    return [name for (name,) in rows]


@register
class SQLite(CorpusFormat):
    key = "sqlite"
    suffixes = (".db", ".sqlite", ".sqlite3")
    location_hint = "a SQLite file, as path/to/file.db or path/to/file.db#table"

    def _table(self, location: str) -> tuple[str, str]:
        """(database file, table): the one named after '#', else the database's only table."""
        path, _, table = location.partition("#")
        require_exists(path, self.location_hint)
        tables = _tables(path)
        if table and table not in tables:
            raise CorpusError(f"{path} has no table '{table}' (tables: {', '.join(tables) or 'none'})")
        if not table and len(tables) != 1:
            raise CorpusError(f"{path} holds {len(tables)} tables ({', '.join(tables) or 'none'}): name "
                              f"one in corpus.path, e.g. \"{path}#{tables[0] if tables else 'documents'}\"")
        return path, table or tables[0]

    def _frame(self, location: str) -> daft.DataFrame:
        path, table = self._table(location)
        engine = sqlalchemy.create_engine(f"sqlite:///{path}")
        quoted = '"' + table.replace('"', '""') + '"'  # a name from sqlite_master, quoted as SQL wants
        return daft.read_sql(f"SELECT * FROM {quoted}", engine.connect)

    def read(self, location: str, fields: Fields, on_malformed: str = "fail",
             skipped: Skipped | None = None) -> daft.DataFrame:
        return mapped(self._frame(location), fields, location)

    def source_fields(self, location: str) -> list[str]:
        return list(self._frame(location).column_names)

    def detects(self, location: str) -> bool:
        return super().detects(location.partition("#")[0])

    def source_paths(self, location: str) -> list[str]:
        return [location.partition("#")[0]]

    def present(self, location: str) -> bool:
        return super().present(location.partition("#")[0])
