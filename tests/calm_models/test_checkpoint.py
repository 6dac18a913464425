"""Tests of calm_models.checkpoint (and the process-group helpers of calm_models.distributed).

Round trips restore weights, optimizer, scheduler and RNG exactly; tied weights survive;
wrapper prefixes never reach the file; corrupt files, config and shape mismatches give one-line
errors; pruning happens after the new checkpoint is complete; and a process killed (SIGKILL)
at various moments of a save never damages the last good checkpoint.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from calm_models import checkpoint as ck
from calm_models.checkpoint import (
    CheckpointError,
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_meta,
    restore_rng_state,
    save_checkpoint,
)
from calm_models.checkpoint import load_weights as load_model_weights
from calm_models.distributed import (
    DistInfo,
    all_reduce_mean,
    autocast_context,
    barrier,
    init_distributed,
    resolve_device,
    wrap_model,
)
from calm_models.optim import OptimConfig, ScheduleConfig, build_optimizer, build_scheduler

REPO_ROOT = Path(__file__).resolve().parents[2]


class TiedLM(nn.Module):
    """Tiny model with a tied embedding / output projection and a persistent buffer."""

    def __init__(self, vocab: int = 50, hidden: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.layer = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.ones(1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.dropout(self.layer(self.embed(tokens)), p=0.1, training=self.training)
        return self.head(self.norm(h)) * self.scale


def _train(model, optimizer, scheduler, steps: int) -> list[float]:
    """Steps whose data and dropout come from the global RNGs (so RNG state matters)."""
    losses = []
    for _ in range(steps):
        tokens = torch.randint(0, 50, (4, 8))
        noise = random.random() + float(np.random.rand())
        loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()) + noise
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        losses.append(loss.item())
    return losses


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = TiedLM()
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2))
    scheduler = build_scheduler(optimizer, ScheduleConfig(kind="cosine", warmup_steps=2), total_steps=20)
    return model, optimizer, scheduler


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ---------------------------------------------------------------------------------------------
# round trip
# ---------------------------------------------------------------------------------------------


def test_round_trip_resumes_training_exactly(tmp_path):
    random.seed(1)
    np.random.seed(1)
    model, optimizer, scheduler = _setup()
    _train(model, optimizer, scheduler, 3)
    state = {
        "step": 3,
        "tokens": 96,
        "loader": {"epoch": 1, "offset": 7, "order": torch.arange(5)},
        "rng": capture_rng_state(),
    }
    path = save_checkpoint(
        tmp_path,
        step=3,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        train_state=state,
        config={"model": {"hidden": 16}},
    )
    reference_losses = _train(model, optimizer, scheduler, 3)  # the uninterrupted run

    random.seed(99)  # scramble every generator: the checkpoint must restore them
    np.random.seed(99)
    model2, optimizer2, scheduler2 = _setup(seed=5)
    loaded = load_checkpoint(
        path, model=model2, optimizer=optimizer2, scheduler=scheduler2, config={"model": {"hidden": 16}}
    )
    restore_rng_state(loaded["rng"])  # the training loop restores the generators it saved
    assert loaded["step"] == 3 and loaded["tokens"] == 96 and loaded["loader"]["epoch"] == 1
    assert torch.equal(loaded["loader"]["order"], torch.arange(5))
    assert scheduler2.last_epoch == 3
    assert model2.head.weight is model2.embed.weight  # still tied after loading
    resumed_losses = _train(model2, optimizer2, scheduler2, 3)
    assert resumed_losses == reference_losses  # bit-exact: weights, Adam moments, lr, RNG
    _assert_same_weights(model, model2)


def test_files_layout_and_tied_weights_stored_once(tmp_path):
    model, optimizer, scheduler = _setup()
    path = save_checkpoint(tmp_path, step=12, model=model, optimizer=optimizer, config={"a": 1})
    assert path == tmp_path / "checkpoints" / "step_000012"
    assert sorted(p.name for p in path.iterdir()) == ["config.yaml", "meta.json", "model.safetensors", "train_state.pt"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000012"
    meta = json.loads((path / "meta.json").read_text())
    assert meta["step"] == 12 and meta["model_class"] == "TiedLM" and meta["format_version"] == 2
    for name, info in meta["files"].items():
        assert info["size"] == (path / name).stat().st_size and len(info["sha256"]) == 64
    with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
        assert json.loads(fh.metadata()["aliases"]) == {"head.weight": "embed.weight"}
    assert keys == {"embed.weight", "layer.weight", "layer.bias", "norm.weight", "norm.bias", "scale"}
    # A model without tying receives the shared tensor under both names.
    untied = TiedLM()
    untied.head.weight = nn.Parameter(torch.zeros_like(untied.embed.weight))
    load_model_weights(path, untied)
    assert torch.equal(untied.head.weight, model.embed.weight)
    assert torch.equal(untied.embed.weight, model.embed.weight)
    assert read_meta(latest_checkpoint(tmp_path))["step"] == 12


def test_rng_capture_and_restore_covers_python_numpy_torch(tmp_path):
    state = capture_rng_state()
    first = (random.random(), float(np.random.rand()), torch.rand(3), torch.randn(2))
    torch.save(state, tmp_path / "rng.pt")
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    second = (random.random(), float(np.random.rand()), torch.rand(3), torch.randn(2))
    assert first[:2] == second[:2]
    assert torch.equal(first[2], second[2]) and torch.equal(first[3], second[3])
    with pytest.raises(CheckpointError, match="malformed RNG state"):
        restore_rng_state({"python": (3, (1, 2))})


def test_train_state_must_be_plain(tmp_path):
    model = nn.Linear(2, 2)
    path = save_checkpoint(tmp_path, step=0, model=model, train_state={"n": np.int64(4), "x": np.float32(0.5)})
    loaded = load_checkpoint(path, model=model)
    assert loaded == {"n": 4, "x": 0.5} and type(loaded["n"]) is int
    with pytest.raises(TypeError, match=r"train_state\['bad'\]\[0\] is a numpy.ndarray"):
        save_checkpoint(tmp_path, step=1, model=model, train_state={"bad": [np.zeros(3)]})
    assert latest_checkpoint(tmp_path) == path  # the failed save left nothing behind


# ---------------------------------------------------------------------------------------------
# wrappers
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def gloo_group(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _saved_keys(path: Path) -> set[str]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
        return set(fh.keys())


def test_compile_prefixes_are_stripped(tmp_path):
    torch.manual_seed(0)
    model = TiedLM()
    compiled = torch.compile(model)  # compiles lazily: never called here
    path = save_checkpoint(tmp_path / "a", step=1, model=compiled)
    assert not any("_orig_mod" in k for k in _saved_keys(path))
    plain = TiedLM()
    load_model_weights(path, plain)
    _assert_same_weights(model, plain)
    # a compiled sub-module, saved and loaded into a compiled model
    model.layer = torch.compile(model.layer)
    assert "layer._orig_mod.weight" in model.state_dict()
    path = save_checkpoint(tmp_path / "b", step=1, model=model)
    assert "layer.weight" in _saved_keys(path)
    target = torch.compile(TiedLM())
    load_model_weights(path, target)
    _assert_same_weights(plain, target._orig_mod)
    assert read_meta(path)["model_class"] == "TiedLM"


def test_ddp_prefixes_are_stripped_and_process_group_helpers(tmp_path, gloo_group):
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.device) == (0, 1, torch.device("cpu"))
    assert info.is_main
    barrier()
    x = torch.tensor([1, 3])
    assert torch.equal(all_reduce_mean(x), x) and all_reduce_mean(x) is not x
    torch.manual_seed(0)
    model = TiedLM()
    ddp = nn.parallel.DistributedDataParallel(model)
    path = save_checkpoint(
        tmp_path, step=2, model=torch.compile(ddp), optimizer=torch.optim.SGD(ddp.parameters(), lr=0.1)
    )
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in _saved_keys(path))
    target = nn.parallel.DistributedDataParallel(TiedLM())
    load_checkpoint(path, model=target, optimizer=torch.optim.SGD(target.parameters(), lr=0.1))
    _assert_same_weights(model, target.module)
    # a file written by someone else with a DDP prefix still loads
    from safetensors.torch import save_file

    save_file(
        {f"module.{k}": v.contiguous() for k, v in nn.Linear(2, 3).state_dict().items()},
        str(tmp_path / "w.safetensors"),
    )
    load_model_weights(tmp_path / "w.safetensors", nn.Linear(2, 3))


class _Objective(nn.Module):
    """A loss wrapper: FSDP is applied to it, the checkpoint is taken of the inner model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).sum()


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))


