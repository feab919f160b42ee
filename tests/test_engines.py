"""Inference engines: the chosen engine's labels match PyTorch's on real cases, ONNX export round trip, the
missing-package error, and engines behaving like the model they replace (dynamic batch and spatial sizes)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import cropped_real_case, needs_real_data

from neuromap import engines
from neuromap.checkpoint import ModelSpec, load_model, save_checkpoint
from neuromap.cli import main
from neuromap.config import InferenceConfig, ModelConfig, PreprocessConfig
from neuromap.engines import runtimes
from neuromap.errors import NeuroMapError
from neuromap.metrics import dice_per_region
from neuromap.segmenter import segment

ONNX_ENGINES = [e for e in ("onnxruntime", "openvino") if engines.engine_available(e)]
needs_onnx_engine = pytest.mark.skipif(not ONNX_ENGINES, reason="no ONNX engine installed (pip install '.[onnx]')")
CHOSEN = next((e for e in engines.AUTO_ORDER if engines.engine_available(e)), None)


@pytest.fixture(scope="module")
def native25d_checkpoint(tmp_path_factory):
    """A small model of the coming default's kind: 2.5D (3 slices x 4 sequences), native size, region outputs."""
    torch.manual_seed(1)
    spec = ModelSpec(
        ModelConfig(name="unet2d", spatial_dims=2, out="regions", options={"features": [8, 8, 16, 16, 32, 8]}),
        PreprocessConfig(mode="2d", slice_size=None, spacing=(1.0, 1.0, 1.0), context_slices=1), "brats", (48, 48), 3,
    )
    return save_checkpoint(tmp_path_factory.mktemp("ckpt25") / "tiny25.pt", spec, spec.build().state_dict())


def _hide(monkeypatch, *modules: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in modules else real(name, *a))


def test_missing_package_names_what_to_install(monkeypatch, tiny_checkpoint, synthetic_case, tmp_path, capsys):
    _hide(monkeypatch, "onnxruntime", "openvino")
    with pytest.raises(NeuroMapError, match=r"pip install 'neuromap\[onnx\]'"):
        engines.resolve_engine("onnxruntime")
    with pytest.raises(NeuroMapError, match=r"pip install 'neuromap\[openvino\]'"):
        engines.resolve_engine("openvino")
    assert engines.resolve_engine("auto") == "torch"  # the fallback, never an error
    code = main(["segment", str(synthetic_case), "-o", str(tmp_path / "o"), "--model", str(tiny_checkpoint),
                 "--engine", "onnxruntime", "--quiet"])
    assert code == 2 and "neuromap[onnx]" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_auto_is_torch_on_a_gpu_and_onnx_engines_refuse_it():
    assert engines.resolve_engine("auto", "cuda") == "torch"
    for engine in ONNX_ENGINES:
        with pytest.raises(NeuroMapError, match="CPU only"):
            engines.resolve_engine(engine, "cuda")


@needs_onnx_engine
@pytest.mark.parametrize("which", ["tiny_checkpoint", "native25d_checkpoint"])
def test_export_round_trip(tmp_path, capsys, request, which):
    checkpoint = request.getfixturevalue(which)
    target = tmp_path / "model.onnx"
    assert main(["export", str(checkpoint), "--format", "onnx", "-o", str(target)]) == 0
    printed = capsys.readouterr().out
    assert "max |logit difference| vs PyTorch" in printed and target.is_file()
    from neuromap.engines.onnx_export import spec_from_onnx

    model, spec = load_model(checkpoint)
    assert spec_from_onnx(target).to_dict() == spec.to_dict()  # self-describing: the spec travels in the file
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(target)).metadata_props}
    assert meta["modalities"] == "t1,t1ce,t2,flair" and meta["output"] == spec.model.out
    # Dynamic batch and spatial axes: sizes the export never saw, through every installed engine.
    x = torch.randn(5, spec.preprocess.in_channels, 32, 80)
    with torch.no_grad():
        expected = model(x)
    for engine in ONNX_ENGINES:
        run = runtimes.OnnxRuntimeModel if engine == "onnxruntime" else runtimes.OpenVinoModel
        got = run(target, threads=1)(x.numpy())
        assert got.shape == tuple(expected.shape) and float(np.abs(got - expected.numpy()).max()) < 1e-3
    assert main(["export", str(checkpoint), "-o", str(target)]) == 2  # exists: kept unless --overwrite
    assert main(["export", str(checkpoint), "-o", str(target), "--overwrite"]) == 0


