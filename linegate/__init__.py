"""linegate command line (dispatches to edge, training and export)."""
