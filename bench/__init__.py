"""chatzeo's benchmark: `python -m bench` (or ``scripts/bench``) measures, in one run,
append throughput, delivery latency, history cost, client memory and idle cost, against
the seed's design and Redis Streams. See `bench.runner` for the options.
"""

__all__: list[str] = []
