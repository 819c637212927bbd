"""chatzeo's benchmarks.

`python -m bench` (or ``scripts/bench``) measures, in one run, append throughput,
delivery latency, history cost, client memory and idle cost, against the seed's design
and Redis Streams; see `bench.runner` for the options. Two companions measure one
question each beside ZEO in the same run: `bench.postgres` (``scripts/bench-pg``:
RelStorage on PostgreSQL with push by LISTEN/NOTIFY) and `bench.trust`
(``scripts/bench-trust``: the server's commit guard on beside off).
"""

__all__: list[str] = []
