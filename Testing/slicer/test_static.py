"""Static checks of the Slicer side: UI names, CMake lists and install tree, icons, metadata, layering."""

from __future__ import annotations

import ast
import json
import re
import shutil
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from samless_slicer_helpers import MODULE_DIR, REPO

UI_FILE = MODULE_DIR / "Resources" / "UI" / "SAMLessSegmentation.ui"
MODULE_FILE = MODULE_DIR / "SAMLessSegmentation.py"
EFFECT_FILES = [MODULE_DIR / "SegmentEditorSAMLess.py",
                MODULE_DIR / "SegmentEditorSAMLessLib" / "SegmentEditorEffect.py"]
QT_MODULES = {"qt", "ctk", "slicer.util", "slicer.ScriptedLoadableModule", "slicer.i18n", "SegmentEditorEffects"}
SLICER_ONLY = QT_MODULES | {"SAMLessSegmentation", "PyTorchUtils", "qSlicerSegmentationsEditorEffectsPythonQt"}


def ui_widgets() -> dict[str, str]:
    return {w.get("name"): w.get("class") for w in ET.parse(UI_FILE).getroot().iter("widget")}


def cmake_list(text: str, variable: str) -> list[str]:
    body = re.search(rf"set\({variable}\n(.*?)\n\s*\)", text, re.S).group(1)
    lines = [line.split("#")[0].strip() for line in body.splitlines()]
    return [line.replace("${MODULE_NAME}", "SAMLessSegmentation") for line in lines if line]


def module_files(*suffixes: str) -> set[str]:
    return {str(p.relative_to(MODULE_DIR)) for p in MODULE_DIR.rglob("*")
            if p.is_file() and p.suffix in suffixes and "__pycache__" not in p.parts}


def test_every_widget_the_module_uses_is_in_the_ui_file():
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text(encoding="utf-8")))
    # Selectors reached by name: the modality table and the f"{modality}Label" lookup.
    used |= set(re.findall(r'"(\w+VolumeSelector)"', MODULE_FILE.read_text(encoding="utf-8")))
    used |= {"t1Label", "t2Label"}
    widgets = ui_widgets()
    assert len(used) > 20
    assert sorted(used - set(widgets)) == []


def test_ui_file_is_a_designer_file_with_scene_connections():
    root = ET.parse(UI_FILE).getroot()
    assert root.tag == "ui" and root.find("class").text == "SAMLessSegmentation"
    widgets = ui_widgets()
    custom = {c.find("class").text for c in root.iter("customwidget")}
    used_custom = {cls for cls in widgets.values() if not cls.startswith("Q")}
    assert used_custom <= custom
    receivers = {c.find("receiver").text for c in root.iter("connection")
                 if c.find("slot").text == "setMRMLScene(vtkMRMLScene*)"}
    mrml_widgets = {name for name, cls in widgets.items() if cls in ("qMRMLNodeComboBox", "qMRMLTableView")}
    assert mrml_widgets and mrml_widgets == receivers
    assert len(widgets) == len(list(root.iter("widget")))  # names are unique


def test_cmake_lists_every_script_and_resource_and_nothing_else():
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    scripts = cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    resources = cmake_list(text, "MODULE_PYTHON_RESOURCES")
    assert len(scripts) == len(set(scripts))
    assert set(scripts) == module_files(".py")
    assert set(resources) == module_files(".png", ".ui", ".json")
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text and "WITH_GENERIC_TESTS" in text


def test_extension_metadata_and_catalog_entry_agree():
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    meta = dict(re.findall(r'set\("(EXTENSION_\w+)" "([^"]*)"', text))
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "DEPENDS"):
        assert meta[f"EXTENSION_{key}"], key
    assert "EXTENSION_SCREENSHOTURLS" in text and 'add_subdirectory("SAMLessSegmentation")' in text
    assert meta["EXTENSION_ICONURL"].endswith("Resources/Icons/SAMLessSegmentation.png")
    entry = json.loads((REPO / "Resources" / "ExtensionIndex" / "SAMLessSegmentation.json").read_text())
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.2.json#")
    assert set(entry) <= {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                          "dicom_support_rule", "build_subdirectory", "enabled", "tier"}
    assert entry["category"] == meta["EXTENSION_CATEGORY"]
    assert entry["build_dependencies"] == meta["EXTENSION_DEPENDS"].split()
    assert meta["EXTENSION_HOMEPAGE"].startswith(entry["scm_url"])


def test_the_icon_and_screenshot_urls_name_png_files_in_this_repository():
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    urls = re.findall(r'"(https://raw\.githubusercontent\.com/[^"]+)"', text)
    assert len(urls) >= 2  # the icon and at least one screenshot
    for url in urls:
        path = REPO / url.split("/main/", 1)[1]
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", url


@pytest.mark.parametrize("path", [MODULE_DIR / "Resources" / "Icons" / "SAMLessSegmentation.png",
                                  REPO / "Resources" / "Icons" / "SAMLessSegmentation.png",
                                  MODULE_DIR / "SegmentEditorSAMLessLib" / "SegmentEditorEffect.png"])
def test_icons_are_128_pixel_pngs(path):
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", header[16:24]) == (128, 128)


def imported_modules(path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), feature_version=(3, 9))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


