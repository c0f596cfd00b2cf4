"""``multipart/related; type="application/dicom"`` bodies, both ways, streamed with flat memory.

DICOMweb moves originals in these: STOW-RS uploads (read here into files, one per part) and
WADO-RS answers (written here from files; read here by a replication). The parsing is
python-multipart's; this module only says where each part's bytes go.
"""

import functools
import hashlib
import os
import secrets
from email.message import Message
from email.utils import collapse_rfc2231_value
from pathlib import Path

from python_multipart.multipart import MultipartParser

from .archive import quick_digest, start_write_back
from .errors import Refused

DICOM = "application/dicom"
CHUNK = 1 << 20


class BadBody(Refused):
    """Not a multipart/related body we can read (400), or one cut short."""


@functools.lru_cache(maxsize=64)  # (each part of an answer says the same: parsed once)
def media_type(content_type: str) -> tuple[str, dict]:
    """(``multipart/related``, its parameters in lower case keys) of a Content-Type value.
    The parameters are the cache's own: not to be changed."""
    message = Message()
    message["content-type"] = content_type or ""
    params = {k.lower(): collapse_rfc2231_value(v) for k, v in message.get_params(failobj=[])[1:]}
    return message.get_content_type(), params


def boundary_of(content_type: str, part_type: str = DICOM) -> str:
    """The boundary of a ``multipart/related`` body whose parts are ``part_type``;
    ``BadBody`` otherwise (an absent ``type`` parameter is taken to mean ``part_type``)."""
    kind, params = media_type(content_type)
    if kind != "multipart/related":
        raise BadBody(f"expected multipart/related; type=\"{part_type}\", not {content_type!r}")
    if params.get("type", part_type).lower() != part_type:
        raise BadBody(f"the parts must be {part_type}, not {params.get('type')!r}")
    if not params.get("boundary"):
        raise BadBody("multipart/related without a boundary")
    return params["boundary"]


class _Raised(Exception):
    """Carries what ``on_part`` raised through the parser, untouched."""

    def __init__(self, error: BaseException):
        super().__init__(error)
        self.error = error


class Part:
    """One part written to a file: where, its headers, its size."""

    def __init__(self, path: Path, hashed: bool = False):
        self.path = path
        self.headers: dict[str, str] = {}
        self.size = 0
        self.digest = hashlib.sha256() if hashed else None
        self.quick = quick_digest() if hashed else None

    @property
    def sha256(self) -> str | None:
        """The sha256 of the bytes written (``hashed`` parts only), hashed as they came."""
        return self.digest.hexdigest() if self.digest is not None else None

    @property
    def xxh3(self) -> str | None:
        """Their xxh3-128 (the archive's ``quick_digest``), likewise."""
        return self.quick.hexdigest() if self.quick is not None else None

    @property
    def content_type(self) -> str:
        return media_type(self.headers.get("content-type", DICOM))[0]


