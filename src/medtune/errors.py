"""The one exception type for user mistakes. `cli.py` prints its message on one line and exits 2;
any other exception is a bug in medtune and may show a traceback."""

from __future__ import annotations


class MedtuneError(Exception):
    """A user mistake, located as precisely as we can: file, row (1-based) and field."""

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None, field: str | None = None,
                 kind: str = "invalid"):
        # kind: a short reason ("empty", "missing column", ...) used to count rows dropped with data.on_bad_row=drop
        self.file, self.row, self.field, self.reason, self.kind = file, row, field, message, kind
        where = []
        if file is not None:
            where.append(str(file))
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
