import torch

from wsi_anomaly.models.transforms import IMAGENET_MEAN, denormalise, normalise


def test_normalise_roundtrip_and_mean_maps_to_zero():
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(denormalise(normalise(x)), x)
    mean_image = torch.tensor(IMAGENET_MEAN).view(3, 1, 1).expand(3, 4, 4)
    torch.testing.assert_close(normalise(mean_image), torch.zeros(3, 4, 4))
