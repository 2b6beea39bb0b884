"""Models: which CNN and which weights (``backbones``), the EfficientNet-Lite0 Keras port, and the restricted reader of
PyTorch weight files (``torch_pickle``)."""
