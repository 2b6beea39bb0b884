"""Descriptors: the encoder vocabulary (``encoder``), pooling and whitening maths (pure numpy), the extractor that
runs a model, and extraction as a Ray job (``distributed``)."""
