"""Content-based image retrieval: CNN descriptors in an HDF5 feature database, searched by cosine similarity.

Importing the package does no work: no TensorFlow import, no model, no file access.
"""
