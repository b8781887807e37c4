"""Files written so that nothing is lost: atomic writes and content checksums (imports nothing of the package)."""
