"""torchrun, DDP and BatchNorm statistics across ranks: the maths in one process, then real
2-process gloo runs on the loopback interface, then the faults."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

from bnexport.distributed.bn_statistics import Moments, merge_running_stats, pool
from bnexport.distributed.process_group import Launch, shard_order, state_fingerprint
from bnexport.errors import BnexportError
from bnexport.train.loop import load_checkpoint, model_from_checkpoint
from conftest import REPO, CommandResult, assert_one_line_error, read_json, run_bnexport, run_cli

# constant rate: a run cut short at epoch 1 then follows the same schedule as one planned for 2
TINY = ["--dataset", "synthetic", "--synthetic-shape", "1,10,10", "--batch-size", "32", "--schedule", "constant", "--quiet",
        "--device", "cpu"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


def torchrun(*args: str | os.PathLike, nproc: int = 2, timeout: float = 240) -> CommandResult:
    """``torchrun --nproc_per_node=N ARGS`` on 127.0.0.1 with a free port, as a user would start it."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", *map(str, args)]
    done = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    return CommandResult(done.returncode, done.stdout, done.stderr)


def start_rank(rank: int, world_size: int, port: int, args: list, *, module: bool = True) -> subprocess.Popen:
    """One rank started by hand with torchrun's variables, so that a test can make it misbehave."""
    env = child_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    command = [sys.executable, *(["-m", "bnexport"] if module else []), *map(str, args)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


# Shards and the merge, in one process -----------------------------------------------------

@pytest.mark.parametrize("num_samples, world_size", [(10, 2), (11, 2), (10, 3), (5, 4), (2, 3)])
def test_shards_are_distributed_samplers(num_samples, world_size):
    for epoch in (0, 3):
        order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(7 + epoch))
        shards = [shard_order(order, rank=r, world_size=world_size) for r in range(world_size)]
        for rank, shard in enumerate(shards):
            sampler = DistributedSampler(range(num_samples), num_replicas=world_size, rank=rank, shuffle=True, seed=7)
            sampler.set_epoch(epoch)
            assert shard.tolist() == list(sampler)
        assert len({len(s) for s in shards}) == 1  # equal steps on every rank: DDP never waits on a finished rank
        assert set(torch.cat(shards).tolist()) == set(range(num_samples))


def test_one_rank_shard_is_the_whole_order():
    order = torch.randperm(9)
    assert shard_order(order, rank=0, world_size=1) is order


def test_merge_equals_pooled_data_statistics():
    generator = torch.Generator().manual_seed(0)
    # three groups of different sizes, means and spreads: the law of total variance has real work
    groups = [torch.randn((n, 3), generator=generator, dtype=torch.float64) * scale + shift
              for n, scale, shift in [(5, 1.0, 0.0), (40, 3.0, 2.0), (17, 0.5, -4.0)]]
    counts = torch.tensor([len(g) for g in groups], dtype=torch.float64)
    means = torch.stack([g.mean(0) for g in groups])
    variances = torch.stack([g.var(0, unbiased=True) for g in groups])
    mean, var = merge_running_stats(counts, means, variances)
    everything = torch.cat(groups)
    torch.testing.assert_close(mean, everything.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, everything.var(0, unbiased=True), rtol=1e-12, atol=1e-12)
    # the naive merge, the mean of the variances, misses the spread between group means
    assert (variances.mean(0) - var).abs().min() > 0.5


def test_sequential_accumulation_equals_one_pass():
    data = torch.randn(50, 4, 3, 3, dtype=torch.float64) * 2 + 1
    running = Moments.empty(4)
    for start in range(0, 50, 7):  # uneven last batch
        running = running.combine(Moments.of(data[start:start + 7]))
    whole = Moments.of(data)
    torch.testing.assert_close(running.mean, whole.mean)
    torch.testing.assert_close(running.unbiased_var(), whole.unbiased_var())
    assert float(running.count) == 50 * 9


def test_pool_of_one_group_is_itself():
    moments = Moments.of(torch.randn(8, 2, 4, dtype=torch.float64))
    stacked = Moments(moments.count[None], moments.mean[None], moments.m2[None])
    pooled = pool(stacked)
    torch.testing.assert_close(pooled.mean, moments.mean)
    torch.testing.assert_close(pooled.m2, moments.m2)


