"""``persia serve``'s refusals: one message on stderr and exit status 2, before listening."""

from __future__ import annotations

import threading

import pytest

from persia.cli.main import EXIT_BAD_INPUT, main


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["/no/such/dir"], "no such directory"),
        (["{export}", "--follow", "/tmp"], "does not follow deltas"),
        (["{export}", "--replicas", "2"], "need --backend ray"),
        (["{export}", "--backend", "ray", "--grpc-port", "7071"], "serves HTTP only"),
        (["{export}", "--max-batch", "0"], "max_batch must be an int >= 1"),
        (["{export}", "--poll-interval", "0"], "--poll-interval must be > 0"),
        (["{tmp}"], "jit_dense.pt"),  # neither an export nor a checkpoint with its model
        (["{export}", "--token-file", "{tmp}/none"], "--token-file: cannot read"),
        (["{export}", "--ssl-certfile", "{export}/CURRENT"], "give both or neither"),
        (["{export}", "--backend", "ray", "--ssl-certfile", "c", "--ssl-keyfile", "k"], "TLS"),
    ],
)
def test_refusals_exit_2_with_a_message(args, message, export, tmp_path, capsys):
    argv = ["serve", *(a.format(export=export.dir, tmp=tmp_path) for a in args)]
    assert main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("persia serve: error:") and message in err, err


def test_a_port_in_use_is_refused(export, capsys):
    from persia.server.run import bind

    sock = bind("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        assert main(["serve", str(export.dir), "--port", str(port), "--no-grpc"]) == 2
    finally:
        sock.close()
    assert "cannot listen" in capsys.readouterr().err
    # nothing the server would have started is left running
    assert not [t.name for t in threading.enumerate() if t.name.startswith("persia-rows")]
