"""Table definitions (`paysaga.tables`): the state paysaga keeps, each with a changelog."""

#: Every table of the app; `topics create` declares one compacted changelog per entry.
TABLES: tuple[str, ...] = ("payments", "idempotency")