def test_fsdp2_full_state_dict_round_trip(tmp_path, gloo_group):
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("FSDP2 (fully_shard) needs torch >= 2.6")
    info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    torch.manual_seed(0)
    model = _mlp()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    fsdp.fully_shard(model[0])
    fsdp.fully_shard(model)
    assert type(model).__name__.startswith("FSDP")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 6)).sum().backward()
    optimizer.step()
    path = save_checkpoint(tmp_path / "a", step=1, model=model, optimizer=optimizer)
    assert read_meta(path)["model_class"] == "Sequential"
    assert _saved_keys(path) == set(reference)
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    trained = {k: v.clone() for k, v in get_model_state_dict(model).items()}
    trained = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in trained.items()}
    assert not torch.equal(trained["0.weight"], reference["0.weight"])
    plain = _mlp()
    load_model_weights(path, plain)
    for key, value in plain.state_dict().items():
        assert torch.equal(value, trained[key])
        assert not torch.equal(value, reference[key])  # it did train
    # into a fresh FSDP model + optimizer (optimizer state keyed by parameter names)
    torch.manual_seed(1)
    other = wrap_model(_mlp(), info, "none")
    fsdp.fully_shard(other[0])
    fsdp.fully_shard(other)
    other_opt = torch.optim.AdamW(other.parameters(), lr=1e-2)
    load_checkpoint(path, model=other, optimizer=other_opt)
    for key, value in get_model_state_dict(other).items():
        assert torch.equal(value.full_tensor(), trained[key])
    # the saved optimizer state also resumes a plain (unsharded) model
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    load_checkpoint(path, model=plain, optimizer=plain_opt)
    assert int(plain_opt.state_dict()["state"][0]["step"]) == 1
    # FSDP applied to a parent wrapper: the inner model holds DTensor shards
    inner = _mlp()
    fsdp.fully_shard(_Objective(inner))
    path = save_checkpoint(tmp_path / "b", step=1, model=inner)
    load_model_weights(path, plain)
    for key, value in plain.state_dict().items():
        assert torch.equal(value, inner.state_dict()[key].full_tensor())
    load_model_weights(tmp_path / "a", inner)
    for key, value in inner.state_dict().items():
        assert torch.equal(value.full_tensor(), trained[key])


