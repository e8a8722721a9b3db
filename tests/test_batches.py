import numpy as np
import torch

from lenet.data.batches import Batches


def _split(n=1000):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n) % 10


def test_every_example_once_per_epoch_including_the_last_partial_batch():
    images, labels = _split(1000)
    images[:, 0, 0] = np.arange(1000) % 256  # tag each example...
    images[:, 0, 1] = np.arange(1000) // 256  # ...uniquely
    b = Batches(images, labels, 128, generator=torch.Generator().manual_seed(0))
    assert len(b) == 8  # 7 full batches of 128 and one of 104
    for _ in range(2):
        seen, sizes = [], []
        for x, y in b:
            sizes.append(len(y))
            tag = (x[:, 0, 0, 0] * 255).round().long() + 256 * (x[:, 0, 0, 1] * 255).round().long()
            seen.append(tag)
            assert torch.equal(y, torch.as_tensor(labels)[tag])  # images stay with labels
        assert sizes == [128] * 7 + [104]
        assert sorted(torch.cat(seen).tolist()) == list(range(1000))


def test_fresh_permutation_each_epoch_and_reproducible_from_the_seed():
    images, labels = _split(300)

    def orders(seed):
        b = Batches(images, labels, 300, generator=torch.Generator().manual_seed(seed))
        return [next(iter(b))[1].tolist() for _ in range(2)]

    first, second = orders(0)
    assert first != second
    assert orders(0) == [first, second]
    assert orders(1) != [first, second]


def test_float_conversion_is_totensor():
    images, labels = _split(10)
    x, y = next(iter(Batches(images, labels, 10)))
    assert x.dtype == torch.float32 and x.shape == (10, 1, 28, 28)
    assert torch.equal(x, torch.as_tensor(images).unsqueeze(1).float() / 255)
    assert y.dtype == torch.int64
    assert Batches(images, labels, 10).images.dtype == torch.uint8  # resident as bytes
