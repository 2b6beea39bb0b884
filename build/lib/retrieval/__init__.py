"""Content-based image retrieval: CNN descriptors in an HDF5 feature database, searched by cosine similarity.

The flow, one sub-package per step: ``images`` (decode safely) -> ``models`` (backbones and weights) ->
``descriptors`` (encoder settings, pooling, whitening, extractor) -> ``storage`` (the HDF5 database) -> ``search``
(backends, query expansion, the query pipeline) -> ``indexing`` / ``engine`` -> ``web`` / ``evaluation`` -> ``cli``.
Importing the package does no work: no TensorFlow import, no model, no file access.
"""
