"""Measuring retrieval quality: metrics (pure numpy, the benchmarks' official AP), ground-truth formats (revisited.py:
the Revisited Oxford/Paris files, read without trusting pickle), and the protocol that scores exactly the rankings the
query pipeline serves."""
