"""Search a domain's served index: the persisted encoder + FAISS index, loaded from the artifact store.

    from encoder_pipeline.lib.search import Searcher

    searcher = Searcher.for_domain("code")
    for hit in searcher.search("parse a date", k=5):
        print(hit.score, hit.id, hit.title)

What is served: the `serving_index` asset when it has a published version (the candidate that passed
the report's blocking checks), otherwise `embedding_index`. Either folder holds the FAISS index
(`lib.index`) and `choice.json` (rung, model_path, revision, ...). The encoder is the model folder the
index was built with; `load_index` refuses any other revision, so a query is never embedded by one
encoder and matched against another's vectors. Query embeddings go in at full dimension:
the index truncates to its Matryoshka width and rescores itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from encoder_pipeline.lib.artifacts import ArtifactStore, MissingArtifact

SERVED_ASSETS = ("serving_index", "embedding_index")  # in order of preference
CHOICE_FILE = "choice.json"


class DomainNotBuilt(MissingArtifact):
    """No published index for the domain: it has not been materialized (into this artifact root)."""


@dataclass(frozen=True)
class Hit:
    id: str  # the unit (chunk) id
    parent_id: str  # the document it belongs to (what relevance is judged on)
    title: str
    score: float


@dataclass(frozen=True)
class ServedIndex:
    """Where a domain's served index and its encoder are."""

    domain: str
    asset: str  # serving_index or embedding_index
    version: str
    index_dir: Path
    model_path: Path
    choice: dict

    @property
    def revision(self) -> str:
        return self.choice["revision"]

    @property
    def trust_remote_code(self) -> bool:
        """The domain spec's opt-in as recorded when the index was built (absent: off)."""
        return self.choice.get("trust_remote_code", False) is True


def default_store() -> ArtifactStore:
    """The artifact root the pipeline writes to (what `ArtifactStoreResource()` defaults to)."""
    from encoder_pipeline.paths import artifact_root

    return ArtifactStore(artifact_root())


def built_domains(store: ArtifactStore) -> list[str]:
    """Domains with a published index under this store's root."""
    if not store.root.is_dir():
        return []
    return sorted(d.name for d in store.root.iterdir()
                  if any((d / asset / "LATEST").exists() for asset in SERVED_ASSETS))


def _model_folder(store: ArtifactStore, recorded: str) -> Path:
    """The encoder folder recorded in choice.json; if the artifact root has moved since, the same
    `<domain>/<asset>/<version>/model` under this store's root."""
    path = Path(recorded)
    if path.is_dir():
        return path
    relocated = store.root.joinpath(*path.parts[-4:])
    if relocated.is_dir():
        return relocated
    raise MissingArtifact(f"the served encoder's folder {recorded} no longer exists (nor {relocated})")


def served_index(domain: str, store: ArtifactStore | None = None) -> ServedIndex:
    """The domain's served index: `serving_index` if published, else `embedding_index`."""
    store = store or default_store()
    for asset in SERVED_ASSETS:
        try:
            version = store.latest_version(domain, asset)
        except MissingArtifact:
            continue
        index_dir = store.asset_dir(domain, asset) / version
        choice = json.loads((index_dir / CHOICE_FILE).read_text())
        return ServedIndex(domain, asset, version, index_dir, _model_folder(store, choice["model_path"]),
                           choice)
    built = built_domains(store)
    raise DomainNotBuilt(
        f"domain '{domain}' has no index under {store.root}: build it with "
        f"`encoder-pipeline materialize --domain {domain}`"
        + (f" (built here: {', '.join(built)})" if built else "")
    )


class Searcher:
    """One domain's encoder and index, loaded once; `search` embeds a query and returns hits."""

    def __init__(self, served: ServedIndex, backend: str = "torch", onnx_cache: str | Path | None = None):
        from encoder_pipeline.lib import encoders
        from encoder_pipeline.lib.index import load_index

        self.served = served
        self.backend = backend
        # The revision check runs against the folder's own fingerprint, not only what choice.json says.
        self.index = load_index(served.index_dir, encoders.model_fingerprint(str(served.model_path)))
        self.encoder = encoders.load_encoder(str(served.model_path), backend=backend,
                                             onnx_cache=onnx_cache,
                                             trust_remote_code=served.trust_remote_code)

    @classmethod
    def for_domain(cls, domain: str, store: ArtifactStore | None = None, backend: str = "torch",
                   onnx_cache: str | Path | None = None) -> Searcher:
        """Load the domain's served encoder + index from `store` (default: the pipeline's root).
        Raises DomainNotBuilt, naming the command to run, when there is none."""
        return cls(served_index(domain, store), backend=backend, onnx_cache=onnx_cache)

    def embed(self, queries: list[str]):
        from encoder_pipeline.lib import encoders

        # bf16 autocast only where the CPU computes it natively (see encoders.inference_precision)
        return encoders.encode(self.encoder, queries, batch_size=32, bf16=True)

    def search_many(self, queries: list[str], k: int = 10) -> list[list[Hit]]:
        if k < 1:
            raise ValueError("k must be at least 1")
        if not queries:
            return []
        index = self.index
        return [[Hit(index.ids[row], index.parents[row], index.titles[row], score) for row, score in hits]
                for hits in index.search(self.embed(list(queries)), k)]

    def search(self, query: str, k: int = 10) -> list[Hit]:
        """The top-k units for one query, best first (score: the index's inner product)."""
        return self.search_many([query], k)[0]

    def describe(self) -> dict:
        """What is being served, for display."""
        info = self.index.info
        return {
            "domain": self.served.domain, "asset": self.served.asset, "version": self.served.version,
            "rung": self.served.choice.get("rung"), "revision": self.served.revision,
            "dims": info.get("dims", info.get("dim")), "precision": info.get("precision", info.get("kind")),
            "documents": self.index.index.ntotal, "backend": self.backend,
            "model_path": str(self.served.model_path),
        }
