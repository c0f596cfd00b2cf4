"""Origins: each instance says which way it came in (``folder``, ``dicom``) and, over the DICOM
network, from whom: the sender's AE title, the AE title it called, its address."""


def up(migrator, db):
    for column, kind in (("origin", "TEXT NOT NULL DEFAULT 'folder'"), ("calling_ae", "TEXT"),
                         ("called_ae", "TEXT"), ("remote_host", "TEXT")):
        db.execute_sql(f'ALTER TABLE "instance" ADD COLUMN "{column}" {kind}')
