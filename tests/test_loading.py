"""Checkpoint I/O of ModelMixin: formats, variants, shards, dtype, strict checks and clear errors."""

import json
import logging
import re

import pytest
import torch
from torch import nn

from kandinsky22.loading import Config, ModelMixin, find_weight_files, is_hub_id


class TinyNet(ModelMixin):
    config_defaults = {"width": 4, "depth": 2}

    def __init__(self, **kwargs):
        super().__init__()
        cfg = self._register_config(kwargs)
        self.layers = nn.ModuleList(nn.Linear(cfg.width, cfg.width) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


@pytest.fixture
def net():
    torch.manual_seed(0)
    return TinyNet(width=6, depth=3)


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_config_is_read_only_attribute_dict(net):
    assert net.config.width == 6 and net.config["depth"] == 3
    assert isinstance(net.config, Config)
    with pytest.raises(AttributeError):
        net.config.width = 3


@pytest.mark.parametrize("safe", [True, False])
def test_round_trip_single_file(net, tmp_path, safe):
    net.save_pretrained(tmp_path, safe_serialization=safe)
    name = "diffusion_pytorch_model." + ("safetensors" if safe else "bin")
    assert (tmp_path / name).is_file()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config == {"_class_name": "TinyNet", "width": 6, "depth": 3}
    loaded = TinyNet.from_pretrained(tmp_path)
    assert_same_weights(net, loaded)
    assert not loaded.training


def test_sharded_round_trip(net, tmp_path):
    net.save_pretrained(tmp_path, max_shard_size=200)
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert find_weight_files(tmp_path) == [tmp_path / s for s in shards]
    assert_same_weights(net, TinyNet.from_pretrained(tmp_path))


@pytest.mark.parametrize("size", ["20KB", "0.02MB", " 20kb "])
def test_shard_size_as_the_reference_writes_it(size, tmp_path):
    """The reference's max_shard_size is a string such as "10GB" (decimal units: 20KB = 20000 bytes)."""
    torch.manual_seed(0)
    net = TinyNet(width=40, depth=4)  # 6560 bytes a layer: three layers fit in 20000 bytes, not four
    net.save_pretrained(tmp_path, max_shard_size=size)
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    assert_same_weights(net, TinyNet.from_pretrained(tmp_path))


@pytest.mark.parametrize("size", ["10", "GB", "-1GB", "10GiB", "infGB", "nanMB", 0, -5, 1.5, True])
def test_bad_shard_size_is_a_value_error_naming_it(net, tmp_path, size):
    with pytest.raises(ValueError, match=f"max_shard_size.*{re.escape(repr(size))}"):
        net.save_pretrained(tmp_path, max_shard_size=size)


@pytest.mark.parametrize("dtype", ["float16", torch.int8, 16])
def test_torch_dtype_that_is_no_float_dtype_is_a_value_error(net, tmp_path, dtype):
    """A string went to ``Tensor.to`` as a device name ("Invalid device string: 'float16'")."""
    net.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"torch_dtype.*{re.escape(repr(dtype))}"):
        TinyNet.from_pretrained(tmp_path, torch_dtype=dtype)


def test_unknown_from_pretrained_option_is_a_value_error(net, tmp_path):
    """A misspelt option was ignored for a local folder (and made the hub download fail with a TypeError)."""
    net.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="torch_dtyp"):
        TinyNet.from_pretrained(tmp_path, torch_dtyp=torch.float16)


def test_the_newer_of_a_single_file_and_shards_loads_as_in_the_reference(tmp_path):
    """The reference saving unsharded, then sharded, into one folder leaves the single file next to the new shards,
    and loads the shards; the single file's old weights were loaded instead."""
    import diffusers

    from kandinsky22 import VQModel
    from kandinsky22.tiny import tiny_movq_config

    torch.manual_seed(0)
    old, new = diffusers.VQModel(**tiny_movq_config()), diffusers.VQModel(**tiny_movq_config())
    old.save_pretrained(tmp_path)
    new.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    assert_same_weights(VQModel.from_pretrained(tmp_path), diffusers.VQModel.from_pretrained(tmp_path))
    assert_same_weights(VQModel.from_pretrained(tmp_path), new)


