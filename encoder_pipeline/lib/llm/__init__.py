"""Text generation for synthetic queries: the core (`core`: parameters, cache, protocol, registry,
`generate_cached`) and one module per registered backend (`local_gguf`, `openai_compatible`).
Importing the package registers every backend."""

from encoder_pipeline.lib.llm import local_gguf, openai_compatible
from encoder_pipeline.lib.llm.core import (
    BackendKind,
    BudgetExceeded,
    Completion,
    GenerationParams,
    GenerationReport,
    LLMBackend,
    LLMError,
    ResponseCache,
    backend_kind,
    backend_names,
    generate_cached,
    register_backend,
)
from encoder_pipeline.lib.llm.local_gguf import LOCAL_MODEL_ID, LocalGGUFBackend, ensure_local_gguf
from encoder_pipeline.lib.llm.openai_compatible import OpenAIBackend

__all__ = [
    "LOCAL_MODEL_ID", "BackendKind", "BudgetExceeded", "Completion", "GenerationParams", "GenerationReport",
    "LLMBackend", "LLMError", "LocalGGUFBackend", "OpenAIBackend", "ResponseCache", "backend_kind",
    "backend_names", "ensure_local_gguf", "generate_cached", "local_gguf", "openai_compatible",
    "register_backend",
]
