"""Postgres schemas of every domain (migrations), the append-only ledger,
metering, rating, verification and DuckDB analytics."""
