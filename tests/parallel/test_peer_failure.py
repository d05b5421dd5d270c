"""`guard` ends a rank on a lost peer only: torch's DistError family and gloo's transport messages, never a
RuntimeError that merely mentions a timeout (that is a bug here and keeps its traceback)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from overdrive.core.runtime import Runtime
from overdrive.parallel import distributed
from overdrive.parallel.distributed import EXIT_PEER_LOST, guard, is_peer_failure

# Messages gloo raised in torch 2.13 when the peer was SIGKILLed or SIGSTOPped (tests/parallel/_peer_loss.py)
GLOO_KILLED = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:28551: "
    "Connection reset by peer. This is typically caused by a remote worker hanging or bugs in the application."
)
GLOO_CLOSED = "[/x/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:13480."
GLOO_HUNG = (
    "[/x/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv operation to complete"
)

LOST_PEER = [
    RuntimeError(GLOO_KILLED),
    RuntimeError(GLOO_CLOSED),
    RuntimeError(GLOO_HUNG),
    RuntimeError("Timed out waiting 60000ms for send operation to complete"),  # without the source path
    RuntimeError("Application timeout caused pair closure"),
    dist.DistNetworkError("The client socket has timed out after 1000ms while trying to connect"),
    dist.DistStoreError("wait timeout after 1000ms, keys: /nokey"),
    dist.DistBackendError("NCCL communicator was aborted on rank 1"),
]
NOT_A_PEER = [
    RuntimeError("operation timeout: the data loader worker took too long"),
    RuntimeError("timeout must be a positive number of seconds"),
    RuntimeError("CUDA error: the launch timed out and was terminated"),
    RuntimeError("torch.compile timed out while autotuning"),
    RuntimeError("Expected all tensors to be on the same device"),
    ValueError("Connection reset by peer"),  # not from torch.distributed
    TimeoutError("timed out"),
]


@pytest.mark.parametrize("exc", LOST_PEER, ids=lambda e: f"{type(e).__name__}:{str(e)[:40]}")
def test_lost_peer_is_recognised(exc: BaseException) -> None:
    assert is_peer_failure(exc)


@pytest.mark.parametrize("exc", NOT_A_PEER, ids=lambda e: f"{type(e).__name__}:{str(e)[:40]}")
def test_unrelated_errors_mentioning_timeouts_are_not(exc: BaseException) -> None:
    assert not is_peer_failure(exc)


class Exited(Exception):
    """Stands in for os._exit so that a wrong exit cannot end the test process."""


@pytest.fixture
def exits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    codes: list[int] = []

    def fake_exit(code: int) -> None:
        codes.append(code)
        raise Exited(code)

    monkeypatch.setattr(distributed.os, "_exit", fake_exit)
    return codes


TWO_RANKS = Runtime(rank=1, local_rank=1, world_size=2, device=torch.device("cpu"))


@pytest.mark.parametrize("exc", NOT_A_PEER, ids=lambda e: f"{type(e).__name__}:{str(e)[:40]}")
def test_guard_reraises_unrelated_errors(exc: BaseException, exits: list[int]) -> None:
    with pytest.raises(type(exc)) as info, guard(TWO_RANKS):
        raise exc
    assert info.value is exc and exits == []


def test_guard_ends_the_rank_on_a_lost_peer_with_one_line(exits: list[int], capsys) -> None:
    with pytest.raises(Exited), guard(TWO_RANKS):
        raise RuntimeError(GLOO_HUNG)
    assert exits == [EXIT_PEER_LOST]
    err = capsys.readouterr().err
    assert err.startswith("overdrive: rank 1/2: lost contact with another rank (") and err.count("\n") == 1
    assert "Timed out waiting 3000ms for recv" in err


def test_guard_on_one_process_reraises_even_a_distributed_error(exits: list[int]) -> None:
    with pytest.raises(dist.DistNetworkError), guard(Runtime()):
        raise dist.DistNetworkError("connection refused")
    assert exits == []
