"""Text sources other than the standard library, on local data (no hub at test time)."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import TextConfig
from pipeline.data.sources import SourceError, text_documents


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    rows = [f"document number {i} " * 20 for i in range(30)]
    pq.write_table(pa.table({"content": rows, "id": list(range(30))}), folder / "train.parquet")
    (tmp_path / "a.txt").write_text("alpha " * 100)
    (tmp_path / "b.txt").write_text("beta " * 100)
    return tmp_path, rows


def test_hf_loader_reads_a_local_dataset(corpus, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root, rows = corpus
    cfg = TextConfig(source="hf", hf_dataset=str(root / "corpus"), text_field="content", max_bytes=2000)
    docs = text_documents(cfg, seed=0)
    assert [t for _, t in docs] == rows[: len(docs)]
    assert 2000 <= sum(len(t) for _, t in docs) < 2000 + len(rows[0])


def test_hf_loader_names_a_missing_field(corpus, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    root, _ = corpus
    with pytest.raises(SourceError, match="no field 'text'"):
        text_documents(TextConfig(source="hf", hf_dataset=str(root / "corpus")), seed=0)


def test_local_files_txt_and_parquet(corpus):
    root, rows = corpus
    cfg = TextConfig(source="files", paths=[str(root / "*.txt"), str(root / "corpus/train.parquet")], text_field="content")
    docs = text_documents(cfg, seed=0)
    assert [t for _, t in docs] == ["alpha " * 100, "beta " * 100, *rows]


def test_local_files_errors_name_the_problem(corpus):
    root, _ = corpus
    with pytest.raises(SourceError, match="matches no file"):
        text_documents(TextConfig(source="files", paths=[str(root / "*.md")]), seed=0)
    with pytest.raises(SourceError, match="no column 'body'"):
        text_documents(TextConfig(source="files", paths=[str(root / "corpus/train.parquet")], text_field="body"), seed=0)
