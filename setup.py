"""Packs the repository's asset folders into the wheel (celery_obs/_assets/) at build time.

They stay where they are in the repository, their single source; pyproject.toml holds the rest
of the build configuration. An editable install does not copy them: celery_obs.assets then reads
the checkout itself.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ASSET_DIRS = ("prometheus", "grafana", "logstash", "elasticsearch", "kibana")
HERE = Path(__file__).resolve().parent


class BuildPyWithAssets(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        packed = Path(self.build_lib) / "celery_obs" / "_assets"
        for name in ASSET_DIRS:
            source = HERE / name
            if not source.is_dir():
                raise SystemExit(f"cannot build: the asset folder {name}/ is missing")
            shutil.copytree(
                source,
                packed / name,
                dirs_exist_ok=True,
                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
            )


setup(cmdclass={"build_py": BuildPyWithAssets})
