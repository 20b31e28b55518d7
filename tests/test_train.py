import json

import numpy as np
import pytest

from conftest import SAMPLE
from medtune.data.prepare import prepare
from medtune.train import TrainOptions, train
from medtune.train.mlx_backend import make_batch, masked_loss


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, smollm2_dir):
    out = tmp_path_factory.mktemp("prep") / "sample"
    prepare(SAMPLE, str(smollm2_dir), out, max_seq_length=300, limit=24)
    return out


def test_mask_counts_exactly_the_completion_tokens():
    """Our labels are tokens offset..length-1; mlx_lm's default_loss also counts the padding slot after them."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.tuner.trainer import default_loss

    class Echo(nn.Module):
        def __call__(self, x):
            return mx.zeros((*x.shape, 16))

    items = [([1, 2, 3, 4, 5, 6, 7], 3), ([1, 2, 3, 4, 5], 4)]
    batch, lengths = make_batch(items, [0, 1])
    _, ours = masked_loss(Echo(), batch, lengths)
    _, theirs = default_loss(Echo(), batch, lengths)
    expected = sum(len(t) - off for t, off in items)  # (7-3) + (5-4) = 5 completion tokens
    assert int(ours.item()) == expected
    assert int(theirs.item()) == expected + len(items)


def test_training_lowers_validation_loss_and_writes_a_loadable_adapter(tmp_path, tiny_llama_dir, prepared):
    out = tmp_path / "adapter"
    res = train(str(tiny_llama_dir), prepared, out,
                TrainOptions(iters=20, batch_size=2, num_layers=-1, rank=8, lr=3e-3, steps_per_eval=10, seed=1))
    assert res.final_val_loss < res.first_val_loss - 0.2
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train_loss" in r] == list(range(1, 21))
    assert all(r["label_tokens"] > 0 for r in rows if "train_loss" in r)
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["train_sha256"] and manifest["options"]["iters"] == 20

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tuner.utils import load_adapters

    model, _ = load(str(tiny_llama_dir))
    load_adapters(model, str(out))
    names = {k for k, _ in tree_flatten(model.parameters()) if "lora_b" in k}
    assert names and all(np.abs(np.array(v)).max() > 0 for k, v in tree_flatten(model.parameters()) if k in names)
    assert mx.load(str(out / "adapters.safetensors"))


def test_training_refuses_a_record_it_would_truncate(tmp_path, tiny_llama_dir, prepared):
    from medtune.errors import BadInput

    with pytest.raises(BadInput, match="cut off its end token"):
        train(str(tiny_llama_dir), prepared, tmp_path / "a", TrainOptions(iters=1, max_seq_length=64))