def test_distributed_helpers_single_process():
    assert autocast_context("cpu").__class__.__name__ == "nullcontext"
    assert autocast_context("cpu", "fp32").__class__.__name__ == "nullcontext"
    with autocast_context("cpu", "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp32"):
        autocast_context("cpu", "fp16")
    with pytest.raises(ValueError, match="device must be one of auto, cpu, cuda, mps"):
        init_distributed("tpu")
    info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="strategy must be one of ddp, fsdp, none"):
        wrap_model(nn.Linear(1, 1), info, "zero3")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            init_distributed("cuda")
        with pytest.raises(ValueError, match="device 'cuda:1' was requested but CUDA is not available"):
            resolve_device("cuda:1")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu") and resolve_device("cpu:0").type == "cpu"
    for bad in ("cuda:x", "gpu:0", "cpu:-1"):
        with pytest.raises(ValueError, match="device must be one of auto, cpu, cuda, mps"):
            resolve_device(bad)


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    message = str(exc)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_truncated_model_file_gives_one_line_error_naming_it(tmp_path):
    model = TiedLM()
    path = save_checkpoint(tmp_path, step=1, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, model=TiedLM())
    assert "model.safetensors" in _one_line(info.value) and "truncated" in str(info.value)
    with pytest.raises(CheckpointError) as info:  # without the meta check: safetensors' own error
        load_model_weights(path, TiedLM(), verify=False)
    assert "model.safetensors" in _one_line(info.value)
    file.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # same size, one byte flipped
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt: sha256"):
        load_model_weights(path, TiedLM())


