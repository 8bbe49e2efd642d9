"""Package detectron2's Python sources, without its compiled ops, as the distribution `detectron2`.

`tools/bootstrap.sh` copies this file over the `setup.py` of an unpacked detectron2 source
archive (the PyPI sdist `pb1-detectron2`, which lacks the C++ sources its own setup.py wants to
compile). Nothing is compiled; `solov2_d2.compat` bridges the missing `detectron2._C` at import
time. Dependencies are installed by the bootstrap step, hence `install_requires` stays empty.
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
VERSION = re.search(
    r"^__version__\s*=\s*['\"]([^'\"]+)['\"]",
    (HERE / "detectron2" / "__init__.py").read_text(),
    re.M,
).group(1)

# The projects that upstream installs under detectron2.projects.
PROJECTS = {
    "detectron2.projects.point_rend": "projects/PointRend/point_rend",
    "detectron2.projects.deeplab": "projects/DeepLab/deeplab",
    "detectron2.projects.panoptic_deeplab": "projects/Panoptic-DeepLab/panoptic_deeplab",
}
PROJECTS = {name: path for name, path in PROJECTS.items() if (HERE / path).is_dir()}

setup(
    name="detectron2",
    version=VERSION,
    description="Detectron2 Python sources without compiled ops (see solov2_d2.compat)",
    url="https://github.com/facebookresearch/detectron2",
    license="Apache-2.0",
    packages=find_packages(include=("detectron2", "detectron2.*")) + list(PROJECTS),
    package_dir=PROJECTS,
    package_data={"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]},
    python_requires=">=3.8",
)
