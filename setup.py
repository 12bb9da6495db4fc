"""The packages for setuptools (everything else is in pyproject.toml): the library, plus the top-level `conf/`
(Hydra) and `experiments/` trees, which a wheel carries inside the package as `rlhf_lab/conf` and
`rlhf_lab/experiments` so an installed rlhf-lab finds them (rlhf_lab/paths.py). One tree, no copies."""
from pathlib import Path

from setuptools import find_packages, setup

TREES = {"rlhf_lab.conf": "conf", "rlhf_lab.experiments": "experiments"}
DATA = ["*.yaml", "*.md", "*.csv", "*.png"]

packages = find_packages(include=["rlhf_lab", "rlhf_lab.*"])
package_dir, package_data = {}, {}
for package, folder in TREES.items():
    for directory in [Path(folder), *sorted(p for p in Path(folder).rglob("*") if p.is_dir())]:
        name = ".".join([package, *directory.relative_to(folder).parts])
        packages.append(name)
        package_dir[name] = directory.as_posix()
        package_data[name] = DATA

setup(packages=packages, package_dir=package_dir, package_data=package_data)
