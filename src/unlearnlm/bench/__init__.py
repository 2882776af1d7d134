"""The benchmark: tiny targets and their oracles (``target``), the comparison (``run``) and its report
(``report``). See docs/benchmark.md."""
