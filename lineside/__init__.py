"""Bus clients of linegate: processes that consume what `linegate run` publishes (watch, record,
history, view, ctl). They import from edge/ only the message contract, the subscriber and the
control contract, never the runtime itself."""