@pytest.mark.parametrize("path", sorted((MODULE_DIR / "SAMLessSegmentationLib").glob("*.py")), ids=lambda p: p.name)
def test_the_lib_stays_below_the_qt_layer(path):
    imports = imported_modules(path)
    assert not {name for name in imports if name in SLICER_ONLY or name.split(".")[0] in {"qt", "ctk"}}
    slicer_names = {name for name in imports if name.startswith("slicer.")}
    assert all(re.fullmatch(r"slicer\.vtk\w+", name) for name in slicer_names), slicer_names


SLICER_RUNS = [MODULE_FILE, *EFFECT_FILES, *sorted((MODULE_DIR / "SAMLessSegmentationLib").glob("*.py")),
               *sorted((MODULE_DIR / "samless").rglob("*.py"))]


@pytest.mark.parametrize("path", SLICER_RUNS, ids=lambda p: str(p.relative_to(MODULE_DIR)))
def test_what_slicer_runs_parses_for_the_oldest_supported_python(path):
    imported_modules(path)  # ast.parse with Slicer 5.8's 3.9 grammar (.ci/other_pythons runs the core there)


def test_effect_uses_undo_and_the_editor_write_path():
    text = EFFECT_FILES[1].read_text(encoding="utf-8")
    write = text[text.index("def write("):text.index("# Re-thresholding")]
    assert write.index("saveStateForUndo()") < write.index("modifySelectedSegmentByLabelmap(")
    assert 'scriptedEffect.name = "SAMLess MS lesions"' in text
    assert 'startupCompleted()' in EFFECT_FILES[0].read_text(encoding="utf-8")


def test_the_user_guide_covers_install_the_click_the_numbers_and_the_warning():
    guide = (REPO / "docs" / "slicer.md").read_text(encoding="utf-8")
    for needed in ("Extensions Manager", "Additional module paths", "Apply", "Cancel", "Threshold",
                   "Minimum lesion size", "Total volume", "Undo", "not for clinical use", "synthetic phantoms",
                   "not been validated on patient", "QuantitativeReporting"):
        assert needed.lower() in guide.lower(), needed
    # The guide names the effect and the widgets as the code does.
    assert "SAMLess MS lesions" in guide and "SAMLess MS Lesions" in guide
    ui = UI_FILE.read_text(encoding="utf-8")
    for label in ("Browse...", "Model card", "Create new segmentation", "Minimum lesion size:", "Threshold:",
                  "Three planes:"):
        assert label in ui and label.rstrip(":") in guide


# --- the CMake build, configured against a stand-in for Slicer's macros ----------------------------

FAKE_SLICER = r"""
set(Slicer_USE_FILE ${CMAKE_CURRENT_LIST_DIR}/empty.cmake)
set(Slicer_EXTENSION_GENERATE_CONFIG ${CMAKE_CURRENT_LIST_DIR}/empty.cmake)
set(Slicer_EXTENSION_CPACK ${CMAKE_CURRENT_LIST_DIR}/empty.cmake)
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.10/qt-scripted-modules)
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.10/qt-scripted-modules)
set(BUILD_TESTING ON)
# As Slicer's macro: refuse missing files, install scripts and resources keeping their relative folder.
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY "WITH_GENERIC_TESTS" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  foreach(f ${MY_SCRIPTS} ${MY_RESOURCES})
    if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${f})
      message(FATAL_ERROR "slicerMacroBuildScriptedModule given nonexistent file ${f}")
    endif()
    get_filename_component(sub ${f} DIRECTORY)
    install(FILES ${f} DESTINATION ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}/${sub})
  endforeach()
endmacro()
macro(slicer_add_python_unittest)
  cmake_parse_arguments(MY "" "SCRIPT" "" ${ARGN})
  file(APPEND ${CMAKE_BINARY_DIR}/unittests.txt "${MY_SCRIPT}\n")
endmacro()
"""


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_the_extension_configures_and_installs_a_working_module(tmp_path):
    fake = tmp_path / "fake-slicer"
    fake.mkdir()
    (fake / "SlicerConfig.cmake").write_text(FAKE_SLICER)
    (fake / "empty.cmake").write_text("")
    build, prefix = tmp_path / "build", tmp_path / "install"
    for command in (["cmake", "-S", str(REPO), "-B", str(build), f"-DSlicer_DIR={fake}"],
                    ["cmake", "--install", str(build), "--prefix", str(prefix)]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
    assert (build / "unittests.txt").read_text().split() == ["SAMLessSegmentation.py"]
    installed = prefix / "lib" / "Slicer-5.10" / "qt-scripted-modules"
    assert {str(p.relative_to(installed)) for p in installed.rglob("*.py")} == module_files(".py")
    assert (installed / "Resources" / "Models.json").read_bytes() == (REPO / "Resources" / "Models.json").read_bytes()
    assert (installed / "Resources" / "UI" / "SAMLessSegmentation.ui").exists()
    # In the installed tree, the Lib finds its resources and `samless` is the installed copy.
    probe = ("import sys; sys.path.insert(0, '.');"
             "import samless, SAMLessSegmentationLib as lib;"
             "print(samless.__file__); print(lib.resource_path('Models.json'));"
             "print(lib.resource_path('SegmentationCategoryTypeModifier-SAMLess.term.json'))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=installed, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split()
    assert all(line.startswith(str(installed)) for line in lines), lines
    version = subprocess.run([sys.executable, "-m", "samless", "--version"], cwd=installed, capture_output=True,
                             text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("samless")
