"""Search: the backends (``backends``), query expansion (``expansion``) and the one query pipeline (``pipeline``)."""
