"""Measurements of chatzeo on PostgreSQL (RelStorage) beside ZEO, in one run.

``scripts/bench-pg`` runs `benchpg.run.main`; each client is a separate process
(`benchpg.worker`), so the figures include real inter-process delivery.
"""
