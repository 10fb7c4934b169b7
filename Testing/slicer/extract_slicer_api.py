"""Extract, from the Slicer source of each supported release, the names the module and effect may call.

Slicer cannot be installed here, so `test_slicer_api.py` checks the Qt layer against this table instead:
every MRML / segmentation method, Segment Editor effect method, `slicer.util` function and application
method it calls must exist in every supported release. Run it again when a release is added:

    python Testing/slicer/extract_slicer_api.py --repo /path/to/Slicer.git [--tags v5.8.1 v5.10.0 v5.12.3]

It reads the headers with plain regular expressions (method names, VTK Get/Set/Boolean macros, Qt
properties and enum values): generous on purpose, so a name missing from the table is missing from Slicer.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path

TAGS = ("v5.8.1", "v5.10.0", "v5.12.3")  # the oldest and newest supported, and the release between
OUT = Path(__file__).with_name("slicer_api.json")

# The classes whose methods the module and effect call (their MRML / VTK receivers), by header.
CXX_HEADERS = [
    "Libs/MRML/Core/vtkMRMLNode.h", "Libs/MRML/Core/vtkMRMLScene.h", "Libs/MRML/Core/vtkMRMLStorableNode.h",
    "Libs/MRML/Core/vtkMRMLTransformableNode.h", "Libs/MRML/Core/vtkMRMLDisplayableNode.h",
    "Libs/MRML/Core/vtkMRMLVolumeNode.h", "Libs/MRML/Core/vtkMRMLScalarVolumeNode.h",
    "Libs/MRML/Core/vtkMRMLLabelMapVolumeNode.h", "Libs/MRML/Core/vtkMRMLTableNode.h",
    "Libs/MRML/Core/vtkMRMLSliceNode.h", "Libs/MRML/Core/vtkMRMLSegmentationNode.h",
    "Libs/MRML/Core/vtkMRMLSegmentationDisplayNode.h", "Libs/MRML/Core/vtkMRMLSubjectHierarchyNode.h",
    "Libs/vtkSegmentationCore/vtkSegment.h", "Libs/vtkSegmentationCore/vtkSegmentation.h",
    "Libs/vtkSegmentationCore/vtkOrientedImageData.h",
    "Modules/Loadable/Segmentations/MRML/vtkMRMLSegmentEditorNode.h",
    "Modules/Loadable/Segmentations/Logic/vtkSlicerSegmentationsModuleLogic.h",
    "Modules/Loadable/Terminologies/Logic/vtkSlicerTerminologiesModuleLogic.h",
    "Modules/Loadable/Terminologies/Logic/vtkSlicerTerminologyEntry.h",
]
EFFECT_HEADERS = [
    "Modules/Loadable/Segmentations/EditorEffects/qSlicerSegmentEditorAbstractEffect.h",
    "Modules/Loadable/Segmentations/EditorEffects/qSlicerSegmentEditorScriptedEffect.h",
]
# The application's methods, and those PythonQt decorators add (static_<class>_<method>: testingEnabled()).
APP_HEADERS = ["Base/QTGUI/qSlicerApplication.h", "Base/QTCore/qSlicerCoreApplication.h",
               "Base/QTCore/qSlicerBaseQTCorePythonQtDecorators.h", "Base/QTGUI/qSlicerBaseQTGUIPythonQtDecorators.h"]
PYTHON_MODULES = ["Base/Python/slicer/util.py", "Base/Python/slicer/ScriptedLoadableModule.py",
                  "Base/Python/slicer/i18n.py", "Base/Python/slicer/packaging.py"]  # packaging: 5.12+
CLASSES = ["qMRMLSegmentEditorWidget", "qSlicerSegmentEditorAbstractEffect"]  # named as slicer.<class>

MACRO = re.compile(r"vtk(Get|Set)\w*Macro\(\s*(\w+)")
BOOLEAN = re.compile(r"vtkBooleanMacro\(\s*(\w+)")
CALLED = re.compile(r"\b([A-Za-z_]\w*)\s*\(")
PROPERTY = re.compile(r"Q_PROPERTY\(\s*[\w:<>*& ]+?\s+(\w+)\s+READ")
ENUM_VALUE = re.compile(r"^\s*(\w+)\s*(?:=[^,]*)?,?\s*(?://.*)?$", re.M)
DECORATED = re.compile(r"static_q\w+?Application_(\w+)\s*\(")
PY_DEF = re.compile(r"^(?:def|class)\s+(\w+)|^(\w+)\s*=", re.M)


def show(repo: Path, tag: str, path: str) -> str:
    done = subprocess.run(["git", "--git-dir", str(repo), "show", f"{tag}:{path}"], capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else ""


def header_names(text: str) -> set[str]:
    names = set(CALLED.findall(text)) | set(PROPERTY.findall(text)) | set(ENUM_VALUE.findall(text))
    names |= set(DECORATED.findall(text))
    for kind, name in MACRO.findall(text):
        names.add(kind + name)
    for name in BOOLEAN.findall(text):
        names.update({f"{name}On", f"{name}Off"})
    return names


def extract(repo: Path, tag: str) -> dict[str, list[str]]:
    def union(paths: list[str]) -> list[str]:
        return sorted(set().union(*(header_names(show(repo, tag, p)) for p in paths)))

    python = {}
    for path in PYTHON_MODULES:
        text = show(repo, tag, path)
        python[Path(path).stem] = sorted({a or b for a, b in PY_DEF.findall(text)})
    classes = sorted(c for c in CLASSES if any(show(repo, tag, p).strip() for p in _class_headers(c)))
    return {"mrml": union(CXX_HEADERS), "effect": union(EFFECT_HEADERS), "application": union(APP_HEADERS),
            "classes": classes, **{f"python_{k}": v for k, v in python.items()}}


def _class_headers(name: str) -> list[str]:
    return [f"Modules/Loadable/Segmentations/Widgets/{name}.h",
            f"Modules/Loadable/Segmentations/EditorEffects/{name}.h"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, required=True, help="a clone (or bare git folder) of Slicer/Slicer")
    parser.add_argument("--tags", nargs="+", default=list(TAGS))
    args = parser.parse_args()
    repo = args.repo / ".git" if (args.repo / ".git").exists() else args.repo
    table = {"source": "Slicer/Slicer", "tags": {tag: extract(repo, tag) for tag in args.tags}}
    for tag, api in table["tags"].items():
        if not api["mrml"] or not api["python_util"]:
            raise SystemExit(f"{tag}: nothing read; is {args.repo} a Slicer clone with that tag?")
    OUT.write_text(json.dumps(table, indent=0, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {OUT} ({', '.join(args.tags)})")


if __name__ == "__main__":
    main()
