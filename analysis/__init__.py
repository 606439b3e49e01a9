"""critbatch.analysis: from a sweep's logs to figures, tables, the critical batch size and the report.

Three steps, each its own module: ``load`` (read a sweep's Arrow parts from
the store, one cell at a time, into small summaries), ``compute`` (pure
functions: thresholds, steps to threshold, speedup, efficiency, regimes,
critical batch size, final metrics), ``plots`` (figures and tables, each with
the CSV behind it). ``report`` ties them together as ``critbatch analyze``;
``synthetic`` writes sweeps with known answers in the real log format.
"""
