"""``dataset=office_home``: Office-Home (Venkateswara et al. 2017), 65 classes in four
domains (Art, Clipart, Product, Real_World; 15,588 images), one task per domain; see
:mod:`mtl_runner.data.class_folders` for the layout, split and preprocessing."""

from __future__ import annotations

from mtl_runner.data.base import TaskSet
from mtl_runner.data.class_folders import DomainLayout, build_domains, check_domains
from mtl_runner.data.roots import root_check

LAYOUT = DomainLayout(
    name="Office-Home",
    option="office_home",
    domains=("Art", "Clipart", "Product", "Real_World"),
    obtain="https://www.hemanthdv.org/officeHomeDataset.html (OfficeHomeDataset_10072016)",
)


def check_office_home(root: str, **_: object) -> None:
    check_domains(LAYOUT, root)


@root_check(check_office_home)
def office_home(root: str = "~/data/office_home", image_size: int = 224, seed: int = 0) -> TaskSet:
    """Office-Home from ``root``: tasks ``Art``, ``Clipart``, ``Product``, ``Real_World``."""
    return build_domains(LAYOUT, root, image_size, seed)
