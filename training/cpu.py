"""CPU thread control for training loops made of many small steps."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the block on one intra-op thread, then restore the setting.

    For loops of small tensor operations (the coreset's matrix-vector steps, the FCDD head's
    batches of 28x28 maps) synchronising threads costs more than it saves on a small, shared
    CPU: on this project's 2-core machine both ran 2.5-5x faster on one thread than on two.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
