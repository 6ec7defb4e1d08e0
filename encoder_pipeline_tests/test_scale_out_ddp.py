"""Multi-device training: `torchrun --nproc_per_node 2` on CPU (gloo), as on a multi-GPU machine.

Each rank checks from inside that the loss `train_encoder` trains with scores its anchors against the
candidates of *both* ranks (its value equals the InfoNCE of the local anchors over the gathered batch,
computed by hand), then trains a few steps through `train_encoder`; the test checks both ranks ran
in one process group, and that they ended with the same weights with rank 0 alone saving the model.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # torchrun and spawned ranks: ~25 s on 2 cores

WORLD_SIZE = 2
PER_DEVICE = 4


def _pairs() -> list[tuple[str, str]]:
    """Real (name, docstring) pairs from a few standard-library modules, in a fixed order."""
    import inspect
    import json as json_module
    import textwrap

    pairs = []
    for module in (json_module, textwrap, os.path, inspect):
        for name, obj in sorted(vars(module).items()):
            doc = inspect.getdoc(obj) if callable(obj) and not name.startswith("_") else None
            if doc and getattr(obj, "__module__", None) == module.__name__:
                pairs.append((f"{module.__name__}.{name}", doc.split("\n\n")[0]))
    return pairs


def _rank_main(out: Path) -> None:
    """One DDP rank (run by torchrun): the gathered-loss check, then a short training run."""
    import pandas as pd
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import cos_sim
    from transformers import TrainerCallback

    from encoder_pipeline.lib.encoders import DEFAULT_BASE_MODEL, load_encoder
    from encoder_pipeline.lib.train import TrainingConfig, train_encoder, training_loss

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    pairs = _pairs()
    rows = pd.DataFrame(pairs[:48], columns=["query", "positive"])

    class Weights(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            self.checksum = _checksum(model)

    weights = Weights()
    # Every model folder this rank writes (checkpoints and the final model), as the rank saw it.
    saves, save = [], SentenceTransformer.save_pretrained

    def recorded_save(self, path, *args, **kwargs):
        saves.append(str(Path(path).relative_to(out)))
        return save(self, path, *args, **kwargs)

    SentenceTransformer.save_pretrained = recorded_save
    # Train first: the trainer sets up the process group (gloo, since there is no GPU).
    config = TrainingConfig(max_steps=3, batch_size=WORLD_SIZE * PER_DEVICE, gradcache=True,
                            mini_batch_size=2, gor_weight=0.0, matryoshka_dims=(384, 96),
                            order_dimensions=False, checkpoint_every_s=0.0, seed=0)
    result = train_encoder(DEFAULT_BASE_MODEL, rows, out / "train", config, checkpoint_dir=out / "ckpt",
                           callbacks=[weights])
    SentenceTransformer.save_pretrained = save
    assert dist.is_initialized() and dist.get_backend() == "gloo", "DDP did not start on gloo"

    # The loss as train_encoder builds it, on this rank's slice of one global batch.
    model = load_encoder(DEFAULT_BASE_MODEL, fresh=True).eval()  # eval: no dropout, comparable values
    loss = training_loss(model, config, PER_DEVICE, world)
    batch = pairs[48:48 + world * PER_DEVICE]
    local = batch[rank * PER_DEVICE:(rank + 1) * PER_DEVICE]
    features = [model.preprocess([q for q, _ in local]), model.preprocess([p for _, p in local])]
    with torch.no_grad():
        gathered_loss = float(loss(features, None))
        # By hand: the local anchors against all positives of the global batch (each rank knows
        # the whole batch), label = the anchor's row in the global batch, summed over the
        # Matryoshka widths; and the same with only the local positives (no gathering).
        queries = model.encode([q for q, _ in local], convert_to_tensor=True)
        positives = model.encode([p for _, p in batch], convert_to_tensor=True)
        labels = torch.arange(PER_DEVICE) + rank * PER_DEVICE
        local_only = positives[rank * PER_DEVICE:(rank + 1) * PER_DEVICE]
        expected = local_expected = 0.0
        for dim in config.matryoshka_dims:
            expected += float(F.cross_entropy(20.0 * cos_sim(queries[:, :dim], positives[:, :dim]), labels))
            local_expected += float(F.cross_entropy(
                20.0 * cos_sim(queries[:, :dim], local_only[:, :dim]), torch.arange(PER_DEVICE)))
    saved = out / "train" / "model"
    (out / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world": world, "steps": result.steps, "world_size": result.world_size,
        "loss": result.loss, "gathered_loss": gathered_loss, "expected": expected,
        "local_only": local_expected, "trained_checksum": weights.checksum,
        "saves": saves,
        # rank 0's reload of what it saved (rank 1 might read it mid-write); who saved: "saves"
        "saved_checksum": _checksum(load_encoder(str(saved), fresh=True)) if rank == 0 else None,
        "base_checksum": _checksum(model),
    }))


def _checksum(model) -> float:
    return float(sum(p.detach().double().abs().sum() for p in model.parameters()))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD_SIZE),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), __file__, str(out)]
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"torchrun failed (exit {done.returncode}):\n{done.stderr[-4000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]


def test_each_rank_scores_its_anchors_against_the_gathered_batch(ddp_run):
    for rank in ddp_run:
        assert rank["world"] == WORLD_SIZE
        assert rank["gathered_loss"] == pytest.approx(rank["expected"], rel=1e-4, abs=1e-4), rank
        # Gathering matters: with only its own 4 candidates the loss would be another number.
        assert abs(rank["gathered_loss"] - rank["local_only"]) > 1e-2, rank


def test_two_process_training_runs_in_step_and_saves_once(ddp_run):
    assert [r["steps"] for r in ddp_run] == [3, 3]
    assert [r["world_size"] for r in ddp_run] == [WORLD_SIZE, WORLD_SIZE]
    assert all("CachedMNRL" in r["loss"] for r in ddp_run)
    # DDP kept the replicas identical, they moved away from the base model, and rank 0 saved them.
    first, second = ddp_run
    assert first["trained_checksum"] == pytest.approx(second["trained_checksum"], rel=1e-9)
    assert first["trained_checksum"] != pytest.approx(first["base_checksum"], rel=1e-9)
    assert first["saved_checksum"] == pytest.approx(first["trained_checksum"], rel=1e-6)
    # Each rank recorded the model folders it wrote itself: the final model once, by rank 0 only.
    final = str(Path("train") / "model")
    assert [r["saves"].count(final) for r in ddp_run] == [1, 0], [r["saves"] for r in ddp_run]


def test_train_encoder_launches_one_process_per_device_by_itself(tmp_path):
    """What a multi-GPU step does in the pipeline (devices = the GPUs present), here on 2 CPU ranks."""
    import pandas as pd

    from encoder_pipeline.lib.encoders import DEFAULT_BASE_MODEL
    from encoder_pipeline.lib.train import TrainingConfig, train_encoder

    rows = pd.DataFrame(_pairs()[:32], columns=["query", "positive"])
    config = TrainingConfig(max_steps=2, batch_size=8, order_dimensions=False, seed=0)
    result = train_encoder(DEFAULT_BASE_MODEL, rows, tmp_path / "out", config, devices=WORLD_SIZE)
    assert (result.world_size, result.steps, result.batch_size) == (WORLD_SIZE, 2, 8)
    assert (tmp_path / "out" / "model" / "config.json").exists()
    assert not (tmp_path / "out" / "checkpoints").exists()  # rank 0 cleared them after success


if __name__ == "__main__":
    _rank_main(Path(sys.argv[1]))
