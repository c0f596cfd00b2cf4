"""Where an object came from and who brought it in: every intake hands ingest one of these."""

from dataclasses import dataclass

FOLDER, DICOM, UPLOAD, REPLICATION = "folder", "dicom", "upload", "replication"


@dataclass(frozen=True)
class Origin:
    kind: str  # folder, dicom, upload, replication
    creator: str  # folder-scanner, dicom-server, a user
    calling_ae: str | None = None  # dicom: the sender's AE title, our AE title, its address
    called_ae: str | None = None
    remote_host: str | None = None  # dicom, upload: the peer's address; replication: the source URL

    def columns(self) -> dict:
        return {"origin": self.kind, "calling_ae": self.calling_ae, "called_ae": self.called_ae,
                "remote_host": self.remote_host}

    def describe(self) -> str:
        if self.kind == DICOM:
            return f"{self.calling_ae}@{self.remote_host} to {self.called_ae}"
        if self.kind == UPLOAD:
            return f"an upload by {self.creator} from {self.remote_host}"
        if self.kind == REPLICATION:
            return f"a replication by {self.creator} from {self.remote_host}"
        return self.kind

    def label(self, name: str) -> str:
        """How an object of this origin is named in the history and below rejected_dir:
        ``dicom/<calling AE>/…``, ``upload/<user>/…``, ``replication/<user>/…``."""
        who = self.calling_ae if self.kind == DICOM else self.creator
        return f"{self.kind}/{who or '-'}/{name}"


def from_folder(creator: str) -> Origin:
    return Origin(FOLDER, creator)


def from_dicom(creator: str, calling_ae: str, called_ae: str, remote_host: str) -> Origin:
    return Origin(DICOM, creator, calling_ae.strip(), called_ae.strip(), remote_host)


def from_upload(user: str, remote_host: str) -> Origin:
    return Origin(UPLOAD, user, remote_host=remote_host)


def from_replication(user: str, source_url: str) -> Origin:
    return Origin(REPLICATION, user, remote_host=source_url)
