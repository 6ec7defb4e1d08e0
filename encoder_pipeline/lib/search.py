"""Search a domain's served index: the persisted encoder + FAISS index, loaded from the artifact store.

    from encoder_pipeline.lib.search import Searcher

    searcher = Searcher.for_domain("code")
    for hit in searcher.search("parse a date", k=5):
        print(hit.score, hit.id, hit.title)

What is served: the `serving_index` asset's LATEST version, and nothing else (`served_index`). Before a
first promotion nothing is: a candidate `embedding_index` that the report refused, or that was never
promoted, is not searched; `served_index` raises NothingServed with a sentence that names it, why it
is not served, and the command that serves it anyway. The folder holds the FAISS index (`lib.index`)
and `choice.json` (rung, model_path, revision, ...). The encoder is the model folder the index was
built with; `load_index` refuses any other revision, so a query is never embedded by one encoder and
matched against another's vectors. Query embeddings go in at full dimension: the index truncates to
its Matryoshka width and rescores itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from encoder_pipeline.lib.artifacts import LATEST_FILE, ArtifactStore, MissingArtifact
from encoder_pipeline.lib.layout import CHOICE_FILE, EMBEDDING_INDEX, EVAL_REPORT, SERVING_INDEX, read_report


class NothingServed(MissingArtifact):
    """The domain has no promoted index: its candidate was refused or never promoted, or nothing is
    built (DomainNotBuilt). The message says which, and what to run."""


class DomainNotBuilt(NothingServed):
    """No published index for the domain: it has not been materialized (into this artifact root)."""


@dataclass(frozen=True)
class Hit:
    id: str  # the unit (chunk) id
    parent_id: str  # the document it belongs to (what relevance is judged on)
    title: str
    score: float


@dataclass(frozen=True)
class ServedIndex:
    """Where one index version and its encoder are (`served_index`: the served one)."""

    domain: str
    asset: str  # serving_index, or embedding_index for a candidate opened by name (`index_version`)
    version: str
    index_dir: Path
    model_path: Path  # as recorded in choice.json, or under this store's root if the root has moved
    choice: dict

    def coverage(self) -> dict:
        """The cleaned corpus the index was built over: its units and documents (None for an index
        built before the whole corpus was served, which did not record them)."""
        return {"corpus_units": self.choice.get("corpus_units"),
                "corpus_documents": self.choice.get("corpus_documents")}

    @property
    def revision(self) -> str:
        return self.choice["revision"]

    @property
    def trust_remote_code(self) -> bool:
        """The domain spec's opt-in as recorded when the index was built (absent: off)."""
        return self.choice.get("trust_remote_code", False) is True

    def encoder_folder(self) -> Path:
        """The encoder folder, or MissingArtifact when it is gone (collected, or the root moved away)."""
        if not self.model_path.is_dir():
            raise MissingArtifact(f"the encoder folder of {self.asset} {self.version} no longer exists: "
                                  f"{self.choice['model_path']}")
        return self.model_path


def default_store() -> ArtifactStore:
    """The artifact root the pipeline writes to (what `ArtifactStoreResource()` defaults to)."""
    from encoder_pipeline.paths import artifact_root

    return ArtifactStore(artifact_root())


def served_domains(store: ArtifactStore) -> list[str]:
    """Domains with a promoted index under this store's root."""
    if not store.root.is_dir():
        return []
    return sorted(d.name for d in store.root.iterdir() if (d / SERVING_INDEX / LATEST_FILE).exists())


def _model_folder(store: ArtifactStore, recorded: str) -> Path:
    """The encoder folder recorded in choice.json; if the artifact root has moved since and the
    recorded one is gone, the same `<domain>/<asset>/<version>/model` under this store's root."""
    path = Path(recorded)
    relocated = store.root.joinpath(*path.parts[-4:])
    return relocated if not path.is_dir() and relocated.is_dir() else path


def index_version(store: ArtifactStore, domain: str, asset: str, version: str) -> ServedIndex:
    """One published index version (serving_index or embedding_index) and its encoder, by name."""
    index_dir = store.asset_dir(domain, asset) / version
    choice = json.loads((index_dir / CHOICE_FILE).read_text())
    return ServedIndex(domain, asset, version, index_dir, _model_folder(store, choice["model_path"]), choice)


