"""Bus clients of a running linegate line (ctl, record, history, view): separate processes that
import from edge/ only the message contract, the subscriber and the control contract."""
