"""Pair extractors, one module each, registered by key (`base.REGISTRY`): the spec's
`pair_extractor` names one or several of them."""

from encoder_pipeline.lib.extractors import (  # noqa: F401  (each registers itself)
    docstring,
    heading,
    structure_free,
    title,
)
from encoder_pipeline.lib.extractors.base import (
    REGISTRY,
    Extraction,
    Extractor,
    ExtractorConfig,
    get,
)

__all__ = ["REGISTRY", "Extraction", "Extractor", "ExtractorConfig", "get"]
