"""Every Slicer name the Qt layer calls exists in every supported Slicer release.

The module and effect cannot run here (no Slicer), so their calls are checked against
`slicer_api.json`: names read from the Slicer source of each supported tag by `extract_slicer_api.py`.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

HERE = Path(__file__).parent
MODULE_DIR = HERE.parents[1] / "SAMLessSegmentation"
QT_LAYER = [MODULE_DIR / "SAMLessSegmentation.py", MODULE_DIR / "SegmentEditorSAMLess.py",
            MODULE_DIR / "SegmentEditorSAMLessLib" / "SegmentEditorEffect.py"]
TABLE = json.loads((HERE / "slicer_api.json").read_text(encoding="utf-8"))
# Receivers that are not Slicer objects: Python and our own modules, Qt/CTK constructors, SimpleITK; and
# SampleData, whose one call test_models checks against that function's signature in each release.
NOT_SLICER = {"qt", "ctk", "sitk", "np", "models", "results", "change", "terminology", "volumes", "dependencies",
              "job", "subprocess", "logging", "json", "os", "time", "traceback", "functools", "importlib", "Path",
              "PyTorchUtils", "SampleData"}


def dotted(node: ast.AST) -> list[str]:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    parts.append(node.id if isinstance(node, ast.Name) else "<expr>")
    return parts[::-1]


def used_names() -> dict[str, set[str]]:
    """What the Qt layer uses, by kind: MRML/VTK methods (CamelCase calls), effect methods, slicer.util
    functions, application methods, slicer.<class>, and names imported from slicer.* modules."""
    used: dict[str, set[str]] = {k: set() for k in ("mrml", "effect", "util", "application", "classes", "import")}
    for path in QT_LAYER:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("slicer."):
                used["import"].update(f"{node.module[len('slicer.'):]}.{a.name}" for a in node.names)
            if not isinstance(node, ast.Attribute):
                continue
            parts = dotted(node)
            if parts[:2] == ["slicer", "util"] and len(parts) == 3:
                used["util"].add(parts[2])
            elif parts[:2] == ["slicer", "app"] and len(parts) == 3:
                used["application"].add(parts[2])
            elif parts[0] == "slicer" and len(parts) == 2 and parts[1][:1] == "q":
                used["classes"].add(parts[1])
            elif "scriptedEffect" in parts[:-1] and parts[-2] == "scriptedEffect":
                used["effect"].add(parts[-1])
            elif parts[-2:-1] == ["qSlicerSegmentEditorAbstractEffect"]:
                used["effect"].add(parts[-1])  # an enum value of the effect class
            elif parts[-1][:1].isupper() and parts[0] not in NOT_SLICER:
                used["mrml"].add(parts[-1])
    return used


def outside_slicer(name: str) -> bool:
    """Methods of VTK's own classes (not in Slicer's source) and of SimpleITK images the layer calls."""
    import SimpleITK as sitk

    vtk = pytest.importorskip("vtk")
    return any(hasattr(cls, name) for cls in (vtk.vtkObject, vtk.vtkImageData, vtk.vtkMatrix4x4, sitk.Image))


QT_BUILTINS = {"connect", "processEvents"}  # QObject / QCoreApplication themselves, not Slicer's


@pytest.mark.parametrize("tag", sorted(TABLE["tags"]))
def test_every_slicer_name_the_module_and_effect_call_exists_in_each_supported_release(tag):
    api = TABLE["tags"][tag]
    used = used_names()
    assert used["mrml"] and used["effect"] and used["util"]  # the parse found the calls
    missing = [f"MRML/VTK {n}" for n in sorted(used["mrml"]) if n not in api["mrml"] and not outside_slicer(n)]
    missing += [f"effect {n}" for n in sorted(used["effect"]) if n not in api["effect"]]
    missing += [f"slicer.util.{n}" for n in sorted(used["util"]) if n not in api["python_util"]]
    missing += [f"slicer.app.{n}" for n in sorted(used["application"])
                if n not in api["application"] and n not in QT_BUILTINS]
    missing += [f"slicer.{n}" for n in sorted(used["classes"]) if n not in api["classes"]]
    for name in sorted(used["import"]):
        module, _, attr = name.partition(".")
        if attr not in api.get(f"python_{module}", []):
            missing.append(f"from slicer.{module} import {attr}")
    assert not missing, f"Slicer {tag} lacks: {', '.join(missing)}"


def test_the_table_tells_releases_apart():
    """The check can fail: vtkSegment::GetTerminology came with 5.10 (5.8 has the terminology tag only)."""
    tags = TABLE["tags"]
    assert "GetTerminology" not in tags["v5.8.1"]["mrml"] and "GetTerminology" in tags["v5.10.0"]["mrml"]
    assert {"GetTag", "GetTerminologyEntryTagName"} <= set(tags["v5.8.1"]["mrml"])


def test_slicer_packaging_is_used_only_where_it_has_pip_ensure():
    """The module installs dependencies with slicer.packaging.pip_ensure where a release has it (5.12+) and
    runs pip itself elsewhere; the table says which releases those are."""
    source = (MODULE_DIR / "SAMLessSegmentation.py").read_text(encoding="utf-8")
    assert 'import_module("slicer.packaging")' in source and 'hasattr(packaging, "pip_ensure")' in source
    has = {tag: "pip_ensure" in api["python_packaging"] for tag, api in TABLE["tags"].items()}
    assert has == {"v5.8.1": False, "v5.10.0": False, "v5.12.3": True}
