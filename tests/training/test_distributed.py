"""Data-parallel training (torchrun + DDP, two gloo processes on the CPU) against one
process with the whole batch; gradient accumulation; resuming with another number of
processes; the user errors of a distributed launch."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from resflow.cli import main
from resflow.data import load_data
from resflow.training import Trainer
from resflow.training.distributed import Distributed, shard_range

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from distributed_scenarios import SCENARIOS, run_scenario  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed/gloo"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *args]  # fmt: skip
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every scenario trained once by two processes (one torchrun launch)."""
    out = tmp_path_factory.mktemp("ddp")
    proc = _torchrun([str(HERE / "distributed_worker.py"), str(out)], cwd=HERE)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _ranks(out: Path, name: str) -> tuple[dict, dict]:
    return tuple(torch.load(out / f"{name}-rank{r}.pt", weights_only=False) for r in (0, 1))  # type: ignore[return-value]


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=atol, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("name", ["exact", "accumulate", "batchnorm"])
def test_two_processes_with_half_the_batch_equal_one_with_all_of_it(two_ranks, tmp_path, name):
    r0, r1 = _ranks(two_ranks, name)
    one, result = run_scenario(name, tmp_path / name)
    single = {n: p.detach() for n, p in one.model.named_parameters()}
    _assert_same(r0["params"], r1["params"], atol=0)  # the ranks are identical ...
    _assert_same(r0["buffers"], r1["buffers"], atol=0)
    _assert_same(r0["params"], single, atol=1e-8)  # ... and equal one process (float64)
    _assert_same(r0["buffers"], dict(one.model.named_buffers()), atol=1e-8)  # BN averages
    _assert_same(r0["ema"], one.ema.shadow, atol=1e-8)
    losses = [h["loss"] for h in result.history]
    assert [h["loss"] for h in r0["history"]] == pytest.approx(losses, abs=1e-9)
    assert result.final is not None
    assert r0["final"] == pytest.approx(result.final.mean, abs=1e-9)  # sharded evaluation
    assert r0["final"] == r1["final"]


@pytest.mark.parametrize("name", ["stochastic", "image"])
def test_stochastic_estimator_keeps_the_ranks_synchronized(two_ranks, name):
    r0, r1 = _ranks(two_ranks, name)
    for part in ("params", "buffers", "ema"):
        for n, t in r0[part].items():
            assert torch.isfinite(t.float()).all(), n
        _assert_same(r0[part], r1[part], atol=0)  # power-iteration vectors included
    assert any(n.endswith(".v") for n in r0["buffers"])
    assert r0["final"] is not None and r0["final"] == r1["final"]
    assert not torch.equal(r0["draw"], r1["draw"])  # independent estimator draws per rank


def test_the_data_are_loaded_once_per_machine_and_shared(two_ranks):
    ref = load_data("8gaussians", n_train=256, n_test=64)
    for r in (0, 1):
        got = torch.load(two_ranks / f"shared-rank{r}.pt")
        assert torch.equal(got["train"], ref.train) and torch.equal(got["test"], ref.test)
        assert got["name"] == ref.name
    assert not list(Path("/dev/shm").glob("resflow-*"))  # unlinked once mapped


def test_only_rank_zero_writes_the_run(two_ranks):
    run = two_ranks / "exact"
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "last.pt", "best.pt", "metrics.jsonl"}
    assert not (run / "tb").exists()


def test_a_two_process_checkpoint_resumes_in_one_process(two_ranks, tmp_path):
    cut = tmp_path / "cut"
    shutil.copytree(two_ranks / "exact", cut)  # last.pt of the 2-process run at step 4
    resumed, result = run_scenario("exact", cut, cfg_kw={"steps": 6}, resume=True)
    assert result.step == 6
    full, _ = run_scenario("exact", tmp_path / "full", cfg_kw={"steps": 6})
    _assert_same(
        {n: p.detach() for n, p in resumed.model.named_parameters()},
        {n: p.detach() for n, p in full.model.named_parameters()},
        atol=1e-8,
    )
    _assert_same(resumed.ema.shadow, full.ema.shadow, atol=1e-8)


def test_gradient_accumulation_equals_the_whole_batch_in_one_process(tmp_path):
    whole, _ = run_scenario("exact", tmp_path / "whole")
    parts, _ = run_scenario("exact", tmp_path / "parts", cfg_kw={"update_freq": 4})
    _assert_same(
        {n: p.detach() for n, p in parts.model.named_parameters()},
        {n: p.detach() for n, p in whole.model.named_parameters()},
        atol=1e-8,
    )