class PartsToFiles:
    """Feed it a body chunk by chunk; each part lands in its own new file in ``folder``
    (created exclusively, never a name that exists). ``close()`` says whether the body ended
    properly; ``BadBody`` if it did not. The files are the caller's to remove."""

    def __init__(self, folder: Path, boundary: str, prefix: str = "part", max_parts: int = 100_000,
                 max_bytes: int | None = None, hashed: bool = False, on_part=None):
        """``max_bytes``: the most the parts may hold together (``BadBody`` beyond: a sender
        that never ends would fill the disk). ``hashed``: each part's sha256 and xxh3 are
        computed as its bytes are written. ``on_part(part)``: called as each part ends, its file closed; from
        then on the part's file is the callback's, and ``abandon()`` leaves it alone."""
        self.folder, self.prefix, self.max_parts, self.max_bytes = folder, prefix, max_parts, max_bytes
        self.hashed, self.on_part = hashed, on_part
        self.total = self.count = 0
        self.parts: list[Part] = []  # (those not handed to on_part)
        self._fd: int | None = None
        self._held = bytearray()  # the part's bytes not written yet (less than CHUNK)
        self._field = self._value = b""
        self._ended = False
        self._parser = MultipartParser(boundary, {
            "on_part_begin": self._begin, "on_part_data": self._data, "on_part_end": self._end,
            "on_header_field": self._header_field, "on_header_value": self._header_value,
            "on_header_end": self._header_end, "on_end": self._finish})

    def feed(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except _Raised as raised:  # by on_part: its own exception, as it was
            raise raised.error from None
        except BadBody:
            raise
        except Exception as exc:  # python-multipart's errors: a malformed body
            raise BadBody(f"malformed multipart body: {exc}") from None

    def close(self) -> list[Part]:
        if self._fd is not None:
            self._held = bytearray()
            os.close(self._fd)
            self._fd = None
        if not self._ended:
            raise BadBody("the multipart body ended before its closing boundary")
        return self.parts

    def abandon(self) -> None:
        """Remove every file written so far (a body that failed)."""
        if self._fd is not None:
            self._held = bytearray()
            os.close(self._fd)
            self._fd = None
        for part in self.parts:
            part.path.unlink(missing_ok=True)

    def _begin(self) -> None:
        if self.count >= self.max_parts:
            raise BadBody(f"more than {self.max_parts} parts")
        self.count += 1
        path = self.folder / f"{self.prefix}-{secrets.token_hex(8)}"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.parts.append(Part(path, self.hashed))

    def _data(self, data: bytes, start: int, end: int) -> None:
        self.total += end - start
        if self.max_bytes is not None and self.total > self.max_bytes:
            raise BadBody(f"more than {self.max_bytes:,} bytes: refused before the disk fills")
        self.parts[-1].size += end - start
        if not self._held and end - start >= CHUNK // 16:  # big enough to write as it is
            self._write(memoryview(data)[start:end])
            return
        self._held += memoryview(data)[start:end]
        if len(self._held) >= CHUNK:
            self._write_held()

    def _write_held(self) -> None:
        """Hash and write what is held, at once: a syscall and a hash call a CHUNK rather
        than one each small piece of the body as it came (64 KiB from the socket), which
        would hand the GIL to and fro between threads many times an object."""
        held, self._held = self._held, bytearray()
        self._write(memoryview(held))

    def _write(self, view: memoryview) -> None:
        part = self.parts[-1]
        if part.digest is not None:
            part.digest.update(view)
            part.quick.update(view)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def _end(self) -> None:
        self._write_held()
        start_write_back(self._fd)  # (each part is an original the ingest will make durable)
        os.close(self._fd)
        self._fd = None
        if self.on_part is not None:
            try:
                self.on_part(self.parts.pop())
            except BaseException as exc:
                raise _Raised(exc) from None

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        name = self._field.decode("latin-1").strip().lower()
        self.parts[-1].headers[name] = self._value.decode("latin-1").strip()
        self._field = self._value = b""

    def _finish(self) -> None:
        self._ended = True


def new_boundary() -> str:
    return "dw-" + secrets.token_hex(16)


def body(parts, boundary: str, part_type: str = DICOM):
    """The bytes of a ``multipart/related`` body, a chunk at a time; ``parts`` yields each
    part's chunks (an iterable of iterables, read lazily). A part's end and the next one's
    head go as one chunk."""
    head, end, last = _delimiters(boundary, part_type)
    before = b""
    for chunks in parts:
        yield before + head
        yield from chunks
        before = end
    yield before + last


def body_length(sizes: list[int], boundary: str, part_type: str = DICOM) -> int:
    """The length of ``body`` with parts of ``sizes`` bytes."""
    head, end, last = _delimiters(boundary, part_type)
    return sum(sizes) + len(sizes) * (len(head) + len(end)) + len(last)


def _delimiters(boundary: str, part_type: str) -> tuple[bytes, bytes, bytes]:
    """(a part's head, a part's end, the body's end)."""
    return (f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode(), b"\r\n",
            f"--{boundary}--\r\n".encode())


def file_chunks(path):
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk
