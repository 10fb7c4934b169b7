"""samless: SAM-free MS lesion segmentation of brain FLAIR MRI (the MS-SAMLess method).

The inference core: model packages, the volume pipeline and the command line. It never imports
Slicer, Qt or segment_anything, and needs torch only for the PyTorch backend.
"""

from samless.errors import SamlessError

__version__ = "0.1.0"

__all__ = ["SamlessError", "__version__"]