def test_corrupt_train_state_and_missing_files(tmp_path):
    model = nn.Linear(3, 3)
    path = save_checkpoint(tmp_path, step=1, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    state = path / "train_state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 64] = b"\x00" * 64
    state.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="train_state.pt is corrupt: sha256"):
        load_checkpoint(path, model=model)
    state.write_bytes(bytes(data[:40]))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, model=model, verify=False)
    assert "train_state.pt is truncated or corrupt" in _one_line(info.value)
    (path / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        load_checkpoint(tmp_path, model=model)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope", model=model)


def test_config_mismatch_names_fields_and_values(tmp_path):
    saved = {"model": {"hidden_size": 16, "layers": 1, "betas": [0.9, 0.95]}, "optim": {"lr": 0.1}}
    model = nn.Linear(2, 2)
    path = save_checkpoint(tmp_path, step=1, model=model, config=saved)
    current = {"model": {"hidden_size": 32, "layers": 1, "betas": (0.9, 0.95), "new_field": 3}, "optim": {"lr": 0.2}}
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, model=model, config=current, sections=["model"])
    message = _one_line(info.value)
    assert "model.hidden_size = 16 in the checkpoint but 32 now" in message
    assert "optim.lr" not in message and "new_field" not in message and "betas" not in message
    # only training fields differ: fine when restricted to the model section
    current["model"]["hidden_size"] = 16
    load_checkpoint(path, model=model, config=current, sections=["model"])
    with pytest.raises(CheckpointError, match=r"optim.lr = 0.1 in the checkpoint but 0.2 now"):
        load_checkpoint(path, model=model, config=current)


def test_shape_key_and_class_mismatches(tmp_path):
    path = save_checkpoint(tmp_path, step=1, model=nn.Sequential(nn.Linear(3, 2)))
    with pytest.raises(CheckpointError) as info:
        load_model_weights(path, nn.Sequential(nn.Linear(4, 2)))
    message = _one_line(info.value)
    assert "size mismatch for 0.weight" in message and "[2, 3]" in message and "[2, 4]" in message
    with pytest.raises(CheckpointError) as info:
        load_model_weights(path, nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2)))
    assert "missing from the checkpoint: 1.bias, 1.weight" in _one_line(info.value)
    with pytest.raises(CheckpointError, match="holds a Sequential but the model is a Linear"):
        load_model_weights(path, nn.Linear(3, 2))
    with pytest.raises(CheckpointError, match="not in the model: 0.bias, 0.weight"):
        load_model_weights(path, nn.Sequential(nn.Identity()))
    load_model_weights(path, nn.Sequential(nn.Identity()), strict=False)  # lenient: ignored
    optimizer = torch.optim.SGD(nn.Sequential(nn.Linear(3, 2)).parameters(), lr=0.1)
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        load_checkpoint(path, model=nn.Sequential(nn.Linear(3, 2)), optimizer=optimizer)


# ---------------------------------------------------------------------------------------------
# pruning, pointer, leftovers
# ---------------------------------------------------------------------------------------------


