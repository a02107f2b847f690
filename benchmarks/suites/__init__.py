"""One module per suite; each defines ``SUITE`` (see ``benchmarks.harness``)."""
