#!/usr/bin/env python3
"""Build or update the HDF5 feature database of every image under a folder.

python index.py --database database --index index/demo.h5
python index.py --database photos --index photos.h5 --backend faiss           # HNSW/IVF index file beside it
python index.py --database photos --index photos.h5 --backend milvus --milvus-uri http://milvus:19530
python index.py --database /shared/photos --index photos.h5 --ray auto        # extraction on a Ray cluster
"""

import sys

from retrieval.cli.index import main

if __name__ == "__main__":
    sys.exit(main())
