import pickle
import zipfile

import pytest
import torch

from memcontrol.errors import DataError, MissingWeightsError, UnsafeCheckpointError
from memcontrol.models import check_local_folder, check_text_encoder_loaded, load_pipeline
from memcontrol.weights import load_state_dict


def test_tiny_pipeline_samples_finite_images(tiny_pipe):
    out = tiny_pipe(["pa chest radiograph", "small nodule left upper zone"], num_inference_steps=3,
                    output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 64, 64, 3)
    assert torch.isfinite(torch.as_tensor(out.images)).all()


def test_hub_id_is_refused_with_local_folder_hint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingWeightsError, match="local folder is needed.*hub id"):
        load_pipeline("runwayml/stable-diffusion-v1-5")


def test_folder_without_model_index_names_the_file(tmp_path):
    with pytest.raises(MissingWeightsError, match="model_index.json"):
        check_local_folder(tmp_path)


class _Payload:
    """Unpickling this object creates a file: the way a malicious checkpoint runs code."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def _write_plain_pickle(obj, path):
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


def _write_torch_zip(obj, path):
    torch.save(obj, path)  # the zip container torch.save writes by default, with a data.pkl inside
    assert zipfile.is_zipfile(path)


@pytest.mark.parametrize("suffix", [".bin", ".pt"])
@pytest.mark.parametrize("write", [_write_plain_pickle, _write_torch_zip], ids=["pickle", "torch-zip"])
def test_pickle_payload_is_refused_and_never_runs(tmp_path, suffix, write):
    target = tmp_path / "pwned.txt"
    ckpt = tmp_path / f"evil{suffix}"
    write({"weight": _Payload(str(target))}, ckpt)
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        load_state_dict(ckpt)
    assert not target.exists()


def test_plain_tensor_checkpoint_loads(tmp_path):
    ckpt = tmp_path / "ok.pt"
    torch.save({"w": torch.arange(3.0)}, ckpt)
    assert torch.equal(load_state_dict(ckpt)["w"], torch.arange(3.0))


def test_pipeline_with_only_pickle_weights_is_refused(tiny_pipe_dir, tmp_path):
    import shutil

    copy = tmp_path / "pipe"
    shutil.copytree(tiny_pipe_dir, copy)
    for f in (copy / "unet").glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(UnsafeCheckpointError, match="pickle"):
        load_pipeline(copy)


def test_a_text_encoder_that_kept_random_weights_is_refused(tmp_path):
    # What transformers 5.5 and older do with the bundled model's text encoder (key layout of a later release):
    # report the weights it cannot place and go on with random ones. Here: a file holding one encoder's weights, in
    # the later layout (no "text_model." prefix), checked against another encoder of the same config.
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=16)
    torch.manual_seed(0)
    written = CLIPTextModel(config)
    torch.manual_seed(1)
    other = CLIPTextModel(config)
    state = {k.removeprefix("text_model."): v.contiguous() for k, v in written.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    # A variant file a plain load does not read is not held against the encoder.
    save_file({k: v.half() for k, v in other.state_dict().items()}, str(tmp_path / "model.fp16.safetensors"))
    check_text_encoder_loaded(written, tmp_path)
    with pytest.raises(DataError, match=r"model\.safetensors: the text encoder's weight .* was not loaded"):
        check_text_encoder_loaded(other, tmp_path)