def _why_nothing_is_served(store: ArtifactStore, domain: str) -> NothingServed:
    """The error for a domain without a promotion: what its candidate is, why it is not served, and
    the command that changes that."""
    try:
        candidate = store.latest_version(domain, EMBEDDING_INDEX)
    except MissingArtifact:
        served = served_domains(store)
        return DomainNotBuilt(
            f"domain '{domain}' has no index under {store.root}: build it with "
            f"`encoder-pipeline materialize --domain {domain}`"
            + (f" (served here: {', '.join(served)})" if served else ""))
    choice = json.loads((store.asset_dir(domain, EMBEDDING_INDEX) / candidate / CHOICE_FILE).read_text())
    named = (f"{EMBEDDING_INDEX} {candidate} ({choice.get('rung')}, "
             f"{choice.get('precision')}@{choice.get('dims')})")
    head = f"domain '{domain}' serves nothing: no index has been promoted. Its candidate, {named}, "
    try:
        judged = store.manifest(domain, EVAL_REPORT)["upstream"].get(EMBEDDING_INDEX)
        promotion = read_report(store, domain)["promotion"]
    except FileNotFoundError:
        judged, promotion = None, None
    if judged != candidate or promotion is None:
        return NothingServed(head + f"has not been judged by an eval_report yet: "
                                    f"`encoder-pipeline materialize --domain {domain}` judges it")
    if promotion["safe"]:
        return NothingServed(head + f"passed its eval_report ({promotion['reason']}) but was not "
                                    f"promoted: `encoder-pipeline promote --domain {domain}` serves it")
    return NothingServed(head + f"was refused by its eval_report ({promotion['reason']}). "
                                f"`encoder-pipeline promote --domain {domain} --force` serves it anyway "
                                f"(recorded as forced in its promotion.json and in the UI)")


def served_index(domain: str, store: ArtifactStore | None = None) -> ServedIndex:
    """What users search: the `serving_index` asset's LATEST version. Raises NothingServed (a
    MissingArtifact) when nothing has been promoted; there is no fallback to the candidate."""
    store = store or default_store()
    try:
        # what users search is measured against (the report, drift), never built from
        version = store.latest_version(domain, SERVING_INDEX, lineage=False)
    except MissingArtifact:
        raise _why_nothing_is_served(store, domain) from None
    return index_version(store, domain, SERVING_INDEX, version)


class Searcher:
    """One domain's encoder and index, loaded once; `search` embeds a query and returns hits."""

    def __init__(self, served: ServedIndex, backend: str = "torch", onnx_cache: str | Path | None = None):
        from encoder_pipeline.lib import encoders
        from encoder_pipeline.lib.index import load_index

        self.served = served
        self.backend = backend
        model_path = str(served.encoder_folder())
        # The revision check runs against the folder's own fingerprint, not only what choice.json says.
        self.index = load_index(served.index_dir, encoders.model_fingerprint(model_path))
        self.encoder = encoders.load_encoder(model_path, backend=backend,
                                             onnx_cache=onnx_cache,
                                             trust_remote_code=served.trust_remote_code)

    @classmethod
    def for_domain(cls, domain: str, store: ArtifactStore | None = None, backend: str = "torch",
                   onnx_cache: str | Path | None = None) -> Searcher:
        """Load the domain's served encoder + index from `store` (default: the pipeline's root).
        Raises NothingServed, naming the command to run, when nothing has been promoted."""
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

    def query_tokens(self, query: str) -> tuple[int, int]:
        """(tokens in `query`, tokens the encoder reads): a longer query is cut to the second."""
        model = getattr(self.encoder, "model", self.encoder)  # an ONNX encoder wraps the torch model
        return len(model.tokenizer(query)["input_ids"]), int(model.max_seq_length)

    def describe(self) -> dict:
        """What is being served, for display."""
        info = self.index.info
        return {
            "domain": self.served.domain, "asset": self.served.asset, "version": self.served.version,
            "rung": self.served.choice.get("rung"), "revision": self.served.revision,
            "dims": info.get("dims", info.get("dim")), "precision": info.get("precision", info.get("kind")),
            "documents": self.index.index.ntotal, "backend": self.backend,
            "model_path": str(self.served.model_path), **self.served.coverage(),
        }
