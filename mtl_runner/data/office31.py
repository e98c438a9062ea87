"""``dataset=office31``: Office-31 (Saenko et al. 2010), 31 office-object classes in
three domains (amazon 2817, dslr 498, webcam 795 images), one task per domain; see
:mod:`mtl_runner.data.class_folders` for the layout, split and preprocessing."""

from __future__ import annotations

from mtl_runner.data.base import TaskSet
from mtl_runner.data.class_folders import DomainLayout, build_domains, check_domains
from mtl_runner.data.roots import root_check

LAYOUT = DomainLayout(
    name="Office-31",
    option="office31",
    domains=("amazon", "dslr", "webcam"),
    obtain="https://faculty.cc.gatech.edu/~judy/domainadapt/ (Office-31 'domain_adaptation_images')",
)


def check_office31(root: str, **_: object) -> None:
    check_domains(LAYOUT, root)


@root_check(check_office31)
def office31(root: str = "~/data/office31", image_size: int = 224, seed: int = 0) -> TaskSet:
    """Office-31 from ``root``: tasks ``amazon``, ``dslr``, ``webcam``."""
    return build_domains(LAYOUT, root, image_size, seed)
