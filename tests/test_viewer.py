"""Conventions of the pictures and viewers: the overlay PNG's left-right convention, orientation letters, slice
positions and volumes; `result.show()` in a notebook (ipyniivue widget, static PNG fallback); the CLI's
``--neurological``. The web app's NiiVue viewer is driven in `test_app_browser.py`."""

from __future__ import annotations

import gzip
import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import neuromap
from neuromap import cli
from neuromap.pictures import overlay_png, view_letters
from neuromap.segmenter import segment
from neuromap.synthetic import write_synthetic_case
from neuromap.tasks import BRATS_COLOURS, get_task

LEGEND = get_task("brats").legend


def red_columns(png: bytes, panel: int) -> np.ndarray:
    """Columns (as fractions of the panel width) of the NCR/NET-red pixels in one of the three panels."""
    picture = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    third = picture.shape[1] // 3
    part = picture[:, panel * third:(panel + 1) * third]
    red = (part[..., 0] > 60) & (part[..., 1] < 40) & (part[..., 2] < 40)
    return np.nonzero(red)[1] / third


def test_overlay_is_radiological_by_default_and_mirrors_for_neurological():
    background = np.zeros((40, 40, 20), np.float32)
    background[5:35, 5:35, 3:17] = 1.0
    labels = np.zeros((40, 40, 20), np.uint8)
    labels[26:32, 10:30, 8:12] = 1  # NCR/NET on the patient's right (high x in RAS)
    radiological = overlay_png(background, labels, (1.0, 1.0, 1.0), "t", LEGEND, BRATS_COLOURS)
    neurological = overlay_png(background, labels, (1.0, 1.0, 1.0), "t", LEGEND, BRATS_COLOURS, radiological=False)
    assert radiological.startswith(b"\x89PNG") and neurological.startswith(b"\x89PNG")  # lossless
    for panel in (0, 1):  # axial, coronal: the patient's right is on the image's left only when radiological
        assert red_columns(radiological, panel).mean() < 0.5 < red_columns(neurological, panel).mean()
    assert view_letters("axial", True) == ("R", "L", "A", "P")
    assert view_letters("coronal", False) == ("L", "R", "S", "I")
    assert view_letters("sagittal", True) == view_letters("sagittal", False) == ("A", "P", "S", "I")


@pytest.fixture(scope="module")
def segmented(tmp_path_factory, tiny_checkpoint) -> tuple[Path, list]:
    root = tmp_path_factory.mktemp("viewer")
    affine = np.diag([-1.0, -1.0, 2.0, 1.0])
    case = write_synthetic_case(root / "in" / "Nb1", "Nb1", shape=(40, 36, 16), affine=affine, with_seg=False)
    return case, segment(case, root / "out", model=str(tiny_checkpoint))


def test_result_show_is_a_niivue_widget_in_the_task_colours(segmented):
    ipyniivue = pytest.importorskip("ipyniivue")
    case, (result,) = segmented
    widget = result.show()
    assert isinstance(widget, ipyniivue.NiiVue) and neuromap.show(result, radiological=False) is not None
    assert widget.opts.is_radiological_convention and widget.opts.show_all_orientation_markers
    assert Path(widget.volumes[0].path) == case / "Nb1_flair.nii.gz"
    assert widget.volumes[1].name == "labels.nii.gz"
    assert gzip.decompress(widget.volumes[1].data) == result.labels.to_bytes()
    lut = widget.volumes[1].colormap_label
    assert list(lut.lut[4 * 4:4 * 4 + 3]) == [255, 217, 0]  # label 4 (ET) drawn in the overlay's yellow


def test_niivue_widget_opens_with_its_whole_state(segmented, monkeypatch):
    """The browser gets the volumes, the label colours and the crosshair in the messages that create the widgets:
    anywidget's front end drops later messages to a widget whose module loaded slowly (notebook.niivue_widget), so
    a widget opened empty and filled afterwards stays at "loading ..." (drawn in JupyterLab:
    test_notebook_browser.py)."""
    pytest.importorskip("ipyniivue")
    import comm

    opened = []
    real_create = comm.create_comm
    monkeypatch.setattr(comm, "create_comm", lambda **kwargs: opened.append(kwargs) or real_create(**kwargs))
    _, (result,) = segmented
    widget = result.show()
    (viewer,) = [kwargs["data"]["state"] for kwargs in opened if "volumes" in kwargs["data"]["state"]]
    assert viewer["volumes"] == [f"IPY_MODEL_{volume.model_id}" for volume in widget.volumes]
    states = {kwargs.get("comm_id"): kwargs["data"]["state"] for kwargs in opened}
    assert viewer["this_model_id"] == widget.model_id
    assert viewer["opts"]["isRadiologicalConvention"] is True
    assert viewer["scene"]["crosshairPos"] == widget.scene.crosshair_pos != [0.5, 0.5, 0.5]
    labels = states[widget.volumes[1].model_id]
    assert labels["name"] == "labels.nii.gz" and labels["id"] and labels["colormap_label"]
    assert opened[-1]["comm_id"] == widget.model_id  # the viewer opens last, after the volumes it names


def test_crosshair_starts_at_the_tumour_centre_in_niivue_fractions(segmented):
    """NiiVue's crosshairPos: fractions of the background volume's extent along R, A, S (voxel centres at
    (i + 0.5) / n); checked against nibabel's RAS reorientation for the fixture's flipped (-1, -1, 2 mm) grid."""
    import nibabel as nib

    from neuromap.notebook import crosshair_fraction, result_scene

    _, (result,) = segmented
    scene = result_scene(result)
    flair = scene.sequences["flair"]
    fraction = np.array(crosshair_fraction(scene.start_mm, flair))
    ras = nib.as_closest_canonical(nib.load(flair))
    voxel = fraction * np.array(ras.shape[:3]) - 0.5
    assert np.allclose((ras.affine @ [*voxel, 1.0])[:3], scene.start_mm, atol=1e-6)
    assert np.all((fraction > 0) & (fraction < 1))


def test_show_falls_back_to_the_overlay_png(segmented, monkeypatch, tmp_path, tiny_checkpoint):
    case, (result,) = segmented
    monkeypatch.setitem(sys.modules, "ipyniivue", None)  # not installed
    picture = result.show()
    assert picture.data == result.files["overlay.png"].read_bytes()
    (unsaved,) = segment(case, model=str(tiny_checkpoint))  # no output folder: the picture is drawn
    drawn = neuromap.show(unsaved, radiological=False)
    assert drawn.data.startswith(b"\x89PNG") and len(drawn.data) > 10_000


def test_cli_neurological_overlay(tmp_path, tiny_checkpoint, capsys):
    case = write_synthetic_case(tmp_path / "in" / "Cl1", "Cl1", shape=(40, 36, 16), with_seg=False)
    pictures = {}
    for flag in ([], ["--neurological"]):
        out = tmp_path / ("neuro" if flag else "radio")
        assert cli.main(["segment", str(case), "-o", str(out), "--model", str(tiny_checkpoint), *flag]) == 0
        pictures[bool(flag)] = (out / "Cl1_overlay.png").read_bytes()
    assert pictures[True] != pictures[False]