@pytest.mark.parametrize("env, fragment", [
    ({"RANK": "0"}, "WORLD_SIZE"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "inconsistent world size"),
    ({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "integers"),
])
def test_bad_launch_variables(env, fragment):
    with pytest.raises(BnexportError, match=fragment):
        Launch.from_env(env)
    assert Launch.from_env({}) is None
    assert Launch.from_env({"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}) is None  # a cluster's defaults alone


# Real process groups: gloo on 127.0.0.1 -----------------------------------------------------

@pytest.mark.distributed
def test_all_reduce_merge_and_recalibration_on_two_ranks(tmp_path):
    result = torchrun(REPO / "tests" / "distributed_worker.py", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    # every rank holds bit-identical buffers after the merge, and after recalibration
    for key in ranks[0]["merged"]:
        assert torch.equal(ranks[0]["merged"][key], ranks[1]["merged"][key]), key
        assert torch.equal(ranks[0]["recalibrated"][key], ranks[1]["recalibrated"][key]), key
    # the merge is the statistics of the pooled global batch, as SyncBatchNorm would compute them
    pooled = torch.cat([r["activations"] for r in ranks]).double()
    torch.testing.assert_close(ranks[0]["merged"]["running_mean"].double(), pooled.mean((0, 2, 3)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ranks[0]["merged"]["running_var"].double(), pooled.var((0, 2, 3), unbiased=True),
                               rtol=1e-6, atol=1e-6)
    spread = ranks[0]["spread"]["bn1"]
    assert spread["mean_range"] > 0.1 and spread["var_range_relative"] > 0.1  # the ranks' data differed on purpose
    # recalibration over the two halves equals the exact statistics of the whole set, computed here independently
    from bnexport.model import build_model
    from distributed_worker import SPEC

    model = build_model(SPEC, seed=0)
    with torch.no_grad():
        whole = model.conv1(ranks[0]["dataset"]).double()
    torch.testing.assert_close(ranks[0]["recalibrated"]["running_mean"].double(), whole.mean((0, 2, 3)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ranks[0]["recalibrated"]["running_var"].double(), whole.var((0, 2, 3), unbiased=True),
                               rtol=1e-6, atol=1e-6)
    assert ranks[0]["report"]["samples"] == 23 and ranks[0]["report"]["batches"] == 3 + 3  # 12 + 11 samples, batch 4


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> tuple[Path, CommandResult]:
    out = tmp_path_factory.mktemp("two_ranks")
    result = torchrun("-m", "bnexport", "train-and-export", *TINY, "--epochs", "2", "--max-steps", "4", "--out", out)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return out, result


@pytest.mark.distributed
def test_two_ranks_train_and_export(two_rank_run):
    out, result = two_rank_run
    summary = read_json(out / "summary.json")
    replicas = summary["replicas"]
    assert replicas["world_size"] == 2 and replicas["backend"] == "gloo" and replicas["device"] == "cpu"
    assert replicas["bn_statistics"] == "merged" and not replicas["sync_bn"]
    assert [e["epoch"] for e in replicas["epochs"]] == [1, 2]
    for epoch in replicas["epochs"]:
        spread = epoch["spread_before_merge"]["bn1"]
        # different shards give different statistics; one epoch from a common start keeps them close
        assert 0 < spread["mean_range_in_std"] < 1 and 0 < spread["var_range_relative"] < 1
    assert summary["parity"] == "pass" and read_json(out / "parity.json")["passed"]
    # only rank 0 reports: one summary table on stdout
    assert result.stdout.count("artifacts in") == 1 and "BatchNorm statistics  2 ranks (gloo, cpu)" in result.stdout
    history = read_json(out / "history.json")
    assert history["epoch_end_step"] == [4, 8] and len(history["step_loss"]) == 8


@pytest.mark.distributed
def test_every_rank_ends_with_the_checkpoints_buffers(two_rank_run):
    out, _ = two_rank_run
    fingerprints = read_json(out / "summary.json")["replicas"]["bn_fingerprints"]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]
    # each rank hashed its own weights and BN buffers; the checkpoint rank 0 wrote hashes the same
    model, _ = model_from_checkpoint(load_checkpoint(out / "checkpoint.pt"))
    assert state_fingerprint(model) == fingerprints[0]


@pytest.mark.distributed
def test_two_rank_checkpoint_resumes_on_one_process(two_rank_run, tmp_path):
    out, _ = two_rank_run
    resumed = run_bnexport("train", *TINY, "--epochs", "3", "--max-steps", "4", "--resume", out / "checkpoint.pt",
                           "--out", tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    history = read_json(tmp_path / "history.json")
    assert history["epoch_end_step"] == [4, 8, 12]
    before = load_checkpoint(out / "checkpoint.pt")["state_dict"]
    after = load_checkpoint(tmp_path / "checkpoint.pt")["state_dict"]
    assert not torch.equal(before["conv1.weight"], after["conv1.weight"])  # it trained on
    assert "replicas" not in read_json(tmp_path / "summary.json")  # a plain one-process run again


@pytest.mark.distributed
def test_two_rank_resume_continues_step_for_step(two_rank_run, tmp_path):
    """Pooling at every epoch's end leaves all ranks equal at the boundary, so a checkpoint
    resumed on the same number of ranks continues exactly as the uninterrupted run."""
    out, _ = two_rank_run
    first = torchrun("-m", "bnexport", "train", *TINY, "--epochs", "1", "--max-steps", "4", "--out", tmp_path / "a")
    assert first.returncode == 0, first.stderr[-3000:]
    second = torchrun("-m", "bnexport", "train", *TINY, "--epochs", "2", "--max-steps", "4",
                      "--resume", tmp_path / "a" / "checkpoint.pt", "--out", tmp_path / "b")
    assert second.returncode == 0, second.stderr[-3000:]
    straight = load_checkpoint(out / "checkpoint.pt")
    resumed = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    assert straight["history"]["step_loss"] == resumed["history"]["step_loss"]


@pytest.mark.distributed
def test_two_ranks_recalibrate_bn_gives_exact_statistics(tmp_path):
    result = torchrun("-m", "bnexport", "train", *TINY, "--epochs", "1", "--max-steps", "3", "--recalibrate-bn",
                      "--out", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    record = read_json(tmp_path / "summary.json")["replicas"]
    assert record["bn_statistics"] == "recalibrated"
    payload = load_checkpoint(tmp_path / "checkpoint.pt")
    model, _ = model_from_checkpoint(payload)
    from bnexport.data import make_synthetic

    data = make_synthetic((1, 10, 10), size=2048, seed=0)
    assert record["recalibration"]["samples"] == len(data.train_images)
    with torch.no_grad():
        activations = model.conv1(data.train_images).double()
    torch.testing.assert_close(model.bn1.running_mean.double(), activations.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bn1.running_var.double(), activations.var((0, 2, 3), unbiased=True), rtol=1e-5, atol=1e-6)


# Faults ---------------------------------------------------------------------------------------

def finish(process: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    """Exit status, stdout and stderr; the timeout only keeps a hung rank from hanging the suite."""
    stdout, stderr = process.communicate(timeout=timeout)
    return process.returncode, stdout, stderr


@pytest.mark.distributed
def test_inconsistent_world_size_stops_every_rank(tmp_path):
    port = free_port()
    args = ["train", *TINY, "--epochs", "1", "--max-steps", "2", "--out", tmp_path, "--dist-timeout", "60"]
    ranks = [start_rank(0, 2, port, args), start_rank(1, 3, port, args)]
    for process in ranks:
        code, _, stderr = finish(process, timeout=90)
        assert code == 2, stderr
        assert "inconsistent world size" in stderr and "WORLD_SIZE=3" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "checkpoint.pt").exists()


@pytest.mark.distributed
def test_ranks_started_with_different_arguments_stop_together(tmp_path):
    port = free_port()
    args = ["train", *TINY, "--epochs", "1", "--max-steps", "2", "--out", tmp_path, "--dist-timeout", "60"]
    ranks = [start_rank(0, 2, port, args), start_rank(1, 2, port, [*args, "--lr", "0.5"])]
    (code0, _, stderr0), (code1, _, stderr1) = (finish(process, timeout=90) for process in ranks)
    assert code0 == code1 == 2, (stderr0, stderr1)
    assert_one_line_error(CommandResult(code0, "", stderr0), "inconsistent arguments across ranks", "rank 1 has lr=0.5")
    assert stderr1.strip() == ""  # rank 0 reports for both
    assert not (tmp_path / "checkpoint.pt").exists()


@pytest.mark.distributed
@pytest.mark.parametrize("peer", ["dies", "hangs"])
def test_a_lost_peer_stops_the_others_with_one_line(tmp_path, peer):
    port = free_port()
    timeout = 6
    # rank 1 joins the group for real, then dies (no goodbye) or stops answering
    peer_code = ("import os, time; from bnexport.distributed.process_group import process_group\n"
                 f"with process_group(device='cpu', timeout_s={timeout}):\n"
                 + ("    os._exit(17)\n" if peer == "dies" else "    time.sleep(120)\n"))
    survivor = start_rank(0, 2, port, ["train", *TINY, "--epochs", "1", "--out", tmp_path, "--dist-timeout", timeout])
    other = start_rank(1, 2, port, ["-c", peer_code], module=False)
    try:
        code, _, stderr = finish(survivor, timeout=120)
    finally:
        other.kill()
        other.communicate()
    assert code == 3, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "lost contact with the other ranks" in lines[0], stderr
    # the survivor names itself and the --dist-timeout it was given, so the user knows what to raise
    assert lines[0].startswith("bnexport train: error: rank 0: ") and f"--dist-timeout {timeout}s" in lines[0], lines[0]
    assert not (tmp_path / "checkpoint.pt").exists()


def test_sync_bn_on_cpu_explains_the_merge(tmp_path):
    out = tmp_path / "out"
    result = run_cli("train", *TINY, "--sync-bn", "--out", out)
    assert_one_line_error(result, "--sync-bn needs CUDA", "law of total variance", "--recalibrate-bn")
    assert not out.exists()


@pytest.mark.distributed
def test_sync_bn_on_cpu_under_torchrun(tmp_path):
    result = torchrun("-m", "bnexport", "train", *TINY, "--sync-bn", "--out", tmp_path / "out", timeout=120)
    assert result.returncode != 0
    assert "--sync-bn needs CUDA" in result.stderr and "all-reduce" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda(tmp_path):
    result = run_cli("train", "--device", "cuda", "--out", tmp_path / "out")
    assert_one_line_error(result, "--device cuda", "no CUDA device")
    assert not (tmp_path / "out").exists()


def test_half_a_torchrun_environment_is_refused(tmp_path, monkeypatch):
    for name in ("WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    assert_one_line_error(run_cli("train", *TINY, "--out", tmp_path / "out"), "WORLD_SIZE", "torchrun")
    assert not (tmp_path / "out").exists()


def test_sync_batchnorm_round_trip_keeps_parameters_and_buffers():
    """The module surgery behind --sync-bn, checked on the CPU (training with it needs CUDA)."""
    from bnexport.distributed.process_group import from_sync_batchnorm, to_sync_batchnorm
    from bnexport.model import ModelSpec, build_model

    model = build_model(ModelSpec(), seed=0)
    with torch.no_grad():
        model.bn1.running_mean.uniform_()
    weight, running_mean = model.bn1.weight, model.bn1.running_mean
    before = {k: v.clone() for k, v in model.state_dict().items()}
    originals = to_sync_batchnorm(model)
    assert originals == {"bn1": torch.nn.BatchNorm2d} and isinstance(model.bn1, torch.nn.SyncBatchNorm)
    assert model.bn1.weight is weight  # the optimizer's parameter objects stay valid
    from_sync_batchnorm(model, originals)
    assert type(model.bn1) is torch.nn.BatchNorm2d
    assert model.bn1.weight is weight and model.bn1.running_mean is running_mean
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_onnxruntime_cuda_runner_only_where_a_cuda_provider_works(tmp_path):
    import onnxruntime

    from bnexport.parity.runners import onnxruntime_cuda_runner

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime has a CUDA provider here; tools/gpu_check.sh checks the CUDA rows")
    # without it, the check adds no CUDA rows rather than failing or falling back silently
    assert onnxruntime_cuda_runner(tmp_path / "model.onnx") is None
