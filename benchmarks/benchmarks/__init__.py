"""asv benchmarks of pymq; run them from benchmarks/ with asv."""
