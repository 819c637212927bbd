"""A ticket tracker whose tickets each hold a live chatzeo discussion (Pyramid + ZODB).

The example of docs/embedding.md: ``scripts/example-web`` runs it. `models` is the
application's graph, `app` the Pyramid application, `__main__` the command that
serves it with waitress.
"""
