"""Images between MRML and SimpleITK: volume nodes and oriented image data <-> sitk.Image, and files.

MRML geometry is RAS (IJKToRAS matrix); ITK and the files the core reads are LPS. The conversion
is exact (no resampling): an oblique, anisotropic volume keeps its grid voxel for voxel.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLVolumeNode, vtkOrientedImageData
from vtk.util import numpy_support

from samless.errors import SamlessError

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def matrix_to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def numpy_to_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


class UnusableVolume(SamlessError, ValueError):
    """A volume node SAMLess cannot read (no voxels, several components): the user's to fix, not a bug."""


def _to_sitk(image_data: vtk.vtkImageData, ijk_to_ras: np.ndarray, what: str) -> sitk.Image:
    """sitk image of `image_data`, whose voxel (i, j, k) sits at ijk_to_ras @ (i, j, k, 1)."""
    if image_data is None or image_data.GetPointData().GetScalars() is None:
        raise UnusableVolume(f"{what} holds no image data; load the volume again.")
    if image_data.GetNumberOfScalarComponents() != 1:
        raise UnusableVolume(f"{what} has {image_data.GetNumberOfScalarComponents()} components (a colour or vector "
                             "volume); choose the scalar FLAIR volume (the Vector to Scalar Volume module makes one).")
    extent = image_data.GetExtent()
    dims = [extent[1] - extent[0] + 1, extent[3] - extent[2] + 1, extent[5] - extent[4] + 1]
    voxels = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars()).reshape(dims[::-1])
    image = sitk.GetImageFromArray(np.array(voxels))  # copy: the sitk image must not share VTK's buffer
    spacing = np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
    # Extents need not start at 0 (cropped segment labelmaps): the sitk origin is the first stored voxel.
    first = ijk_to_ras @ np.array([extent[0], extent[2], extent[4], 1.0])
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in RAS_TO_LPS @ first[:3]])
    image.SetDirection([float(v) for v in (RAS_TO_LPS @ (ijk_to_ras[:3, :3] / spacing)).ravel()])
    return image


def _ijk_to_ras(image: sitk.Image) -> np.ndarray:
    direction = np.array(image.GetDirection()).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = RAS_TO_LPS @ direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = RAS_TO_LPS @ np.array(image.GetOrigin())
    return matrix


def _image_data(image: sitk.Image) -> vtk.vtkImageData:
    voxels = sitk.GetArrayFromImage(image)
    data = vtk.vtkImageData()
    data.SetDimensions(*image.GetSize())
    data.GetPointData().SetScalars(numpy_support.numpy_to_vtk(voxels.ravel(), deep=True))
    return data


def volume_to_sitk(node: vtkMRMLVolumeNode) -> sitk.Image:
    """The voxels and geometry of a volume node (in its own frame, parent transforms not applied)."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return _to_sitk(node.GetImageData(), matrix_to_numpy(matrix), f"volume {node.GetName()!r}")


def oriented_image_to_sitk(image: vtkOrientedImageData) -> sitk.Image:
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    return _to_sitk(image, matrix_to_numpy(matrix), "oriented image")


def to_sitk(image) -> sitk.Image:
    """A volume node, an oriented image (e.g. the Segment Editor's source) or a sitk image, as sitk."""
    if isinstance(image, sitk.Image):
        return image
    if isinstance(image, vtkOrientedImageData):
        return oriented_image_to_sitk(image)
    if isinstance(image, vtkMRMLVolumeNode):
        return volume_to_sitk(image)
    raise TypeError(f"cannot convert {type(image).__name__} to an image")


def sitk_to_oriented_image(image: sitk.Image) -> vtkOrientedImageData:
    """An oriented image on `image`'s grid (what segment labelmaps and editor effects take)."""
    oriented = vtkOrientedImageData()
    oriented.ShallowCopy(_image_data(image))
    oriented.SetImageToWorldMatrix(numpy_to_matrix(_ijk_to_ras(image)))
    return oriented


def update_volume_from_sitk(node: vtkMRMLVolumeNode, image: sitk.Image) -> vtkMRMLVolumeNode:
    """Replace a volume node's voxels and geometry with `image`'s."""
    node.SetIJKToRASMatrix(numpy_to_matrix(_ijk_to_ras(image)))
    node.SetAndObserveImageData(_image_data(image))
    return node


def new_scalar_volume(image: sitk.Image, name: str) -> vtkMRMLScalarVolumeNode:
    """A scalar volume node (not yet in a scene) holding `image`."""
    node = vtkMRMLScalarVolumeNode()
    node.SetName(name)
    return update_volume_from_sitk(node, image)


def write_image(image, path: str | os.PathLike) -> Path:
    """Write a node, oriented image or sitk image to `path` (NRRD keeps the geometry in full precision)."""
    path = Path(path)
    sitk.WriteImage(to_sitk(image), str(path), useCompression=False)  # speed over size: a temporary file
    return path


def same_grid(a: sitk.Image, b: sitk.Image, tolerance_mm: float = 1e-3) -> bool:
    """True if both images have the same size and their voxels sit at the same physical places."""
    if a.GetSize() != b.GetSize():
        return False
    corners = [(0, 0, 0), tuple(s - 1 for s in a.GetSize())]
    return all(
        np.allclose(a.TransformIndexToPhysicalPoint(c), b.TransformIndexToPhysicalPoint(c), atol=tolerance_mm)
        for c in corners
    ) and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-5)
