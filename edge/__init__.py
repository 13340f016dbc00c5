"""linegate edge runtime. Imports neither torch nor training/export."""
