"""The study databases: the Import database and the research projects' own, and moving studies
between them (by hand or by rules). Each is a partition of the one catalog: a move is a
transaction on rows, never a copy of bytes."""
