"""Benchmarks that produce the tables in docs/ and the README; run from the repository root as
``python -m bench.<script>`` (they use flexquant's public API)."""
