"""`linegate view`: the operator's browser page, a bus client (see lineside.view.app)."""
