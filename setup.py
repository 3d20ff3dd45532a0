"""Packaging: the top-level `kernels/` folder is installed as `hscr_fast.kernels`, never as a module named `kernels`
(that name belongs to Hugging Face's `kernels` package, which transformers imports when it finds it)."""
from setuptools import find_packages, setup

trainer_packages = find_packages(include=["hscr_fast", "hscr_fast.*"])
kernel_packages = ["hscr_fast.kernels" + name[len("kernels"):]
                   for name in find_packages(include=["kernels", "kernels.*"])]

setup(
    packages=trainer_packages + kernel_packages,
    package_dir={"hscr_fast.kernels": "kernels"},
    include_package_data=True,
)