def test_keep_last_prunes_only_after_the_new_checkpoint(tmp_path, monkeypatch):
    model = nn.Linear(2, 2)
    for step in range(1, 5):
        save_checkpoint(tmp_path, step=step, model=model, keep_last=2)
    best = save_checkpoint(tmp_path, step=2, model=model, name="best", keep_last=2, update_latest=False)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["best", "latest", "step_000003", "step_000004"]
    assert latest_checkpoint(tmp_path).name == "step_000004" and best.is_dir()
    # The pruning step runs after the rename and the pointer update: if the new checkpoint
    # could not be completed, nothing is pruned.
    monkeypatch.setattr(ck, "_write_state_file", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, step=5, model=model, keep_last=1)
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000003", "step_000004", "best"]
    # saving again under an existing name replaces it atomically
    model.weight.data.fill_(7.0)
    save_checkpoint(tmp_path, step=4, model=model, keep_last=None)
    target = nn.Linear(2, 2)
    load_model_weights(tmp_path, target)
    assert torch.equal(target.weight, torch.full((2, 2), 7.0))
    assert not any(".old-" in p.name or ".tmp-" in p.name for p in (tmp_path / "checkpoints").iterdir())


def test_latest_falls_back_when_pointer_is_missing_or_stale(tmp_path):
    model = nn.Linear(2, 2)
    for step in (1, 2):
        save_checkpoint(tmp_path, step=step, model=model, keep_last=None)
    pointer = tmp_path / "checkpoints" / "latest"
    pointer.write_text("step_000009\n")
    assert latest_checkpoint(tmp_path).name == "step_000002"
    pointer.unlink()
    assert latest_checkpoint(tmp_path).name == "step_000002"
    assert latest_checkpoint(tmp_path / "checkpoints") is not None
    assert latest_checkpoint(tmp_path / "empty") is None


# ---------------------------------------------------------------------------------------------
# crash safety: SIGKILL during a save
# ---------------------------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import os, shutil, sys, time
    import torch
    import calm_models.checkpoint as ck

    run, stage, width = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Linear(width, 8))

    def train_step():  # no optimizer: constructing one imports torch._dynamo (seconds of CPU)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))

    def save(step, keep_last):
        torch.save(model.state_dict(), os.path.join(run, f"ref_{step}.pt"))
        ck.save_checkpoint(run, step=step, model=model, train_state={"step": step},
                           config={"width": width}, keep_last=keep_last)
        print(f"SAVED {step}", flush=True)

    def hang(*args, **kwargs):
        print("HANG", flush=True)
        time.sleep(600)

    train_step()
    save(1, keep_last=1)
    if stage == "model_file":
        original = ck._write_model_file
        def half_written(state, path):
            original(state, path)
            with open(path, "r+b") as fh:
                fh.truncate(os.path.getsize(path) // 2)
            hang()
        ck._write_model_file = half_written
    elif stage == "pointer":
        ck._write_latest = hang
    elif stage == "prune":
        def half_deleted(path, ignore_errors=False):
            os.remove(os.path.join(path, "model.safetensors"))
            hang()
        ck.shutil.rmtree = half_deleted
    elif stage == "loop":
        step = 2
        while True:
            train_step()
            save(step, keep_last=2)
            step += 1
    train_step()
    save(2, keep_last=1)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(args: list[str], env_extra: dict[str, str] | None = None) -> tuple[subprocess.Popen, queue.Queue]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", **(env_extra or {}))
    proc = subprocess.Popen(
        [sys.executable, "-c", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=str(REPO_ROOT),
    )
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line.strip())
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return proc, lines


def _wait_for(lines: queue.Queue, wanted: str, timeout: float = 120.0) -> list[str]:
    seen = []
    while True:
        line = lines.get(timeout=timeout)
        if line is None:
            raise AssertionError(f"child exited before printing {wanted!r}: {seen}")
        seen.append(line)
        if line == wanted:
            return seen


def _make(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, width), nn.Linear(width, 8))


def _check_loads(path: Path, run: Path, width: int) -> None:
    model = _make(width)
    state = load_checkpoint(path, model=model, config={"width": width})
    reference = torch.load(run / f"ref_{state['step']}.pt", weights_only=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference[key]), key


