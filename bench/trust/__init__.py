"""What the commit guard of `chatzeo serve` costs, and the TLS material its tests use.

`chatzeo.testing.make_pki` makes a throwaway CA, a server certificate and client
certificates; `bench.trust.run` measures posting and delivery through a guarded and
an unguarded server in the same run (``scripts/bench-trust``).
"""
