"""Small helpers several test modules share: a free local port, the trainer's loss set-up for some technique flags.

    from helpers import free_port, loss_setup
    port = free_port()                                           # an SMTP server, a torchrun rendezvous
    setup = loss_setup("--use_rdrop", "--rdrop_alpha", "0.5")    # what setup_run makes of these flags' loss
"""

from __future__ import annotations

import socket
from types import SimpleNamespace


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the system picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loss_setup(*flags: str):
    """The ``LossSetup`` the recipe makes for these trainer flags: the techniques they switch on, each configured
    as ``setup_run`` configures it (only the loss's part of the run: no model, no data)."""
    import src.training.train_enhanced as te

    setup = te.LossSetup(techniques=te.techniques_on(te.parse_args(list(flags))))
    for t in setup.techniques:
        t.configure(SimpleNamespace(loss=setup))
    return setup
