"""Paths below our folders are reached without following links, with openat2 and without."""

import os

import pytest

from watcher import beneath


@pytest.fixture(params=[True, False], ids=["openat2", "walk"])
def resolver(request, monkeypatch):
    if request.param and not beneath.OPENAT2:
        pytest.skip("openat2 is not available here")
    monkeypatch.setattr(beneath, "OPENAT2", request.param)
    return request.param


def test_a_real_folder_is_reached(tmp_path, resolver):
    (tmp_path / "a" / "b").mkdir(parents=True)
    with beneath.folder(tmp_path, "a/b") as fd:
        assert os.fstat(fd).st_ino == (tmp_path / "a" / "b").stat().st_ino


@pytest.mark.parametrize("rel", ["link/b", "a/link", "a/link/x"])
def test_a_link_on_the_way_is_outside(tmp_path, resolver, rel):
    outside = tmp_path / "outside"
    (outside / "b").mkdir(parents=True)
    (tmp_path / "drop" / "a").mkdir(parents=True)
    (tmp_path / "drop" / "link").symlink_to(outside)
    (tmp_path / "drop" / "a" / "link").symlink_to(outside)
    with pytest.raises(beneath.Outside):
        with beneath.folder(tmp_path / "drop", rel):
            pass


def test_a_file_on_the_way_is_outside_and_a_missing_folder_is_not_found(tmp_path, resolver):
    (tmp_path / "f").write_text("x")
    with pytest.raises(beneath.Outside):
        with beneath.folder(tmp_path, "f/g"):
            pass
    with pytest.raises(FileNotFoundError):
        with beneath.folder(tmp_path, "missing/g"):
            pass


@pytest.mark.parametrize("rel", ["../x", "a/../../x"])
def test_a_path_that_climbs_out_is_refused(tmp_path, resolver, rel):
    (tmp_path / "a").mkdir()
    with pytest.raises(beneath.Outside):
        with beneath.parent(tmp_path, rel + "/name"):
            pass
