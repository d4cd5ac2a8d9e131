"""Shared fixtures: a tiny embedded benchmark, and a detector config small enough for CPU tests."""
import pytest


@pytest.fixture(scope="session", autouse=True)
def pretrain_cache(tmp_path_factory):
    """The SR recipe pretrains G and caches it ($SODLAB_CACHE): tests keep theirs out of the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("sodlab-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SODLAB_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory):
    """12 train / 6 val images of 128x128 with x4 twins: enough to train a few iterations."""
    from sodlab.data.synth import generate

    out = tmp_path_factory.mktemp("synth") / "tiny"
    generate(out, n_train=12, n_val=6, seed=0, size=128, hr_scale=4, workers=1, progress=False)
    return out


@pytest.fixture
def tiny_config(tiny_synth, tmp_path):
    """A cpu-preset TrainConfig on the tiny data at the small detector's 128 px (recipes.SMALL_DETECTOR)."""
    from sodlab.config import make_config
    from sodlab.recipes import SMALL_DETECTOR

    return make_config("cpu", detector=SMALL_DETECTOR, data=str(tiny_synth), iters=6, batch_size=2, warmup_iters=2,
                       ckpt_every=3, eval_batch_size=2, out=str(tmp_path / "run"))
