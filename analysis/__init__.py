"""critbatch.analysis: from a sweep's logs to figures, tables, the critical batch size and the report."""
