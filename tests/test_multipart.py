"""A multipart/related body read into files: each part whole, byte for byte, and hashed as it
came, however the body is cut into pieces on its way."""

import hashlib
import random

import pytest
import xxhash

from watcher.multipart import CHUNK, BadBody, PartsToFiles, body, body_length, new_boundary


def pieces(data: bytes, rng: random.Random):
    at = 0
    while at < len(data):
        size = rng.choice([1, 7, 4096, 65536, 70001, CHUNK + 3])
        yield data[at:at + size]
        at += size


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_parts_fed_in_pieces_of_any_size_are_written_and_hashed_whole(tmp_path, seed):
    rng = random.Random(seed)
    originals = [rng.randbytes(n) for n in (0, 1, CHUNK - 1, CHUNK, 2 * CHUNK + 12345, 300)]
    boundary = new_boundary()
    data = b"".join(body([[o] for o in originals], boundary))
    found = []
    parts = PartsToFiles(tmp_path, boundary, hashed=True, on_part=found.append)
    for piece in pieces(data, rng):
        parts.feed(piece)
    parts.close()
    assert [p.path.read_bytes() for p in found] == originals
    assert [p.size for p in found] == [len(o) for o in originals]
    assert [p.sha256 for p in found] == [hashlib.sha256(o).hexdigest() for o in originals]
    assert [p.xxh3 for p in found] == [xxhash.xxh3_128(o).hexdigest() for o in originals]


@pytest.mark.parametrize("sizes", [[], [0], [1, 0, 5], [CHUNK + 3, 17]])
def test_a_body_is_as_long_as_its_length_says_before_it_is_made(sizes):
    boundary = new_boundary()
    data = b"".join(body([[b"x" * n] for n in sizes], boundary))
    assert len(data) == body_length(sizes, boundary)


def test_a_body_cut_short_mid_part_is_refused_and_its_part_removed(tmp_path):
    boundary = new_boundary()
    data = b"".join(body([[random.Random(4).randbytes(CHUNK + 10)]], boundary))
    parts = PartsToFiles(tmp_path, boundary, hashed=True)
    parts.feed(data[:CHUNK // 2])
    with pytest.raises(BadBody):
        parts.close()
    parts.abandon()
    assert list(tmp_path.iterdir()) == []
