"""Measuring retrieval quality: metrics (pure numpy), ground-truth formats, and the protocol that scores exactly the
rankings the query pipeline serves."""