@pytest.mark.parametrize("safe", [True, False])
def test_saving_again_replaces_the_weights_of_the_earlier_save(tmp_path, safe):
    torch.manual_seed(0)
    first, second = TinyNet(width=6, depth=3), TinyNet(width=6, depth=3)
    first.save_pretrained(tmp_path, safe_serialization=safe, variant="v")
    second.save_pretrained(tmp_path, safe_serialization=safe, variant="v", max_shard_size=200)
    assert_same_weights(second, TinyNet.from_pretrained(tmp_path, variant="v"))
    first.save_pretrained(tmp_path, safe_serialization=safe, variant="v")
    assert_same_weights(first, TinyNet.from_pretrained(tmp_path, variant="v"))
    ext = "safetensors" if safe else "bin"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", f"diffusion_pytorch_model.v.{ext}"]


def test_fp16_variant_and_dtype(net, tmp_path):
    net.half().save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").is_file()
    loaded = TinyNet.from_pretrained(tmp_path, variant="fp16")
    assert loaded.dtype == torch.float16
    assert_same_weights(net, loaded)
    as_float = TinyNet.from_pretrained(tmp_path, variant="fp16", torch_dtype=torch.float32)
    assert as_float.dtype == torch.float32
    with pytest.raises(FileNotFoundError, match=r"diffusion_pytorch_model\.safetensors"):
        TinyNet.from_pretrained(tmp_path)  # only the fp16 variant is there


def test_loading_does_not_initialise_weights(net, tmp_path, monkeypatch):
    net.save_pretrained(tmp_path)

    def forbidden(self):
        # Construction on the meta device still calls reset_parameters, but it must touch no real memory.
        assert self.weight.is_meta, "random init ran on real tensors during from_pretrained"

    monkeypatch.setattr(nn.Linear, "reset_parameters", forbidden)
    monkeypatch.setattr(nn.LayerNorm, "reset_parameters", forbidden)
    assert_same_weights(net, TinyNet.from_pretrained(tmp_path))


def test_mismatched_state_dict_lists_keys_and_file(net, tmp_path):
    from safetensors.torch import save_file

    net.save_pretrained(tmp_path)
    state = dict(net.state_dict())
    del state["layers.0.weight"]
    state["extra.weight"] = torch.zeros(2)
    state["norm.bias"] = torch.zeros(5)
    save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError) as err:
        TinyNet.from_pretrained(tmp_path)
    text = str(err.value)
    assert "diffusion_pytorch_model.safetensors" in text
    assert "1 missing: ['layers.0.weight']" in text
    assert "1 unexpected: ['extra.weight']" in text
    assert "norm.bias: file (5,) vs model (6,)" in text


def test_config_that_does_not_fit_the_weights(net, tmp_path):
    net.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"width": 6, "depth": 2}))
    with pytest.raises(ValueError, match=r"1 unexpected: \['layers\.2\.bias'\]|unexpected"):
        TinyNet.from_pretrained(tmp_path)


def test_truncated_file_is_an_error(net, tmp_path):
    net.save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(Exception, match=r"(?i)safetensor|header|incomplete|invalid"):
        TinyNet.from_pretrained(tmp_path)


def test_missing_folder_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "unet"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        TinyNet.from_pretrained(missing)
    (tmp_path / "repo").mkdir()
    with pytest.raises(FileNotFoundError, match="unet"):
        TinyNet.from_pretrained(tmp_path / "repo", subfolder="unet")


def test_hub_id_offline_names_repo_and_local_way(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert is_hub_id("kandinsky-community/kandinsky-2-2-decoder")
    with pytest.raises(OSError) as err:
        TinyNet.from_pretrained("kandinsky-community/kandinsky-2-2-decoder", subfolder="unet", cache_dir=tmp_path)
    text = str(err.value)
    assert "kandinsky-community/kandinsky-2-2-decoder" in text and "local folder" in text


def test_unknown_config_keys_warn(caplog):
    with caplog.at_level(logging.WARNING):
        model = TinyNet.from_config({"width": 2, "depth": 1, "colour": "red", "_diffusers_version": "0.1"})
    assert "colour" in caplog.text and "_diffusers_version" not in caplog.text
    assert model.config == {"width": 2, "depth": 1}


def test_a_hub_failure_is_one_message_with_its_lines_kept_apart(monkeypatch):
    """huggingface_hub's messages run over several lines; quoted as they were, a one-line error ran their sentences
    together ("... not known An error happened ...")."""
    import huggingface_hub

    from kandinsky22 import loading

    def fail(*args, **kwargs):
        raise ConnectionError("Name or service not known\n\nAn error happened while trying to locate the files")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(OSError) as info:
        loading.download_from_hub("owner/repo", ["*.json"])
    assert "\n" not in str(info.value)
    assert "(ConnectionError: Name or service not known; An error happened while trying to locate the files)" in str(
        info.value
    )