def test_export_errors_are_user_errors(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing.pt"), "-o", str(tmp_path / "m.onnx")]) == 2
    assert "not found" in capsys.readouterr().err


@needs_onnx_engine
def test_engine_is_exported_once_and_reported(tiny_checkpoint, synthetic_case, tmp_path):
    (first,) = segment(synthetic_case, model=tiny_checkpoint, cfg=InferenceConfig(engine=ONNX_ENGINES[0]))
    exported = set(engines.cache_dir().rglob("*.onnx"))  # the cache is shared with other tests of the session
    (again,) = segment(synthetic_case, model=tiny_checkpoint, cfg=InferenceConfig(engine=ONNX_ENGINES[0]))
    assert first.report["engine"].startswith(ONNX_ENGINES[0])
    assert first.report["engine"].split(": ")[-1] in {p.name for p in exported}
    assert set(engines.cache_dir().rglob("*.onnx")) == exported  # the second run re-used the export
    assert np.array_equal(np.asarray(first.labels.dataobj), np.asarray(again.labels.dataobj))
    (eager,) = segment(synthetic_case, model=tiny_checkpoint, cfg=InferenceConfig(engine="torch"))
    assert eager.report["engine"] == "torch"


@needs_real_data
@pytest.mark.skipif(CHOSEN is None, reason="the chosen engine is not installed")
def test_chosen_engine_labels_match_pytorch_on_a_real_case(tmp_path):
    """The shipped default model (picked for a four-sequence case) through the whole segment path: labels in the
    input grid agree per region."""
    case = cropped_real_case(tmp_path)
    labels = {}
    for engine in ("torch", CHOSEN):
        cfg = InferenceConfig(engine=engine, threads=1)
        (result,) = segment(case, labels="internal", cfg=cfg)
        assert result.report["engine"].split()[0] == engine
        labels[engine] = np.asarray(result.labels.dataobj)
    assert labels["torch"].any()  # a real tumour was found, so the comparison means something
    for region, dice in dice_per_region(labels[CHOSEN], labels["torch"]).items():
        assert dice >= 0.999, (region, dice)


@needs_real_data
@pytest.mark.skipif(CHOSEN is None, reason="the chosen engine is not installed")
def test_chosen_engine_runs_native_size_25d_models_like_pytorch(tmp_path, native25d_checkpoint):
    """The coming default's kind: 12-channel slice stacks of a native-size crop padded to the divisor. Random
    weights make labels meaningless (probabilities sit near 0.5), so the probabilities themselves are compared."""
    from neuromap.inference import predict_probs
    from neuromap.io import discover_cases, load_case
    from neuromap.preprocess import prepare

    model, spec = load_model(native25d_checkpoint)
    image = prepare(load_case(discover_cases(cropped_real_case(tmp_path, slices=12))[0], spec.modalities),
                    spec.preprocess).image
    assert image.shape[1] % 16 or image.shape[2] % 16  # the crop needs padding: that path is exercised
    engine = engines.wrap_model(model, spec, CHOSEN, native25d_checkpoint)
    cfg = InferenceConfig(slice_batch_size=5, skip_slices=False)  # random weights: which slices hold "tumour" is noise
    expected = predict_probs([(model, spec)], image, cfg)
    got = predict_probs([(engine, spec)], image, cfg)
    assert float(np.abs(got - expected).max()) < 1e-4


@needs_real_data
@pytest.mark.skipif(CHOSEN is None, reason="the chosen engine is not installed")
def test_a_cached_export_runs_without_importing_pytorch_or_monai(tmp_path, native25d_checkpoint):
    """Once a checkpoint's export is cached, `neuromap segment` runs it without building the PyTorch network or
    reading the checkpoint, so neither PyTorch (a fifth of a one-case run) nor MONAI (about 5 CPU-seconds of
    import) is loaded; the labels are those of the run that built it."""
    case = cropped_real_case(tmp_path, slices=12)
    env = {**os.environ, "NEUROMAP_CACHE_DIR": str(tmp_path / "cache")}
    probe = ("import sys; from neuromap.cli import main; code = main(sys.argv[1:]); "
             "print('MONAI', 'monai' in sys.modules, 'PyTorch', 'torch' in sys.modules); sys.exit(code)")
    outputs = {}
    for run in ("first", "cached"):
        done = subprocess.run([sys.executable, "-c", probe, "segment", str(case), "-o", str(tmp_path / run),
                               "--model", str(native25d_checkpoint), "--engine", CHOSEN, "--quiet"],
                              capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr
        outputs[run] = done.stdout
    assert "MONAI True PyTorch True" in outputs["first"] and "MONAI False PyTorch False" in outputs["cached"]
    first, cached = (np.asarray(nib.load(next((tmp_path / r).glob("*_seg.nii.gz"))).dataobj) for r in outputs)
    assert np.array_equal(first, cached)


@needs_onnx_engine
@pytest.mark.parametrize("damage", ["truncated export", "unreadable spec"])
def test_a_damaged_cache_entry_is_made_again(tiny_checkpoint, synthetic_case, tmp_path, monkeypatch, damage):
    """A cache entry cut short (a full disk) or edited is exported again, with the same labels, instead of a
    traceback or a silent fall-back to PyTorch on every later run."""
    monkeypatch.setenv("NEUROMAP_CACHE_DIR", str(tmp_path / "cache"))
    cfg = InferenceConfig(engine=ONNX_ENGINES[0])
    (first,) = segment(synthetic_case, model=tiny_checkpoint, cfg=cfg)
    (exported,) = engines.cache_dir().rglob("*.onnx")
    if damage == "truncated export":
        exported.write_bytes(exported.read_bytes()[:1000])
    else:
        exported.with_suffix(".spec.json").write_text("{not json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fall-back warning either
        (again,) = segment(synthetic_case, model=tiny_checkpoint, cfg=cfg)
    assert again.report["engine"] == first.report["engine"]
    assert np.array_equal(np.asarray(first.labels.dataobj), np.asarray(again.labels.dataobj))
    assert json.loads(exported.with_suffix(".spec.json").read_text())  # repaired


@needs_onnx_engine
def test_a_sound_export_the_runtime_refuses_is_kept(tiny_checkpoint, synthetic_case, tmp_path, monkeypatch):
    """An intact export that the runtime cannot open (say, checked with ONNX Runtime, refused by OpenVINO) falls
    back to PyTorch with a warning under "auto" and is not exported again on every later run."""
    monkeypatch.setenv("NEUROMAP_CACHE_DIR", str(tmp_path / "cache"))
    (first,) = segment(synthetic_case, model=tiny_checkpoint, cfg=InferenceConfig(engine="auto"))
    assert first.report["engine"] != "torch"
    (exported,) = engines.cache_dir().rglob("*.onnx")
    made = exported.stat().st_mtime_ns

    def refuse(name, onnx_file, threads):
        raise RuntimeError("this runtime cannot open the file")

    monkeypatch.setattr(engines, "_runtime", refuse)
    with pytest.warns(UserWarning, match="using PyTorch"):
        (result,) = segment(synthetic_case, model=tiny_checkpoint, cfg=InferenceConfig(engine="auto"))
    assert result.report["engine"] == "torch"
    assert exported.stat().st_mtime_ns == made  # kept, not made again


def test_thread_default_is_decided_once_for_every_engine(monkeypatch):
    """OMP_NUM_THREADS, which PyTorch honours, is honoured for the runtimes too, first run or cached."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert engines.default_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert engines.default_threads() == len(os.sched_getaffinity(0))
