"""Shared helpers for the Slicer-side tests: a headless MRML scene and volumes in it.

Importing this puts the module folder on sys.path, as Slicer does for scripted modules, so that
`SAMLessSegmentationLib` imports the same way here and in Slicer. (The helpers are a module, not
Testing/slicer/conftest.py: a second conftest would shadow the root one for `from conftest import`.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "SAMLessSegmentation"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))


def _import_slicer():
    """Import the slicer-core wheel's `slicer` without adopting this folder.

    That package extends itself with every `slicer/` folder it finds on sys.path (pkgutil.extend_path)
    and imports each module in it; pytest puts Testing/ on sys.path, so these tests would be imported
    as part of `slicer`. Hide Testing/ while `slicer` loads.
    """
    here = Path(__file__).resolve().parent
    saved = list(sys.path)
    sys.path[:] = [p for p in saved if (Path(p or ".").resolve() / "slicer") != here]
    try:
        import slicer
    finally:
        sys.path[:] = saved
    return slicer


slicer = _import_slicer()

from SAMLessSegmentationLib.volumes import new_scalar_volume  # noqa: E402
from slicer import vtkMRMLScene, vtkMRMLSubjectHierarchyNode, vtkSlicerSegmentationsModuleLogic  # noqa: E402


class Scene:
    """A headless MRML scene with the segmentations logic that segmentation nodes need."""

    def __init__(self):
        self.scene = vtkMRMLScene()
        self.logic = vtkSlicerSegmentationsModuleLogic()  # kept alive with the scene
        self.logic.SetMRMLScene(self.scene)

    def add_volume(self, image: sitk.Image, name: str = "FLAIR"):
        node = new_scalar_volume(image, name)
        self.scene.AddNode(node)
        node.CreateDefaultDisplayNodes()
        return node

    def put_in_study(self, node) -> tuple[int, int]:
        """Put `node` under a patient/study, as loading DICOM does; return (patient, study) items."""
        shnode = vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)
        patient = shnode.CreateSubjectItem(shnode.GetSceneItemID(), "Patient 1")
        study = shnode.CreateStudyItem(patient, "Brain MRI")
        shnode.CreateItem(study, node)
        return patient, study

    def parent_item(self, node) -> int:
        shnode = vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)
        return shnode.GetItemParent(shnode.GetItemByDataNode(node))

    def node_ids(self) -> set[str]:
        nodes = self.scene.GetNodes()
        return {nodes.GetItemAsObject(i).GetID() for i in range(nodes.GetNumberOfItems())}


def graded_probability(truth: sitk.Image, levels=(0.9, 0.6)) -> sitk.Image:
    """A probability map with one level per true lesion (largest first) and 0.05 elsewhere."""
    components = sitk.RelabelComponent(sitk.ConnectedComponent(truth, True), sortByObjectSize=True)
    labels = sitk.GetArrayFromImage(components)
    values = np.full(labels.shape, 0.05, np.float32)
    for index, level in enumerate(levels, start=1):
        values[labels == index] = level
    probability = sitk.GetImageFromArray(values)
    probability.CopyInformation(truth)
    return probability


def add_slice_node(scene, layout_name: str = "Red"):
    node = slicer.vtkMRMLSliceNode()
    node.SetLayoutName(layout_name)
    node.SetOrientationToAxial()
    return scene.AddNode(node)


def slice_centre(node) -> np.ndarray:
    matrix = node.GetSliceToRAS()
    return np.array([matrix.GetElement(r, 3) for r in range(3)])
