"""The compression methods, one module per method or family; each module's ``METHODS`` lists its
:class:`moe_utils.compression.registry.Method` entries, which the registry collects."""
