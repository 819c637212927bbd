"""Measurements of chatzeo on PostgreSQL (RelStorage) beside ZEO, in one run.

``scripts/bench-pg`` runs `bench.postgres.run.main`; each client is a separate process
(`bench.postgres.worker`), so the figures include real inter-process delivery.
"""
