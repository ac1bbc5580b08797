"""Side-by-side benchmarks of modal-llm and its peers (issue 6); run ``python -m benchmarks``.

Not part of the test suite and not shipped in the wheel. Modules here import only the
standard library at the top, so a worker process pays for exactly the client it measures.
"""
