"""Where an object came from and who brought it in: every intake hands ingest one of these."""

from dataclasses import dataclass

FOLDER, DICOM = "folder", "dicom"


@dataclass(frozen=True)
class Origin:
    kind: str  # folder, dicom (later: upload, replication)
    creator: str  # folder-scanner, dicom-server, a user
    calling_ae: str | None = None  # dicom: the sender's AE title, our AE title, its address
    called_ae: str | None = None
    remote_host: str | None = None

    def columns(self) -> dict:
        return {"origin": self.kind, "calling_ae": self.calling_ae, "called_ae": self.called_ae,
                "remote_host": self.remote_host}

    def describe(self) -> str:
        if self.kind == DICOM:
            return f"{self.calling_ae}@{self.remote_host} to {self.called_ae}"
        return self.kind


def from_folder(creator: str) -> Origin:
    return Origin(FOLDER, creator)


def from_dicom(creator: str, calling_ae: str, called_ae: str, remote_host: str) -> Origin:
    return Origin(DICOM, creator, calling_ae.strip(), called_ae.strip(), remote_host)
