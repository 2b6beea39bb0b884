"""The feature database on disk: the HDF5 file (``database``) and the checkpoints of a running index job."""
