"""Benchmarks against the anchors: one runnable module per question (issue 6).

``python -m benchmarks.dp_overhead`` and ``python -m benchmarks.accounting`` each print
Markdown tables and write JSON (``--out``); ``--quick`` is the short smoke mode.
Measured results, with date, machine and command, are kept in ``benchmarks/RESULTS.md``.
"""