@pytest.mark.parametrize(
    ("stage", "expected_latest", "expected_complete"),
    [
        ("model_file", "step_000001", ["step_000001"]),
        ("pointer", "step_000001", ["step_000001", "step_000002"]),
        ("prune", "step_000002", ["step_000002"]),
    ],
)
def test_sigkill_during_save_keeps_last_good_checkpoint(tmp_path, stage, expected_latest, expected_complete):
    width = 64
    proc, lines = _spawn([_CHILD, str(tmp_path), stage, str(width)])
    try:
        _wait_for(lines, "HANG")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    latest = latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == expected_latest
    assert [p.name for p in list_checkpoints(tmp_path)] == expected_complete
    for path in list_checkpoints(tmp_path):
        _check_loads(path, tmp_path, width)
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir() if "-" in p.name]
    assert leftovers or stage == "pointer"  # the interrupted save left its temporary dir
    # The next save (a new process: the dead pid is not ours) removes every leftover.
    save_checkpoint(tmp_path, step=3, model=_make(width), config={"width": width}, keep_last=5)
    assert not [p.name for p in (tmp_path / "checkpoints").iterdir() if "-" in p.name]


def test_sigkill_at_a_random_moment_of_repeated_saves(tmp_path):
    width = 1024  # about 4 MB of weights per checkpoint
    proc, lines = _spawn([_CHILD, str(tmp_path), "loop", str(width)])
    try:
        _wait_for(lines, "SAVED 3")
        threading.Event().wait(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    latest = latest_checkpoint(tmp_path)
    assert latest is not None and read_meta(latest)["step"] >= 3
    complete = list_checkpoints(tmp_path)
    assert 1 <= len(complete) <= 3
    for path in complete:
        _check_loads(path, tmp_path, width)


# ---------------------------------------------------------------------------------------------
# two processes (torchrun-like environment, Gloo)
# ---------------------------------------------------------------------------------------------

_DDP_CHILD = textwrap.dedent(
    """
    import json, random, sys
    import torch
    from calm_models.checkpoint import (capture_rng_state, load_checkpoint, restore_rng_state,
                                        save_checkpoint)
    from calm_models.distributed import all_reduce_mean, cleanup, init_distributed, wrap_model

    run = sys.argv[1]
    info = init_distributed("cpu")
    torch.manual_seed(info.rank)  # different RNG streams per rank
    model = wrap_model(torch.nn.Linear(4, 2), info, "ddp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mean = all_reduce_mean(torch.tensor([float(info.rank)]))
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    rngs = [None, None]
    torch.distributed.all_gather_object(rngs, capture_rng_state())
    path = save_checkpoint(run, step=1, model=model, optimizer=opt,
                           train_state={"rank": info.rank, "rng": rngs})
    after_save = torch.rand(3).tolist()
    state = load_checkpoint(path, model=model, optimizer=opt)
    restore_rng_state(state["rng"][info.rank])
    after_load = torch.rand(3).tolist()
    print("RESULT " + json.dumps({"rank": info.rank, "type": type(model).__name__, "mean": mean.item(),
          "state": state["rank"], "rngs": len(state["rng"]), "same_rng": after_save == after_load,
          "weight": model.module.weight.flatten().tolist()}), flush=True)
    cleanup()
    """
)


def test_two_process_ddp_saves_once_and_restores_each_ranks_rng(tmp_path):
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        procs.append(_spawn([_DDP_CHILD, str(tmp_path)], env))
    results = []
    for proc, lines in procs:
        seen = []
        while (line := lines.get(timeout=180)) is not None:
            seen.append(line)
        assert proc.wait(timeout=60) == 0, seen
        results.append(json.loads(next(s for s in seen if s.startswith("RESULT "))[len("RESULT ") :]))
    for rank, result in enumerate(results):
        assert result["rank"] == rank and result["type"] == "DistributedDataParallel"
        assert result["mean"] == pytest.approx(0.5)
        assert result["same_rng"] is True
        assert result["state"] == 0 and result["rngs"] == 2  # rank 0 wrote the train state
    assert results[0]["weight"] == results[1]["weight"]  # DDP kept replicas in sync
