"""Expert compression: pruning and merging methods as one registry (:mod:`.registry`, the methods
under :mod:`.methods`), the :class:`Compression` value every cache key names by its digest
(:mod:`.value`), and how a merged model is built, applied and saved (:mod:`.merging`)."""

from moe_utils.compression.value import Compression

__all__ = ["Compression"]