def test_a_batch_that_does_not_split_over_the_processes_is_refused(tmp_path):
    model_cfg, data, cfg = SCENARIOS["exact"]()
    with pytest.raises(ValueError, match=r"--batch-size 64 does not split .* 3 processes"):
        Trainer(model_cfg, data, cfg, tmp_path, distributed=Distributed(0, 3, 0))
    assert not (tmp_path / "config.yaml").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--update-freq", "0"], "--update-freq: must be >= 1, got 0"),
        (["--update-freq", "3"], "--batch-size 64 does not split into --update-freq 3"),
    ],
)
def test_bad_accumulation_flags_give_one_line(tmp_path, capsys, flags, message):
    argv = "train --data 8gaussians --preset toy2d --steps 1 --batch-size 64 --no-progress"
    argv = [*argv.split(), "--out", str(tmp_path / "run"), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err


def test_shards_cover_the_examples_once():
    ranges = [shard_range(10, Distributed(r, 3, r)) for r in range(3)]
    assert ranges == [(0, 4), (4, 7), (7, 10)]
    ctx = [Distributed(r, 2, r) for r in range(2)]
    idx = torch.arange(16)
    micro = [c.shard(idx, j, 2) for j in range(2) for c in ctx]
    assert torch.equal(torch.cat(micro), idx)  # micro-batch by micro-batch, in rank order


def test_resflow_train_runs_unchanged_under_torchrun(tmp_path):
    out = tmp_path / "run"
    flags = ("-m resflow.cli train --data 8gaussians --n-train 256 --n-test 64 --preset toy2d "
             "--set n_blocks=2 --set hidden=[16,16] --steps 2 --batch-size 32 --eval-every 2 "
             "--no-progress --no-tensorboard --out").split()  # fmt: skip
    proc = _torchrun([*flags, str(out)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert sum(ln.startswith("test ") for ln in lines) == 1, proc.stdout  # rank 0 speaks
    assert sum(ln.startswith("step 2: test") for ln in lines) == 1, proc.stdout
    assert "2 processes" in proc.stdout
    assert (out / "last.pt").exists() and (out / "density.png").exists()


def _two_ranks_one_killed(
    tmp_path: Path, out: Path, steps: int, checkpoint_every: int, killed: int
) -> list[subprocess.Popen]:  # type: ignore[type-arg]
    """Two processes of a small ``resflow train`` started with torchrun's environment
    (no agent, which would terminate the survivor at a moment of its own choosing);
    rank ``killed`` is killed (SIGKILL) at its second step."""
    port = _free_port()
    flags = ("train --data 8gaussians --n-train 128 --n-test 32 --preset toy2d --set n_blocks=1 "
             f"--set hidden=[8] --steps {steps} --batch-size 32 --eval-every {steps} "
             f"--checkpoint-every {checkpoint_every} --no-progress --no-tensorboard "
             "--out").split()  # fmt: skip
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "KILL_RANK": str(killed)}  # fmt: skip
        cmd = [sys.executable, str(HERE / "peer_killed_worker.py"), *flags, str(out)]
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    return procs


@pytest.mark.parametrize("killed", [1, 0])
def test_a_killed_peer_ends_the_other_rank_with_one_line(tmp_path, killed):
    """One rank is killed (SIGKILL) at its second step; the other's collective fails and
    it ends with one line and exit code 2, not gloo's traceback; the last checkpoint stays
    whole. Rank 0 killed is the harder case: it hosts the rendezvous store and writes the
    checkpoints."""
    out = tmp_path / "run"
    procs = _two_ranks_one_killed(tmp_path, out, steps=20, checkpoint_every=1, killed=killed)
    errs = [p.communicate(timeout=120)[1] for p in procs]
    survivor = 1 - killed
    err = errs[survivor]
    assert procs[killed].returncode == -9  # killed
    assert procs[survivor].returncode == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "another process of this run stopped" in err and "--resume" in err, err
    state = torch.load(out / "last.pt", weights_only=True)  # whole, from before the kill
    assert state["step"] == 1
    assert not list(out.glob("*.tmp"))


def test_a_two_process_run_killed_before_its_first_checkpoint_restarts_in_place(tmp_path):
    """Rank 1 is killed before any checkpoint was written: the survivor's one line says
    to resume, and ``--resume`` (here in one process) starts the run again from step 0
    with its recorded settings instead of saying there is nothing to resume."""
    out = tmp_path / "run"
    procs = _two_ranks_one_killed(tmp_path, out, steps=4, checkpoint_every=100, killed=1)
    err0 = procs[0].communicate(timeout=120)[1]
    procs[1].communicate(timeout=120)
    assert procs[0].returncode == 2 and "--resume" in err0, err0
    assert (out / "config.yaml").exists() and not (out / "last.pt").exists()
    proc = subprocess.run([sys.executable, "-m", "resflow.cli", "train", "--resume", "--out",
                           str(out), "--no-progress", "--no-tensorboard"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "stopped before its first checkpoint; starting it again from step 0" in proc.stdout
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 4


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (
            RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:1. GLHF!"),
            "another process of this run stopped",
        ),  # fmt: skip
        (
            dist.DistBackendError("NCCL error: remote process exited or there was a network error"),
            "another process of this run stopped",
        ),  # fmt: skip
        (
            dist.DistNetworkError("The server socket has failed to listen (EADDRINUSE)\nmore"),
            "could not connect (The server socket has failed to listen (EADDRINUSE))",
        ),  # fmt: skip
        (
            dist.DistStoreError("Timed out after 900 seconds waiting for clients. 1/2 joined."),
            "could not connect (Timed out after 900 seconds",
        ),  # fmt: skip
    ],
)
def test_failures_of_a_launch_become_one_line(monkeypatch, error, message):
    from resflow.training.distributed import peer_failure

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert message in str(peer_failure(error))
    assert peer_failure(RuntimeError("an unrelated bug")) is None  # keeps its traceback
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert peer_failure(error) is None  # one process: not a launch's failure
