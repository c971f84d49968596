"""Readers for the source datasets and their metadata files, with strict input checks.

Every error is a ``ValueError`` naming the file and what is wrong with it. Pickles are read
with a restricted unpickler that only rebuilds numpy arrays and plain containers, so a
malicious "dataset" file cannot run code.

One module per source family, re-exported here (``from shards import sources as src`` and
``src.load_cifar`` etc. keep working):

* :mod:`shards.sources.common`: pinned downloads and the restricted unpickler;
* :mod:`shards.sources.cifar`: CIFAR-10/100 pickles;
* :mod:`shards.sources.imagenet`: downsampled ImageNet 32/64 and the ImageNet-127 class map;
* :mod:`shards.sources.imagenet_lt`: the ImageNet-LT split lists;
* :mod:`shards.sources.jpeg_tree`: full-resolution ImageNet folder trees (``train/<wnid>/``).
"""

from __future__ import annotations

from shards.sources.cifar import (  # noqa: F401  (re-exported)
    CIFAR,
    ArraySource,
    load_cifar,
)
from shards.sources.common import (  # noqa: F401  (re-exported)
    _labels,
    _load_pickle_bytes,
    _planar_to_hwc,
    _SafeUnpickler,
    download,
    fetch_files,
    git_blob_sha1,
    load_data_file,
    md5_file,
)
from shards.sources.imagenet import (  # noqa: F401  (re-exported)
    _COSSL,
    _TRAIN_RE,
    _VAL_RE,
    _WMIGFTL,
    IMAGENET127_LISTS,
    IMAGENET127_META,
    DownsampledImageNet,
    derive_wnid_to_127,
    load_imagenet127_map,
    load_wnid_to_127,
    read_map_clsloc,
    scan_downsampled_imagenet,
)
from shards.sources.imagenet_lt import (  # noqa: F401  (re-exported)
    _LT,
    IMAGENET_LT_LISTS,
    ListSplit,
    read_split_list,
    wnid_names,
)
from shards.sources.jpeg_tree import (  # noqa: F401  (re-exported)
    ClassTree,
    scan_class_tree,
)
