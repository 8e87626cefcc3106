import json

import pytest
import torch

from LiverSegmentationLogic.errors import ModelLoadError, ModelNotFoundError
from LiverSegmentationLogic.models.catalog import CARD_NAME, WEIGHTS_NAME
from LiverSegmentationLogic.models.model_files import load_model, save_model
from LiverSegmentationLogic.models.network import (
    UNet2D,
    UNetEnsemble,
    build_network,
    count_flops_per_slice,
    inference_network,
)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("in_ch,n_cls,width,depth", [(1, 2, 4, 2), (3, 2, 8, 3), (5, 4, 4, 4)])
def test_unet_shapes(in_ch, n_cls, width, depth, residual):
    net = UNet2D(in_ch, n_cls, width=width, depth=depth, residual=residual).eval()
    size = 2**depth * 3
    assert net(torch.rand(2, in_ch, size, size)).shape == (2, n_cls, size, size)


def test_dropout_only_in_the_two_deepest_blocks():
    net = UNet2D(3, 2, width=4, depth=4, dropout=0.2)
    with_dropout = [i for i, b in enumerate(net.down) if isinstance(b.dropout, torch.nn.Dropout2d)]
    assert with_dropout == [3, 4]
    assert not any(isinstance(b.dropout, torch.nn.Dropout2d) for b in net.up_blocks)


def test_invalid_arguments():
    with pytest.raises(ValueError):
        UNet2D(0, 2)
    with pytest.raises(ValueError):
        UNet2D(3, 1)
    with pytest.raises(ValueError):
        UNet2D(3, 2, dropout=1.5)


def test_flop_count_scales_with_area():
    net = UNet2D(3, 2, width=8, depth=3)
    f1, f2 = count_flops_per_slice(net, 32, 32), count_flops_per_slice(net, 64, 64)
    assert f1 > 0 and f2 == pytest.approx(4 * f1)
    # first conv alone: 3 -> 8 channels, 3x3, on 32x32 outputs
    assert f1 > 2 * 3 * 9 * 8 * 32 * 32


@pytest.mark.parametrize("residual", [False, True])
def test_inference_network_folds_batchnorm_and_computes_the_same(residual):
    torch.manual_seed(0)
    members = [UNet2D(5, 3, width=4, depth=2, residual=residual) for _ in range(2)]
    for net in members:  # trained-looking statistics, so the folding has something to fold
        for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.5, 0.5)
    for network in (members[0], UNetEnsemble(members)):
        network.train()
        folded = inference_network(network)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in network.modules())  # the original is untouched
        assert network.training and not folded.training
        x = torch.rand(2, 5, 16, 16)
        with torch.no_grad():
            torch.testing.assert_close(folded(x), network.eval()(x), atol=1e-4, rtol=1e-4)


def _tiny_model(tmp_path):
    net = UNet2D(3, 2, width=4, depth=2)
    card = {"name": "tiny", "version": "0.0.1", "classes": [{"label": 1, "name": "liver", "color": [1, 0, 0]}],
            "preprocessing": {"spacing_xy": [2, 2], "neighbours": 1,
                              "intensity": {"method": "percentile", "lower": 0.5, "upper": 99.5}}}
    return net, save_model(tmp_path / "tiny", net, card)


def test_save_and_load_round_trip(tmp_path):
    net, folder = _tiny_model(tmp_path)
    loaded = load_model(folder)
    assert loaded.card["network"] == net.config and len(loaded.card["sha256"]) == 64
    x = torch.rand(1, 3, 16, 16)
    net.eval()
    # weights are stored in float16: outputs agree to half precision
    torch.testing.assert_close(loaded.network(x), net(x), atol=2e-2, rtol=2e-2)
    assert load_model(folder / CARD_NAME).card["name"] == "tiny"


def test_ensemble_averages_the_members_probabilities(tmp_path):
    torch.manual_seed(0)
    members = [UNet2D(3, 3, width=4, depth=2).eval() for _ in range(2)]
    ensemble = UNetEnsemble(members).eval()
    x = torch.rand(2, 3, 16, 16)
    mean = (members[0](x).softmax(1) + members[1](x).softmax(1)) / 2
    torch.testing.assert_close(ensemble(x).softmax(1), mean)
    assert ensemble.config == dict(members[0].config, members=2) and ensemble.stride == 4
    assert count_flops_per_slice(ensemble, 16, 16) == pytest.approx(2 * count_flops_per_slice(members[0], 16, 16))
    # saved as one model, rebuilt from its card
    card = {"name": "pair", "version": "0.0.1", "classes": [{"label": 1, "name": "liver", "color": [1, 0, 0]}],
            "preprocessing": {"spacing_xy": [2, 2], "neighbours": 1,
                              "intensity": {"method": "percentile", "lower": 0.5, "upper": 99.5}}}
    loaded = load_model(save_model(tmp_path / "pair", ensemble, card))
    assert isinstance(loaded.network, UNetEnsemble) and loaded.card["network"]["members"] == 2
    torch.testing.assert_close(loaded.network(x).softmax(1), mean, atol=2e-2, rtol=2e-2)
    assert isinstance(build_network(members[0].config), UNet2D)


def test_ensemble_rejects_a_single_or_mismatched_member():
    with pytest.raises(ValueError, match="at least 2"):
        UNetEnsemble([UNet2D(3, 2, width=4, depth=2)])
    with pytest.raises(ValueError, match="share one network configuration"):
        UNetEnsemble([UNet2D(3, 2, width=4, depth=2), UNet2D(3, 2, width=8, depth=2)])


def test_missing_and_corrupt_models(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFoundError, match="No model found"):
        load_model(tmp_path / "nowhere")
    monkeypatch.setenv("LIVERSEG_MODELS_DIR", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="Known models: none"):
        load_model("liver-ct")
    _, folder = _tiny_model(tmp_path)
    weights = folder / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_model("tiny")
    weights.unlink()
    with pytest.raises(ModelNotFoundError, match="weights missing"):
        load_model(folder)
    (folder / CARD_NAME).write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_model(folder)


def test_weights_that_do_not_fit_the_card(tmp_path):
    from LiverSegmentationLogic.models.model_files import sha256_of

    _, folder = _tiny_model(tmp_path)
    card = json.loads((folder / CARD_NAME).read_text())
    card["network"]["width"] = 8  # the card now describes another network
    card["sha256"] = sha256_of(folder / WEIGHTS_NAME)
    (folder / CARD_NAME).write_text(json.dumps(card))
    with pytest.raises(ModelLoadError, match="Cannot load"):
        load_model(folder)
