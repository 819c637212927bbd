"""What the commit guard of `chatzeo serve` costs, and the TLS material its tests use.

`benchtrust.certs` makes a throwaway CA, a server certificate and client
certificates; `benchtrust.run` measures posting and delivery through a guarded and
an unguarded server in the same run (``scripts/bench-trust``).
"""
