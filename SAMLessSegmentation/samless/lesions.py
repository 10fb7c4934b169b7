"""From a probability map to lesions: threshold, connected components, minimum size, statistics.

This runs on the input's own grid, so volumes are in the input's mm^3. It is also what re-thresholds
a stored probability map when a user changes the sensitivity (no network needed).
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any

import SimpleITK as sitk

CSV_FIELDS = ("id", "volume_mm3", "voxels", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm",
              "max_probability", "mean_probability")


def lesion_components(probability: sitk.Image, threshold: float, min_lesion_mm3: float,
                      connectivity: str = "full") -> sitk.Image:
    """Connected lesions (uint32 labels 1..n, largest first) with probability >= threshold.

    Lesions smaller than `min_lesion_mm3` are dropped. 'full' connectivity joins voxels that touch at a
    corner (26-neighbourhood), 'face' only across faces (6-neighbourhood).
    """
    binary = sitk.BinaryThreshold(probability, lowerThreshold=float(threshold), upperThreshold=1e30,
                                  insideValue=1, outsideValue=0)
    components = sitk.ConnectedComponent(binary, connectivity == "full")
    voxel_mm3 = math.prod(probability.GetSpacing())
    min_voxels = math.ceil(min_lesion_mm3 / voxel_mm3 - 1e-9) if min_lesion_mm3 > 0 else 0
    return sitk.RelabelComponent(components, minimumObjectSize=int(min_voxels), sortByObjectSize=True)


def label_map(components: sitk.Image) -> sitk.Image:
    """uint8 label map: 1 = lesion, 0 = background."""
    return sitk.Cast(components > 0, sitk.sitkUInt8)


def lesion_statistics(components: sitk.Image, probability: sitk.Image) -> dict[str, Any]:
    """Count, total volume and a row per lesion (centroids in the image's physical space, LPS mm)."""
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.Execute(components)
    intensity = sitk.LabelIntensityStatisticsImageFilter()
    intensity.Execute(components, probability)
    lesions = []
    for label in shape.GetLabels():
        lesions.append({
            "id": int(label),
            "volume_mm3": round(shape.GetPhysicalSize(label), 4),
            "voxels": int(shape.GetNumberOfPixels(label)),
            "centroid_mm": [round(c, 3) for c in shape.GetCentroid(label)],
            "max_probability": round(intensity.GetMaximum(label), 4),
            "mean_probability": round(intensity.GetMean(label), 4),
        })
    total_mm3 = sum(lesion["volume_mm3"] for lesion in lesions)
    return {
        "lesion_count": len(lesions),
        "total_volume_ml": round(total_mm3 / 1000.0, 5),
        "coordinate_system": "LPS",
        "lesions": lesions,
    }


def statistics_csv(stats: dict[str, Any]) -> str:
    """The per-lesion table as CSV text."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for lesion in stats["lesions"]:
        writer.writerow([lesion["id"], lesion["volume_mm3"], lesion["voxels"], *lesion["centroid_mm"],
                         lesion["max_probability"], lesion["mean_probability"]])
    return out.getvalue()
